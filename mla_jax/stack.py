"""AttentionStack: L MLAttention layers with residuals, x = x + attn(rms_norm(x)).

The attention half of a DeepSeek decoder: each layer reads its input through an RMSNorm
(input_layernorm) and adds its output to the residual. Without the norm a random-weight stack is
ill-conditioned: the residual grows, softmaxes sharpen, and rounding differences grow layer by
layer (bf16 standard vs absorbed decode outputs differed by 30% after 27 layers; with it, ~2%).
The decode-step benchmark (configs/decode_step_gpu.py) times it through `generate.decode_loop_fn`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mla_jax.attention import MLAttention
from mla_jax.config import MLAConfig
from mla_jax.layers import InitSignature, RMSNorm


class AttentionStack(nnx.Module):
  """cfg.num_layers MLAttention layers, each behind an RMSNorm, with residual connections.

  Every keyword argument other than rngs goes to each MLAttention (mode, backend, dtype,
  param_dtype, weight_format, ...). Layer i draws its weights from `rngs` in order.
  """

  __signature__ = InitSignature()

  def __init__(self, cfg: MLAConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
               **attention_options):
    self.cfg = cfg
    self.input_layernorms = nnx.List([RMSNorm(cfg.hidden_size, cfg.rms_norm_eps,
                                              param_dtype=param_dtype)
                                      for _ in range(cfg.num_layers)])
    self.layers = nnx.List([MLAttention(cfg, param_dtype=param_dtype, rngs=rngs,
                                        **attention_options)
                            for _ in range(cfg.num_layers)])

  def init_cache(self, batch_size: int, max_len: int, dtype=None) -> list:
    """One empty cache per layer (see MLAttention.init_cache; dtype None: the layers' dtype)."""
    return [layer.init_cache(batch_size, max_len, dtype=dtype) for layer in self.layers]

  def __call__(self, x, positions, caches: list):
    """x [B,T,D], positions [B,T] (-1 = padding), caches [L] -> (x_out [B,T,D], caches);
    x_out is 0 at padding positions, as MLAttention's output is."""
    if len(caches) != len(self.layers):
      raise ValueError(f"len(caches)={len(caches)}; expected one per layer ({len(self.layers)})")
    new_caches = []
    for norm, layer, cache in zip(self.input_layernorms, self.layers, caches):
      x, cache = layer.residual(x, positions, cache, input_norm=norm)
      new_caches.append(cache)
    return jnp.where(positions[..., None] >= 0, x, 0).astype(x.dtype), new_caches


def fill_caches(caches: list, length: int, key: jax.Array) -> list:
  """The caches with every row holding `length` random entries (normal, scale 1): a cache as a
  prompt of that length would leave it, without running the prefill. For benchmarks. caches may
  be their shapes, `jax.eval_shape(lambda: stack.init_cache(...))`, which builds the filled
  caches without first holding empty ones as large (a cache that fits once in device memory
  need not fit twice)."""
  filled = []
  for cache, layer_key in zip(caches, jax.random.split(key, len(caches))):
    leaves, treedef = jax.tree.flatten(cache)
    keys = jax.random.split(layer_key, len(leaves))
    leaves = [_random_like(leaf, k) for leaf, k in zip(leaves, keys)]
    cache = jax.tree.unflatten(treedef, leaves)
    filled.append(dataclasses.replace(cache, lengths=jnp.full_like(cache.lengths, length),
                                      overflow=jnp.zeros_like(cache.overflow)))
  return filled


def _random_like(x, key):
  """Random entries of x's shape and dtype (x an array or a jax.ShapeDtypeStruct)."""
  if x.dtype == jnp.int8:
    return jax.random.randint(key, x.shape, -127, 128, jnp.int8)
  if jnp.issubdtype(x.dtype, jnp.floating):
    return jax.random.normal(key, x.shape, jnp.float32).astype(x.dtype)
  return jnp.zeros(x.shape, x.dtype)
