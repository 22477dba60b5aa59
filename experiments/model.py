"""The model a sweep times: a stack of L MLAttention layers, x = x + attn(rms_norm(x)).

The residual is kept and each layer reads its input through an RMSNorm, as in a DeepSeek decoder
layer (input_layernorm at its initial weight). Without the norm the random-weight stack is
ill-conditioned: the residual grows, softmaxes sharpen, and rounding differences grow layer by
layer (bf16 standard vs absorbed decode outputs differed by 30% after 27 layers; with it, ~2%).

An implementation is named by a spec string "layer/backend[:key=value...]":
- layer: a registered layer constructor; "standard" and "absorbed" are MLAttention's two modes;
- backend: MLAttention's backend ("xla", "pallas", "cpu", "auto");
- options: `cache=<dtype>` picks the cache dtype (e.g. int8 for the absorbed latent cache); every
  other key=value goes to the layer constructor (e.g. `weight_format=q8_0`), which rejects what it
  does not know.
Examples: "standard/xla", "absorbed/pallas", "absorbed/pallas:cache=int8".

Every implementation builds its layers from the same per-layer seeds, so all implementations of
a sweep hold the same random weights. Steps are jitted with the caches donated (as
`mla_jax.jit_step` does for one layer), so each decode step writes its token in place; the
generation loop runs n decode steps inside one jit through `mla_jax.decode_loop_fn`.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from mla_jax import MLAConfig, MLAttention, attention, decode_loop_fn, quant

from experiments import harness

# layer name -> constructor(cfg, backend, *, dtype, param_dtype, rngs, **options) -> module with
# MLAttention's calling convention and init_cache.
LAYERS: dict[str, Callable[..., nnx.Module]] = {
    "standard": functools.partial(MLAttention, mode="standard"),
    "absorbed": functools.partial(MLAttention, mode="absorbed"),
}

PRESETS = {
    "deepseek_v2_lite": MLAConfig.deepseek_v2_lite,
    "deepseek_v3": MLAConfig.deepseek_v3,
}


def register_layer(name: str, constructor: Callable[..., nnx.Module]):
  """Makes "name/<backend>" specs build layers with `constructor` (research variants, tests)."""
  if "/" in name or ":" in name:
    raise ValueError(f"layer name {name!r} may not contain '/' or ':'")
  LAYERS[name] = constructor


def mla_config(preset: str, num_layers: int, overrides: str = "") -> MLAConfig:
  """A preset's MLAConfig with num_layers and "field=value,..." overrides applied."""
  if preset not in PRESETS:
    raise ValueError(f"preset={preset!r}; expected one of {sorted(PRESETS)}")
  return dataclasses.replace(PRESETS[preset](), num_layers=num_layers, **parse_options(overrides))


