"""MLAttention: DeepSeek-V2/V3 multi-head latent attention as a flax NNX module.

Two modes share one set of parameters (names follow transformers' DeepseekV2Attention):
- "standard": decompress c_kv into per-head k_nope = c_kv·wk_bᵀ and v = c_kv·wv_b, cache
  them head-major, k [B,H,S,K+R] and v [B,H,S,V] (cache.KVCache; llama.cpp without MLA,
  transformers 4.x).
- "absorbed": cache only c_kv [B,S,C] and k_rope [B,S,R]; fold wk_b into the query,
  q_latent = q_nope·wk_b, attend in the latent space and apply wv_b after the softmax
  (DeepSeek-V2 paper §2.1.2 "absorb W^UK into W^Q and W^UV into W^O").

Calling convention: `y, cache = attn(x, positions, cache)` with x [B,T,D] and positions [B,T]
int32; T>1 is a (possibly chunked) prefill, T==1 a decode step. Padding tokens have position -1
and may sit anywhere in a row (left padding, as transformers pads batched generation, included):
they are not cached, their outputs are 0, and a row's real tokens take consecutive cache slots in
their order. This is how a batch whose rows have different lengths is fed.

Weight formats (`weight_format`): only kv_b_proj's wk_b and wv_b, the weights of the two batched
GEMVs of absorbed decoding, change format. None (the default) keeps them in param_dtype like every
other parameter; "bf16" stores them as bfloat16; "q8_0" / "iq4_nl" store them as GGML blocks
(quant.QuantizedTensor, blocks of 32 along the contraction axis). Absorbed decode with
backend="pallas" decodes quantized blocks inside the fused GEMV kernel (ops/gemv/triton.py) where
it takes the weight (K and N multiples of 32); every other path (xla/cpu decode, prefill,
standard mode, other sizes) dequantizes them first.

Absorbed decode steps on the Pallas backend run as absorbed_step.py says: one kernel
(ops/latent_update.py) absorbs a float wk_b into the query and does the rope, the kv norm and the
cache write; the batched GEMV kernel applies wv_b (and a quantized wk_b).

`gemv_lowering` picks that GEMV kernel (backend="pallas" only): "triton", the default, or
"mosaic", the Hopper kernel of ops/gemv/mosaic.py, which then absorbs wk_b too. The Mosaic kernel takes less GPU time but more host time
per launch (docs/batched_gemv.md), and needs bfloat16/float16 activations (`dtype`) with weights
in a GGML format or in that dtype; that kernel file's `unsupported` names what else it refuses.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
from flax import nnx

from mla_jax import absorbed_step, layer_step, ops, parallel, quant, rope
from mla_jax.cache import MODES, KVCache, LatentCache, init_cache, round_slots
from mla_jax.config import MLAConfig
from mla_jax.layers import InitSignature, Linear, RMSNorm, project
from mla_jax.ops import device, gemv, xla
from mla_jax.ops.common import TMA_SLOTS, resolve_impl

BACKENDS = ("auto", "xla", "pallas", "cpu")
WEIGHT_FORMATS = (None, "bf16", *quant.FORMATS)
GEMV_LOWERINGS = ("triton", "mosaic")


class KVUpProjection(nnx.Module):
  """kv_b_proj split per head: wk_b [H,K,C] (key up-projection) and wv_b [H,C,V] (value).

  transformers stores one weight [H*(K+V), C]; the split layout is what both batched GEMVs of
  the absorbed path contract over (K for wk_b, C for wv_b) and what quantized formats block.
  """

  __signature__ = InitSignature()

  def __init__(self, cfg: MLAConfig, *, param_dtype, rngs: nnx.Rngs):
    H, K, C, V = cfg.num_heads, cfg.qk_nope_head_dim, cfg.kv_lora_rank, cfg.v_head_dim
    init = nnx.initializers.normal(stddev=C ** -0.5)
    self.wk_b = nnx.Param(init(rngs.params(), (H, K, C), param_dtype))
    self.wv_b = nnx.Param(init(rngs.params(), (H, C, V), param_dtype))

  def set_weight_format(self, weight_format: str | None):
    """Converts wk_b and wv_b in place to `weight_format` (see the module docstring).

    Quantized formats start from the dequantized weights, so converting twice only re-rounds.
    """
    if weight_format not in WEIGHT_FORMATS:
      raise ValueError(f"weight_format={weight_format!r}; expected one of {WEIGHT_FORMATS}")
    # set_value, not `param[...] =`: the new value has another dtype or type (an indexed write
    # would cast it back into the old array).
    for name, param in (("wk_b", self.wk_b), ("wv_b", self.wv_b)):
      if weight_format == "bf16":
        param.set_value(quant.dequantize(param.get_value(), jnp.bfloat16))
      elif weight_format is not None:
        try:
          param.set_value(quant.quantize(quant.dequantize(param.get_value()), weight_format))
        except ValueError as err:
          raise ValueError(f"kv_b_proj.{name} [H, K, N]: {err} (its contraction dimension "
                           f"K={param.get_value().shape[1]}, weight_format={weight_format!r})"
                           ) from None

  def weights(self):
    """(wk_b [H,K,C], wv_b [H,C,V]): arrays or quant.QuantizedTensor, as weight_format left them.

    get_value rather than `[...]`: a QuantizedTensor cannot be indexed.
    """
    return self.wk_b.get_value(), self.wv_b.get_value()


class MLAttention(nnx.Module):
  """Multi-head latent attention of one DeepSeek-V2/V3 layer; see the module docstring.

  `attn = MLAttention(cfg, mode="absorbed", backend="auto", rngs=nnx.Rngs(0))`, then
  `y, cache = attn(x, positions, attn.init_cache(B, S))` with x [B,T,D] and positions [B,T].

  Args:
    cfg: the layer's shapes and rope settings.
    mode: "absorbed" (latent cache, the default) or "standard" (per-head K/V cache).
    backend: what runs absorbed decode steps (T==1): "auto", "xla", "pallas" (the GPU
      kernels; interpreted where there is no GPU) or "cpu" (the split-KV XLA CPU path).
      Prefill and standard mode always run on XLA.
    dtype: compute dtype of activations and outputs.
    param_dtype: dtype of the parameters.
    weight_format: None, "bf16", "q8_0" or "iq4_nl": how wk_b and wv_b are stored.
    gemv_lowering: "triton" or "mosaic", the fused GEMV kernel of backend="pallas".
    decode_lowering: None, "triton" or "mosaic", the split-KV kernel of backend="pallas" (None:
      ops.mla_decode's choice, Mosaic on a Hopper GPU where it takes the arguments, among
      them a cache of a multiple of 8 slots, as cache.round_slots gives).
    mesh: None, or a jax.sharding.Mesh for context-parallel decode: init_cache shards the latent
      cache along S over mesh axis `mesh_axis` (absorbed mode), and decode steps run
      parallel.mla_decode_sharded on it with the backend's kernel on each device.
    mesh_axis: the mesh axis that splits the cache's slots.
    layer_kernel: whether `residual` (a decoder layer's x + attn(norm(x))) runs a decode step
      as one persistent kernel where it can (layer_step.py). Off by default: on an H100 it
      matched the module's kernels at B=1 with a short cache and was slower elsewhere, 1.15×
      the time at B=1 with 16384 entries and 1.5× at B=8 with its projections on the tensor
      cores, as they run from B=3 on (docs/decode_step.md).
    rngs: initializer randomness.
  """

  __signature__ = InitSignature()

  def __init__(self, cfg: MLAConfig, *, mode: str = "absorbed", backend: str = "auto",
               dtype=jnp.float32, param_dtype=jnp.float32, weight_format: str | None = None,
               gemv_lowering: str = "triton", decode_lowering: str | None = None, mesh=None,
               mesh_axis: str = "kv", layer_kernel: bool = False,
               rngs: nnx.Rngs):
    if mode not in MODES:
      raise ValueError(f"mode={mode!r}; expected one of {MODES}")
    if backend not in BACKENDS:
      raise ValueError(f"backend={backend!r}; expected one of {BACKENDS}")
    _check_gemv_lowering(gemv_lowering, backend, dtype)
    _check_decode_lowering(decode_lowering, backend)
    if backend == "pallas" and not device.is_gpu():
      _warn_interpreted()
    if mesh is not None and mode != "absorbed":
      raise ValueError(f"mesh with mode={mode!r}: only the absorbed (latent) cache is sharded")
    self.cfg, self.mode, self.backend, self.dtype = cfg, mode, backend, dtype
    self.gemv_lowering = gemv_lowering
    self.decode_lowering = decode_lowering
    self.mesh, self.mesh_axis = mesh, mesh_axis
    self.layer_kernel = layer_kernel
    D, H = cfg.hidden_size, cfg.num_heads
    # Projections in transformers' [out, in] layout: a row reduction at decode (layers.Linear).
    linear = functools.partial(Linear, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if cfg.q_lora_rank is None:
      self.q_proj = linear(D, H * cfg.qk_head_dim)
    else:
      self.q_a_proj = linear(D, cfg.q_lora_rank)
      self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, param_dtype=param_dtype)
      self.q_b_proj = linear(cfg.q_lora_rank, H * cfg.qk_head_dim)
    self.kv_a_proj_with_mqa = linear(D, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps, param_dtype=param_dtype)
    self.kv_b_proj = KVUpProjection(cfg, param_dtype=param_dtype, rngs=rngs)
    self.kv_b_proj.set_weight_format(weight_format)
    self.o_proj = linear(H * cfg.v_head_dim, D)

  def init_cache(self, batch_size: int, max_len: int, dtype=None):
    """An empty cache of B=batch_size rows and S=max_len slots for this module's mode:
    `mla_jax.init_cache(self.cfg, batch_size, max_len, mode=self.mode, dtype=dtype)`, sharded
    over the module's mesh if it has one.

    dtype: None (the default) is the module's dtype, so that decode reads the cache without
    converting it; int8 (absorbed only) stores c_kv as quant.Int8Rows. Warns where decode would
    run a Mosaic kernel but for max_len, which they need a multiple of ops.common.TMA_SLOTS.
    """
    cache = init_cache(self.cfg, batch_size, max_len, mode=self.mode,
                       dtype=self.dtype if dtype is None else dtype, mesh=self.mesh,
                       axis=self.mesh_axis)
    if (self.mode == "absorbed" and self.mesh is None and self.decode_lowering is None
        and resolve_impl(self.backend) == "pallas" and max_len % TMA_SLOTS
        and self._decode_kernel(cache, max_len) == "triton"
        and self._decode_kernel(cache, round_slots(max_len)) != "triton"):
      warnings.warn(f"max_len={max_len} is not a multiple of {TMA_SLOTS}, which the Mosaic "
                    "decode kernels need: decode runs the Triton kernel; "
                    f"mla_jax.cache.round_slots({max_len}) = {round_slots(max_len)}",
                    stacklevel=2)
    return cache

  def _decode_kernel(self, cache: LatentCache, slots: int) -> str:
    """The kernel that decode would run on `cache` resized to `slots` (ops.decode.plan)."""
    B, H, R = cache.lengths.shape[0], self.cfg.num_heads, self.cfg.qk_rope_head_dim
    resized = jax.tree.map(lambda a: jax.ShapeDtypeStruct((B, slots, *a.shape[2:]), a.dtype),
                           (cache.c_kv, cache.k_rope))
    query = lambda n: jax.ShapeDtypeStruct((B, H, n), self.dtype)
    return ops.decode.plan(query(self.cfg.kv_lora_rank), query(R), *resized, cache.lengths,
                           impl="pallas", **self._decode_options).kernel

  def __call__(self, x, positions, cache, *, input_norm: RMSNorm | None = None):
    """x [B,T,D], positions [B,T] int (-1 = padding), cache -> (y [B,T,D], updated cache).

    The cache is the LatentCache (absorbed) or KVCache (standard) of init_cache; row b's real
    (non-padding) tokens go, in order, to slots lengths[b], lengths[b]+1, ...; y is 0 at padding
    positions, wherever they are.

    input_norm: an RMSNorm that the attention reads x through, as a decoder layer's
    input_layernorm: the result is that of calling the module on input_norm(x). Given here, the
    absorbed decode step on the Pallas backend folds it into the projections and the latent
    kernel, a launch fewer a layer (absorbed_step.py); elsewhere it runs first.
    """
    self._check_inputs(x, positions, cache)
    B, T, _ = x.shape
    if absorbed_step.supported(self, x):  # docs/decode_step.md
      heads, cache = absorbed_step.decode_step(self, x[:, 0].astype(self.dtype), positions[:, 0],
                                               cache, input_norm)
      heads = heads[:, None]
    else:
      x = (x if input_norm is None else input_norm(x)).astype(self.dtype)
      heads, cache = self._attend(*self._project(x), positions, cache)
    y = self.o_proj(heads.reshape(B, T, -1).astype(self.dtype))
    _raise_if_overflow(cache)
    return jnp.where(positions[..., None] >= 0, y, 0).astype(self.dtype), cache

  def residual(self, x, positions, cache, *, input_norm: RMSNorm):
    """(x + self(x, positions, cache, input_norm=input_norm)[0], cache): a decoder layer's
    attention half with its residual. One token a row in absorbed mode on the Pallas backend
    runs as one kernel where layer_step.supported says it can (layer_step.py), else as the
    module's call and an add."""
    self._check_inputs(x, positions, cache)
    if layer_step.supported(self, x, cache, input_norm):  # docs/decode_step.md
      y, cache = layer_step.residual_step(self, x[:, 0], positions[:, 0], cache, input_norm)
      _raise_if_overflow(cache)
      return y[:, None], cache
    y, cache = self(x, positions, cache, input_norm=input_norm)
    return x + y, cache

  def _attend(self, q, kv, positions, cache):
    """The attention between the projections: q [B,T,H·(K+R)] and kv [B,T,C+R] (their outputs)
    -> (heads [B,T,H,V], cache), on XLA but for absorbed decode's kernels (backend)."""
    cfg = self.cfg
    B, T = positions.shape
    valid = positions >= 0
    num_new = jnp.sum(valid, axis=1, dtype=jnp.int32)
    rank, pack = _real_tokens_first(valid)
    q_slots = cache.lengths[:, None] + rank

    q = q.reshape(B, T, cfg.num_heads, cfg.qk_head_dim)  # [q_nope | q_rope]
    q_rope = q[..., cfg.qk_nope_head_dim:]
    c_kv, k_rope = jnp.split(kv, [cfg.kv_lora_rank], axis=-1)
    c_kv = self.kv_a_layernorm(c_kv)
    cos, sin = rope.rope_tables(cfg, positions)
    q_rope = rope.apply_rope(q_rope, cos[:, :, None], sin[:, :, None])
    k_rope = rope.apply_rope(k_rope, cos, sin)

    attend = self._absorbed if self.mode == "absorbed" else self._standard
    return attend(q, q_rope, pack(c_kv), pack(k_rope), q_slots, num_new, cache)

  def _project(self, x, input_scale=None):
    """(q, kv_a_proj_with_mqa(x)) from x, the two projections that read x (q_proj, or q_a_proj
    before q_a_layernorm and q_b_proj) as one (layers.project); input_scale [..., 1] float32
    or None multiplies the query's, rounded to its dtype."""
    lora = self.cfg.q_lora_rank is not None
    q, kv = project(x, self.q_a_proj if lora else self.q_proj, self.kv_a_proj_with_mqa)
    if input_scale is not None:
      q = (q.astype(jnp.float32) * input_scale).astype(q.dtype)
    return (self.q_b_proj(self.q_a_layernorm(q)) if lora else q), kv

  def _standard(self, q, q_rope, c_kv, k_rope, q_slots, num_new, cache):
    """q [B,T,H,K+R] unrotated (its first K columns are q_nope), q_rope rotated."""
    wk_b, wv_b = self.kv_b_proj.weights()
    k_nope = jnp.einsum("btc,hkc->bthk", c_kv, quant.dequantize(wk_b, c_kv.dtype))
    v = jnp.einsum("btc,hcv->bthv", c_kv, quant.dequantize(wv_b, c_kv.dtype))
    k_rope = jnp.broadcast_to(k_rope[:, :, None], (*k_nope.shape[:3], k_rope.shape[-1]))
    cache = cache.write(jnp.concatenate([k_nope, k_rope], axis=-1), v, num_new)
    q = jnp.concatenate([q[..., :self.cfg.qk_nope_head_dim], q_rope], axis=-1)
    heads = xla.standard_attention(q, cache.k, cache.v, q_slots, cache.lengths,
                                   sm_scale=self.cfg.softmax_scale)
    return heads, cache

  def _absorbed(self, q, q_rope, c_kv, k_rope, q_slots, num_new, cache):
    """q [B,T,H,K+R] unrotated (its first K columns are q_nope), q_rope rotated."""
    wk_b, wv_b = self.kv_b_proj.weights()
    cache = cache.write(c_kv, k_rope, num_new)
    T = q.shape[1]
    if T == 1:  # decode: two batched GEMVs (q_nope read in place from q), the split-KV kernel
      q_latent = self._gemv(q[:, 0], wk_b)
      decode = ops.mla_decode
      if self.mesh is not None:  # the cache split along S over devices (parallel.py)
        decode = functools.partial(parallel.mla_decode_sharded, mesh=self.mesh,
                                   axis=self.mesh_axis)
      o_latent, _ = decode(q_latent, q_rope[:, 0].astype(q_latent.dtype), cache.c_kv,
                           cache.k_rope, cache.lengths, sm_scale=self.cfg.softmax_scale,
                           impl=self._decode_impl, **self._decode_options)
      heads = self._gemv(o_latent.astype(q_latent.dtype), wv_b)
      return heads[:, None], cache
    q_nope = q[..., :self.cfg.qk_nope_head_dim]
    q_latent = jnp.einsum("bthk,hkc->bthc", q_nope, quant.dequantize(wk_b, q.dtype))
    o_latent = xla.latent_attention(q_latent, q_rope, cache.c_kv, cache.k_rope, q_slots,
                                    cache.lengths, sm_scale=self.cfg.softmax_scale)
    return jnp.einsum("bthc,hcv->bthv", o_latent, quant.dequantize(wv_b, o_latent.dtype)), cache

  @property
  def _decode_impl(self) -> str:
    return self.backend

  @property
  def _decode_options(self) -> dict:
    options = self._kernel_options(self._decode_impl)
    if self.decode_lowering is not None:
      options["lowering"] = self.decode_lowering
    return options

  def _gemv(self, x, w):
    """ops.batched_gemv(x, w) of the absorbed decode (wk_b or wv_b) on the module's backend.
    Where the default Triton kernel does not take w (it needs K and N multiples of 32) the
    product runs on XLA instead, so that any head size decodes; gemv_lowering="mosaic" is a
    request, and refuses what it cannot take."""
    impl, options = self._gemv_impl, self._gemv_options
    if impl == "pallas" and self.gemv_lowering == "triton" and gemv.unsupported(x, w):
      impl, options = "xla", {}
    return ops.batched_gemv(x, w, impl=impl, **options)

  @property
  def _gemv_impl(self) -> str:
    return "xla" if self.backend == "cpu" else self.backend

  @property
  def _gemv_options(self) -> dict:
    options = self._kernel_options(self._gemv_impl)
    if self._gemv_impl == "pallas":
      options["lowering"] = self.gemv_lowering
    return options

  @staticmethod
  def _kernel_options(impl: str) -> dict:
    """Pallas kernels run in interpret mode where there is no GPU (CPU tests)."""
    if impl == "pallas" and not device.is_gpu():
      return {"interpret": True}
    return {}

  def _check_inputs(self, x, positions, cache):
    D = self.cfg.hidden_size
    if x.ndim != 3 or x.shape[-1] != D or min(x.shape) < 1:
      raise ValueError(f"x.shape={tuple(x.shape)}; expected [B,T,D] with D={D}, B >= 1, T >= 1")
    if positions.shape != x.shape[:2] or not jnp.issubdtype(positions.dtype, jnp.integer):
      raise ValueError(f"positions.shape={tuple(positions.shape)} dtype={positions.dtype}; "
                       f"expected [B,T]={tuple(x.shape[:2])} integer")
    expected = LatentCache if self.mode == "absorbed" else KVCache
    if not isinstance(cache, expected):
      raise ValueError(f"cache is a {type(cache).__name__}; mode={self.mode!r} needs a "
                       f"{expected.__name__} from init_cache")
    if cache.batch_size != x.shape[0]:
      raise ValueError(f"cache batch {cache.batch_size} != x.shape[0]={x.shape[0]}")


def _real_tokens_first(valid):
  """Where a chunk's tokens go when padding may sit anywhere in a row. valid [B,T] bool ->
  (rank [B,T] int32: a real token's index among its row's real tokens, 0 for padding;
  pack: x [B,T,...] -> x with each row's real tokens moved to the front, in order).

  The cache appends a row's first num_new tokens (cache._append), so packing what goes into the
  cache and giving each query the slot of its rank keeps real tokens contiguous and causal.
  """
  if valid.shape[1] == 1:  # a decode step: one token, nothing to move
    return jnp.zeros(valid.shape, jnp.int32), lambda x: x
  rank = jnp.where(valid, jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1, 0)
  order = jnp.argsort(~valid, axis=1, stable=True)  # real tokens first, each group in order

  def pack(x):
    return jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)

  return rank, pack


