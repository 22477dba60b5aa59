"""XLA implementations (plain jnp einsums): the baselines that kernels are timed against, and
the module's prefill path. Inputs keep their dtype; products accumulate in float32.

Masking follows ops/reference.py: slot j is visible to a query at slot s_q iff
j < kv_lengths[b] and j <= s_q. mla_decode, an implementation of ops.mla_decode, takes caches
whose slots past a row's length hold anything, NaN and Inf included: it zeroes them before its
value product (0·NaN is NaN), a select over the cache that XLA CPU writes out as a cache-sized
temporary (the CPU shard path and the Pallas kernels avoid it). The module's prefill and standard
attention read the module's own caches, whose slots past the length hold finite values only
(zeros, or tokens of a rewound row), and skip that select.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax

from mla_jax import quant
from mla_jax.ops import device
from mla_jax.ops.common import causal_visibility

f32 = jnp.float32
PREFILL_BLOCK = 1024  # cache slots a prefill step attends over (a [B,T,H,1024] float32 block)


def _softmax(scores, visible):
  """Masked softmax in float32: (p unnormalised, 1/l, m + log l); empty rows give p = 0."""
  scores = jnp.where(visible, scores, -jnp.inf)
  m = jnp.max(scores, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(scores - m)
  l = jnp.sum(p, axis=-1, keepdims=True)
  inv_l = jnp.where(l > 0, 1.0 / jnp.where(l > 0, l, 1.0), 0.0)
  lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
  return p, inv_l, lse


def _valid_rows(values, valid):
  """values [B,S,...] with the slots where valid [B,S] is False set to 0: slots past a row's
  length may hold anything, NaN included, and the value product's 0·NaN would be NaN."""
  return jnp.where(valid.reshape(valid.shape + (1,) * (values.ndim - 2)), values, 0)


def _dense(x, dtype):
  return quant.dequantize(x, dtype) if isinstance(x, quant.Int8Rows) else x


def _slice(x, start, rows, axis):
  """Slots [start, start + rows) of x (an array or quant.Int8Rows) along its slot axis."""
  if rows == x.shape[axis]:
    return x
  if isinstance(x, quant.Int8Rows):
    return quant.Int8Rows(lax.dynamic_slice_in_dim(x.values, start, rows, axis),
                          lax.dynamic_slice_in_dim(x.scales, start, rows, axis))
  return lax.dynamic_slice_in_dim(x, start, rows, axis)


def _visible(q_slots, kv_lengths, start, rows, first):
  """[B,T,rows]: causal_visibility of slots start.. that no earlier block visited (>= first)."""
  j = start + jnp.arange(rows)
  return (causal_visibility(q_slots - start, kv_lengths - start, rows)
          & (j >= first)[None, None, :])