def parse_options(text: str, sep: str = ",") -> dict:
  """"a=1,b=x" -> {"a": 1, "b": "x"}; values are Python literals where they parse as one."""
  options = {}
  for item in filter(None, (s.strip() for s in text.split(sep))):
    key, eq, value = item.partition("=")
    if not eq:
      raise ValueError(f"option {item!r} in {text!r} is not key=value")
    try:
      options[key.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      options[key.strip()] = value.strip()
  return options


@dataclasses.dataclass(frozen=True)
class Implementation:
  """One parsed spec; `name` is the spec string as written in the config."""

  name: str
  layer: str
  backend: str
  cache_dtype: str
  options: tuple[tuple[str, object], ...]

  @classmethod
  def parse(cls, spec: str, default_cache_dtype: str) -> Implementation:
    head, _, tail = spec.strip().partition(":")
    layer, slash, backend = head.partition("/")
    if not slash or not layer or not backend:
      raise harness.ConfigError(
          f"implementation {spec!r}: expected 'layer/backend[:key=value...]'")
    if layer not in LAYERS:
      raise harness.ConfigError(f"implementation {spec!r}: layer {layer!r}; expected one of "
                                f"{sorted(LAYERS)} (or a name given to register_layer)")
    if layer in ("standard", "absorbed") and backend not in attention.BACKENDS:
      raise harness.ConfigError(f"implementation {spec!r}: backend {backend!r}; expected one "
                                f"of {attention.BACKENDS}")
    try:
      options = parse_options(tail, sep=":")
    except ValueError as err:
      raise harness.ConfigError(f"implementation {spec!r}: {err}") from err
    cache_dtype = str(options.pop("cache", default_cache_dtype))
    try:
      jnp.dtype(cache_dtype)
    except TypeError as err:
      raise harness.ConfigError(
          f"implementation {spec!r}: cache={cache_dtype!r} is no dtype") from err
    return cls(spec.strip(), layer, backend, cache_dtype, tuple(sorted(options.items())))

  @property
  def prefill_key(self) -> tuple:
    """Implementations with equal keys fill identical caches: MLAttention's prefill (T>1) does
    not depend on the decode backend, so they share one timed prefill."""
    return (self.layer, self.cache_dtype, self.options)


class AttentionStack:
  """L layers of one implementation: parameters, caches and the jitted prefill/decode steps.

  Construction raises what the layer raises for an unsupported option (TypeError/ValueError);
  compiling a step raises ImportError/NotImplementedError for a kernel that does not exist yet.
  """

  def __init__(self, impl: Implementation, cfg: MLAConfig, *, dtype, param_dtype, seed: int,
               rounded_through: str | None = None):
    """rounded_through: a quant format; the layers' wk_b and wv_b are quantized to it and
    dequantized back to param_dtype, so that this stack holds exactly the weights that an
    implementation with `weight_format=rounded_through` computes with (its gate reference)."""
    if impl.layer not in LAYERS:
      raise ValueError(f"layer {impl.layer!r} of {impl.name!r}; expected one of {sorted(LAYERS)}")
    self.impl, self.cfg = impl, cfg
    make = functools.partial(LAYERS[impl.layer], cfg, backend=impl.backend, dtype=dtype,
                             param_dtype=param_dtype, **dict(impl.options))
    layers = [make(rngs=nnx.Rngs(seed + i)) for i in range(cfg.num_layers)]
    if rounded_through is not None:
      for layer in layers:
        _round_through(layer.kv_b_proj, rounded_through, param_dtype)
    self._layer0 = layers[0]
    self._module = _Layers(layers, cfg.rms_norm_eps)
    self.graphdef = nnx.graphdef(layers[0])
    # The steps take the layers' states as one flat list of arrays: flattening nnx.State pytrees
    # runs in Python, and took ~0.3 ms of host time per call for 27 layers.
    self.params, self._states_treedef = jax.tree.flatten([nnx.state(layer) for layer in layers])

  def init_caches(self, batch_size: int, max_len: int) -> list:
    dtype = jnp.dtype(self.impl.cache_dtype)
    return [self._layer0.init_cache(batch_size, max_len, dtype=dtype)
            for _ in range(self.cfg.num_layers)]

  def _forward(self, params, x, positions, caches):
    """Returns (x_out [B,T,D], per-layer attention outputs [L,B,T,D], new caches)."""
    attn_outs, new_caches = [], []
    for state, cache in zip(jax.tree.unflatten(self._states_treedef, params), caches):
      attn, cache = nnx.merge(self.graphdef, state)(_rms_norm(x, self.cfg.rms_norm_eps),
                                                    positions, cache)
      x = x + attn
      attn_outs.append(attn)
      new_caches.append(cache)
    return x, jnp.stack(attn_outs), new_caches

  def compile_prefill(self, x, positions, caches):
    """AOT-compiles prefill(params, x [B,T,D], positions [B,T], caches) -> (x_out[:, -1], caches);
    the caches are donated."""
    def prefill(params, x, positions, caches):
      x_out, _, caches = self._forward(params, x, positions, caches)
      return x_out[:, -1], caches
    jitted = jax.jit(prefill, donate_argnums=(3,))
    return jitted.lower(self.params, x, positions, caches).compile()

  def compile_decode(self, x, positions, caches):
    """AOT-compiles decode(params, x [B,1,D], positions [B,1], caches) ->
    (x_out [B,1,D], attn_outs [L,B,1,D], caches); the caches are donated."""
    jitted = jax.jit(self._forward, donate_argnums=(3,))
    return jitted.lower(self.params, x, positions, caches).compile()

  def decode_loop(self, num_steps: int):
    """mla_jax.decode_loop_fn over the stack: run(x [B,1,D], positions [B,1], caches) ->
    (x_outs [B,num_steps,D], caches), num_steps decode steps inside one jit, each feeding its
    output back as the next input; the caches are donated."""
    return decode_loop_fn(self._module, num_steps)


class _Layers(nnx.Module):
  """The stack's layers (the same objects, so the same weights) as one module with MLAttention's
  calling convention, for mla_jax.decode_loop_fn: x -> x + attn(rms_norm(x)) layer by layer."""

  def __init__(self, layers: list, eps: float):
    self.layers = nnx.List(layers)
    self.eps = eps

  def __call__(self, x, positions, caches):
    new_caches = []
    for layer, cache in zip(self.layers, caches):
      attn, cache = layer(_rms_norm(x, self.eps), positions, cache)
      x = x + attn
      new_caches.append(cache)
    return x, new_caches


def _round_through(kv_b_proj, weight_format: str, dtype):
  """wk_b and wv_b quantized to weight_format, then dequantized back to dtype, in place."""
  kv_b_proj.set_weight_format(weight_format)
  for param in (kv_b_proj.wk_b, kv_b_proj.wv_b):
    param.set_value(quant.dequantize(param.get_value(), dtype))


def _rms_norm(x, eps):
  """The decoder layer's input_layernorm at its initial weight (ones), in float32."""
  xf = x.astype(jnp.float32)
  return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def with_lengths(caches: list, length: int) -> list:
  """The same cache buffers with every row's length set to `length` (restarts generation)."""
  return [dataclasses.replace(c, lengths=jnp.full_like(c.lengths, length)) for c in caches]