def _check_gemv_lowering(gemv_lowering: str, backend: str, dtype):
  if gemv_lowering not in GEMV_LOWERINGS:
    raise ValueError(f"gemv_lowering={gemv_lowering!r}; expected one of {GEMV_LOWERINGS}")
  if gemv_lowering == "mosaic" and backend != "pallas":
    raise ValueError(f"gemv_lowering='mosaic' with backend={backend!r}: only backend='pallas' "
                     "runs the fused GEMV kernel")
  if gemv_lowering == "mosaic" and jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"gemv_lowering='mosaic' with dtype={jnp.dtype(dtype)}: the Mosaic kernel "
                     "needs bfloat16 or float16 activations")


def _check_decode_lowering(decode_lowering: str | None, backend: str):
  if decode_lowering not in (None, *ops.decode.LOWERINGS):
    raise ValueError(f"decode_lowering={decode_lowering!r}; expected None or one of "
                     f"{ops.decode.LOWERINGS}")
  if decode_lowering is not None and backend != "pallas":
    raise ValueError(f"decode_lowering={decode_lowering!r} with backend={backend!r}: only "
                     "backend='pallas' runs the split-KV kernels")


@functools.cache
def _warn_interpreted():
  """Once a process: Pallas kernels without a GPU run in Pallas' interpret mode."""
  warnings.warn("MLAttention(backend='pallas') without a GPU runs its Pallas kernels in interpret "
                "mode: correct, and much slower than backend='auto' (the CPU path)", stacklevel=3)


