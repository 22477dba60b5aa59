"""The DeepSeek-V2 decoder (transformers' DeepseekV2ForCausalLM) around MLAttention.

Attribute names are transformers' parameter names, so a checkpoint loads through a rename table
(checkpoint.load_hf_model): CausalLM.model.embed_tokens, .model.layers[i].{input_layernorm,
self_attn, post_attention_layernorm, mlp}, .model.norm, CausalLM.lm_head. Layer i's mlp is a dense
layers.MLP for i < first_k_dense_replace and a moe.MoE after.

Each layer is pre-norm with residuals (DeepSeek-V2 §2, as LLaMA):
  h = x + self_attn(input_layernorm(x));  out = h + mlp(post_attention_layernorm(h)).

Calling convention, as MLAttention's: `logits, cache = model(input_ids, positions, cache)` with
input_ids and positions [B,T] int32; a position of -1 marks padding, anywhere in a row. Padding
is not cached and its logits are 0, and its id may be anything. A real token's id must be in
[0, vocab_size): outside jit the call raises ValueError otherwise; under jit, where values
cannot be checked, the token's embedding is NaN, which makes its row's logits NaN (from that
token on, and those before it in the same call may be too), never another token's. The cache is
a list of one attention cache per layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mla_jax.attention import KVUpProjection, MLAttention
from mla_jax.config import ModelConfig
from mla_jax.layers import MLP, Embedding, InitSignature, Linear, RMSNorm
from mla_jax.moe import Experts, MoE


class DecoderLayer(nnx.Module):
  """One decoder layer (transformers' DeepseekV2DecoderLayer); see the module docstring.

  attention_options go to MLAttention (mode, backend, ...); moe_impl to MoE's impl.
  """

  __signature__ = InitSignature()

  def __init__(self, cfg: ModelConfig, layer: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
               moe_impl: str = "auto", rngs: nnx.Rngs, **attention_options):
    D, eps = cfg.hidden_size, cfg.rms_norm_eps
    self.input_layernorm = RMSNorm(D, eps, param_dtype=param_dtype)
    self.self_attn = MLAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                 **attention_options)
    self.post_attention_layernorm = RMSNorm(D, eps, param_dtype=param_dtype)
    if cfg.is_moe_layer(layer):
      self.mlp = MoE(cfg, impl=moe_impl, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    else:
      self.mlp = MLP(D, cfg.intermediate_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, positions, cache):
    """x [B,T,D], positions [B,T], this layer's cache -> (x_out [B,T,D], cache)."""
    x, cache = self.self_attn.residual(x, positions, cache, input_norm=self.input_layernorm)
    if isinstance(self.mlp, MoE):
      return x + self.mlp(x, input_norm=self.post_attention_layernorm), cache
    return x + self.mlp(self.post_attention_layernorm(x)), cache


class Decoder(nnx.Module):
  """Embedding, decoder layers and the final norm (transformers' DeepseekV2Model): token ids ->
  normalised hidden states."""

  __signature__ = InitSignature()

  def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs, **layer_options):
    self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)
    self.layers = nnx.List([DecoderLayer(cfg, i, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                         **layer_options) for i in range(cfg.num_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)

  def __call__(self, input_ids, positions, cache: list):
    """input_ids, positions [B,T], cache [L] -> (hidden [B,T,D], cache)."""
    if len(cache) != len(self.layers):
      raise ValueError(f"len(cache)={len(cache)}; expected one per layer ({len(self.layers)})")
    # A padding token's id may be anything (e.g. -1); it is looked up as token 0.
    x = self.embed_tokens(jnp.where(positions >= 0, input_ids, 0))
    new_cache = []
    for layer, layer_cache in zip(self.layers, cache):
      x, layer_cache = layer(x, positions, layer_cache)
      new_cache.append(layer_cache)
    return self.norm(x), new_cache


class CausalLM(nnx.Module):
  """The DeepSeek-V2 language model (transformers' DeepseekV2ForCausalLM): `model`, a Decoder,
  and `lm_head`. See the module docstring for the calling convention.

  Args:
    cfg: the model's shapes (ModelConfig).
    mode, backend: MLAttention's, for every layer ("absorbed"/"standard"; "auto", "xla", ...).
    dtype: compute dtype (activations, logits); param_dtype: the parameters'.
    moe_impl: "auto", "gather" or "grouped" (moe.py).
    rngs: initializer randomness.
  """

  __signature__ = InitSignature()

  def __init__(self, cfg: ModelConfig, *, mode: str = "absorbed", backend: str = "auto",
               dtype=jnp.float32, param_dtype=jnp.float32, moe_impl: str = "auto",
               rngs: nnx.Rngs):
    if not isinstance(cfg, ModelConfig):
      raise ValueError(f"cfg is a {type(cfg).__name__}; CausalLM needs a ModelConfig")
    self.cfg, self.dtype = cfg, dtype
    self.model = Decoder(cfg, mode=mode, backend=backend, dtype=dtype, param_dtype=param_dtype,
                         moe_impl=moe_impl, rngs=rngs)
    # With tie_word_embeddings the loader copies embed_tokens' weight here.
    self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, dtype=dtype, param_dtype=param_dtype,
                          rngs=rngs)

  def init_cache(self, batch_size: int, max_len: int, dtype=None) -> list:
    """One empty attention cache per layer (MLAttention.init_cache; None: the model's dtype,
    jnp.int8: int8 latent)."""
    return [layer.self_attn.init_cache(batch_size, max_len, dtype=dtype)
            for layer in self.model.layers]

  def set_weight_format(self, weight_format: str | None):
    """Stores every Linear weight, kv_b_proj's wk_b and wv_b and the routed experts in
    weight_format: None (unchanged), "bf16", "q8_0" or "iq4_nl" (layers.to_weight_format;
    dequantized when used, except in absorbed decode's Pallas GEMV, attention.py). The MoE
    routers stay as they are: top-k choices are discrete, and llama.cpp keeps them unquantized
    too (ffn_gate_inp). The embedding is a lookup table, not a Linear, and stays too."""
    routers = {id(layer.mlp.gate) for layer in self.model.layers if isinstance(layer.mlp, MoE)}
    for path, node in nnx.iter_graph(self):
      if isinstance(node, (Linear, Experts, KVUpProjection)) and id(node) not in routers:
        try:
          node.set_weight_format(weight_format)
        except ValueError as e:  # e.g. a contraction axis that is not a multiple of 32
          raise ValueError(f"{'.'.join(map(str, path))}: {e}") from e

  def __call__(self, input_ids, positions, cache: list):
    """input_ids, positions [B,T] int (-1 = padding), cache [L] -> (logits [B,T,vocab_size] in
    dtype, 0 at padding; cache). A real token's id outside [0, vocab_size) raises ValueError
    outside jit (check_tokens); under jit it makes its row's logits NaN (module docstring)."""
    check_tokens(input_ids, positions, self.cfg.vocab_size)
    hidden, cache = self.model(input_ids, positions, cache)
    logits = self.lm_head(hidden)
    return jnp.where(positions[..., None] >= 0, logits, 0).astype(self.dtype), cache


def check_tokens(input_ids, positions, vocab_size: int):
  """Raises ValueError unless input_ids and positions are [B,T] integers and, where both are
  concrete (outside jit), every real token's id (position >= 0) is in [0, vocab_size). A padding
  token's id may be anything."""
  if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
    raise ValueError(f"input_ids.shape={tuple(input_ids.shape)} dtype={input_ids.dtype}; "
                     "expected [B,T] integer")
  if positions.shape != input_ids.shape or not jnp.issubdtype(positions.dtype, jnp.integer):
    raise ValueError(f"positions.shape={tuple(positions.shape)} dtype={positions.dtype}; "
                     f"expected [B,T]={tuple(input_ids.shape)} integer")
  if isinstance(input_ids, jax.core.Tracer) or isinstance(positions, jax.core.Tracer):
    return
  ids, real = np.asarray(input_ids), np.asarray(positions) >= 0
  bad = real & ((ids < 0) | (ids >= vocab_size))
  if bad.any():
    rows, cols = np.nonzero(bad)
    raise ValueError(f"input_ids[{rows[0]}, {cols[0]}]={ids[rows[0], cols[0]]}: token ids must "
                     f"be in [0, vocab_size={vocab_size}) ({bad.sum()} are not, in rows "
                     f"{sorted(set(rows.tolist()))})")