def _blockwise(load, scores, values, out_shape, S, kv_lengths, block):
  """Online softmax (FlashAttention-2, Dao 2023) over the cache in blocks of `block` slots.

  load(start, rows) -> the cache's slots [start, start + rows), read once per block;
  scores(block, start, rows, first) -> masked scores [..., rows] (-inf where not visible, or
  below `first`); values(p, block) -> [..., V] float32. Blocks at
  or past the longest row's length are skipped (lax.cond in a scan: reverse-mode
  differentiable), so a prefill costs what the filled cache holds, not its size; the last block
  slides back to end at S and masks the slots an earlier block visited. A cache of at most
  `block` slots is one block. Rows that see nothing give 0. Returns out_shape float32.
  """
  rows = min(block, S)

  def visit(carry, i):
    acc, m, l = carry
    start = jnp.minimum(i * rows, S - rows)
    cache_block = load(start, rows)
    s = scores(cache_block, start, rows, i * rows)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    alpha = jnp.exp(m - shift)  # 0 while nothing was visible (m = -inf)
    p = jnp.exp(s - shift[..., None])
    return (acc * alpha[..., None] + values(p, cache_block), m_new,
            l * alpha + jnp.sum(p, axis=-1))

  longest = jnp.max(kv_lengths)
  init = (jnp.zeros(out_shape, f32), jnp.full(out_shape[:-1], -jnp.inf, f32),
          jnp.zeros(out_shape[:-1], f32))
  step = lambda carry, i: (lax.cond(i * rows < longest, visit, lambda c, i: c, carry, i), None)
  (acc, _, l), _ = lax.scan(step, init, jnp.arange(-(-S // rows)))
  return acc * jnp.where(l > 0, 1.0 / jnp.where(l > 0, l, 1.0), 0.0)[..., None]


def mla_decode(q_latent, q_rope, c_kv, k_rope, lengths, *, sm_scale):
  """Absorbed decode as three einsums over the whole cache; out [B,H,C] in q_latent.dtype."""
  dtype = q_latent.dtype
  c_kv = _dense(c_kv, dtype)
  scores = (jnp.einsum("bhc,bsc->bhs", q_latent, c_kv, preferred_element_type=f32)
            + jnp.einsum("bhr,bsr->bhs", q_rope, k_rope, preferred_element_type=f32)) * sm_scale
  visible = jnp.arange(c_kv.shape[1])[None, None, :] < lengths[:, None, None]
  p, inv_l, lse = _softmax(scores, visible)
  out = jnp.einsum("bhs,bsc->bhc", p.astype(c_kv.dtype), _valid_rows(c_kv, visible[:, 0]),
                   preferred_element_type=f32)
  return (out * inv_l).astype(dtype), lse[..., 0]


def latent_attention(q_latent, q_rope, c_kv, k_rope, q_slots, kv_lengths, *, sm_scale,
                     block: int = PREFILL_BLOCK):
  """Absorbed attention for T queries (prefill): q_latent [B,T,H,C] -> [B,T,H,C] in its dtype.

  c_kv [B,S,C] (any float dtype, or quant.Int8Rows) and k_rope [B,S,R] are read block by block
  in q_latent's dtype (_blockwise): the cost follows the longest row's length, not S.
  """
  dtype = q_latent.dtype

  def load(start, rows):
    return (_dense(_slice(c_kv, start, rows, 1), dtype).astype(dtype),
            _slice(k_rope, start, rows, 1).astype(dtype))

  def scores(block, start, rows, first):
    c, k = block
    s = (jnp.einsum("bthc,bsc->bths", q_latent, c, preferred_element_type=f32)
         + jnp.einsum("bthr,bsr->bths", q_rope, k, preferred_element_type=f32)) * sm_scale
    return jnp.where(_visible(q_slots, kv_lengths, start, rows, first)[:, :, None], s, -jnp.inf)

  def values(p, block):
    return jnp.einsum("bths,bsc->bthc", p.astype(dtype), block[0], preferred_element_type=f32)

  out = _blockwise(load, scores, values, q_latent.shape, k_rope.shape[1], kv_lengths, block)
  return out.astype(dtype)


def standard_attention(q, k, v, q_slots, kv_lengths, *, sm_scale, block: int = PREFILL_BLOCK):
  """Per-head attention over a head-major cache k [B,H,S,K+R], v [B,H,S,V]: q [B,T,H,K+R] ->
  [B,T,H,V].

  Both products keep heads major like the cache, and decode (T=1) is written as batched GEMVs:
  otherwise XLA CPU (jax 0.11.2) transposes the whole cache every step, or fails on bf16
  inputs with an f32 result (DotThunk: BF16 x BF16 = F32).
  """
  dtype = q.dtype
  if q.shape[1] > 1 or k.dtype != dtype or v.dtype != dtype:
    # prefill, or a cache in another dtype than q's: block by block, each block converted to q's
    # dtype (_blockwise), never the whole cache (a cache-sized copy per step)
    return _standard_prefill(q, k, v, q_slots, kv_lengths, sm_scale=sm_scale, block=block)
  visible = causal_visibility(q_slots, kv_lengths, k.shape[2])[:, None]  # [B,1,T,S]
  scores = jnp.einsum("bhd,bhsd->bhs", q[:, 0], k, preferred_element_type=f32)[:, :, None]
  p, inv_l, _ = _softmax(scores * sm_scale, visible)
  out = jnp.einsum("bhs,bhsv->bhv", p[:, :, 0].astype(dtype), v,
                   preferred_element_type=f32)[:, :, None]
  return (out * inv_l).astype(dtype).transpose(0, 2, 1, 3)


def _standard_prefill(q, k, v, q_slots, kv_lengths, *, sm_scale, block):
  dtype = q.dtype

  def load(start, rows):
    return _slice(k, start, rows, 2).astype(dtype), _slice(v, start, rows, 2).astype(dtype)

  def scores(block, start, rows, first):
    s = jnp.einsum("bthd,bhsd->bhts", q, block[0], preferred_element_type=f32) * sm_scale
    return jnp.where(_visible(q_slots, kv_lengths, start, rows, first)[:, None], s, -jnp.inf)

  def values(p, block):
    return jnp.einsum("bhts,bhsv->bhtv", p.astype(dtype), block[1], preferred_element_type=f32)

  B, T, H, _ = q.shape
  out = _blockwise(load, scores, values, (B, H, T, v.shape[-1]), k.shape[2], kv_lengths, block)
  return out.astype(dtype).transpose(0, 2, 1, 3)


def batched_gemv(x, w):
  """x [B,H,K] · w [H,K,N] -> [B,H,N] in x.dtype; a quantized w is dequantized first."""
  w = quant.dequantize(w, x.dtype)
  # Heads-major operands: XLA CPU (jax 0.11.2) rejects "bhk,hkn->bhn" for bf16 inputs with an
  # f32 result at run time (DotThunk: BF16 x BF16 = F32). x and y are small; w is not moved.
  y = weight_einsum("hbk,hkn->hbn", x.transpose(1, 0, 2), w, preferred_element_type=f32)
  return y.transpose(1, 0, 2).astype(x.dtype)


def weight_einsum(spec: str, x, w, **kwargs):
  """jnp.einsum(spec, x, w, **kwargs) for activations x and a weight w (spec without "...").

  XLA CPU (jax 0.11.2) runs a dot whose left operand is one row (x's axes that w lacks all of
  extent 1) and whose weight is bfloat16 by converting the whole weight to float32 first, then an
  Eigen product: a temporary the size of the weight, written on every call when decode steps
  are dispatched one by one, or once a loop inside a decode loop, where the float32 copies of
  all the layers' weights are then alive together. From two rows up the dot is a YNNPACK GEMM
  that reads the bfloat16 weight as it lies. So there x gets a second row of zeros, the product
  accumulates in float32 and the result drops that row. float16 weights are converted either way,
  and GPUs are not concerned: elsewhere this is the einsum.
  """
  (xs, ws), out = spec.split("->")[0].split(","), spec.split("->")[1]
  rows = [axis for axis, name in enumerate(xs) if name not in ws]
  one_row = rows and math.prod(x.shape[axis] for axis in rows) == 1
  if not (one_row and w.dtype == jnp.bfloat16 and device.platform() == "cpu"):
    return jnp.einsum(spec, x, w, **kwargs)
  dtype = kwargs.pop("preferred_element_type", None) or jnp.result_type(x, w)
  x = jnp.concatenate([x, jnp.zeros_like(x)], axis=rows[0])
  y = jnp.einsum(spec, x, w, preferred_element_type=f32, **kwargs)
  return lax.slice_in_dim(y, 0, 1, axis=out.index(xs[rows[0]])).astype(dtype)