def _raise_if_overflow(cache):
  """Outside jit the overflow flag is concrete: fail loudly at once."""
  if not isinstance(cache.overflow, jax.core.Tracer):
    cache.check()


def jit_step(module: MLAttention):
  """Returns step(x [B,T,D], positions [B,T], cache) -> (y [B,T,D], cache): module's __call__,
  jitted with the cache donated.

  Donation lets XLA write new tokens into the cache buffers in place: a decode step costs
  O(new tokens) writes, not a copy of the cache. The cache passed in must not be used again (its
  buffers now belong to the result).

  Parameters: step follows the module's current parameter values. Writes through the module's
  Variables (`attn.o_proj.weight[...] = w`, `nnx.update(attn, state)`, `set_value`,
  `kv_b_proj.set_weight_format`) show in the next call, recompiling if a shape, dtype or type
  changed. The graph is read once, when step is built (as nnx.cached_partial does): nnx.split's
  state holds the module's own Variable objects, and jit reads their values at each call.
  Replacing a Variable or submodule object (`attn.o_proj = Linear(...)`) is not seen; build
  a new step then. Re-splitting the module on every call would see that too, but costs ~0.4 ms
  of Python per call (measured on a CPU host, one layer), more than a decode step on a GPU.
  """
  graphdef, state = nnx.split(module)  # state's leaves are the module's own Variables

  @functools.partial(jax.jit, donate_argnums=(3,))
  def step(state, x, positions, cache):
    return nnx.merge(graphdef, state)(x, positions, cache)

  return lambda x, positions, cache: step(state, x, positions, cache)
