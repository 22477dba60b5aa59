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

import jax.numpy as jnp

from mla_jax import quant
from mla_jax.ops.common import causal_visibility

f32 = jnp.float32


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


def latent_attention(q_latent, q_rope, c_kv, k_rope, q_slots, kv_lengths, *, sm_scale):
  """Absorbed attention for T queries (prefill): q_latent [B,T,H,C] -> [B,T,H,C]."""
  dtype = q_latent.dtype
  c_kv = _dense(c_kv, dtype)
  scores = (jnp.einsum("bthc,bsc->bths", q_latent, c_kv, preferred_element_type=f32)
            + jnp.einsum("bthr,bsr->bths", q_rope, k_rope, preferred_element_type=f32)) * sm_scale
  visible = causal_visibility(q_slots, kv_lengths, c_kv.shape[1])[:, :, None, :]
  p, inv_l, _ = _softmax(scores, visible)
  out = jnp.einsum("bths,bsc->bthc", p.astype(c_kv.dtype), c_kv, preferred_element_type=f32)
  return (out * inv_l).astype(dtype)


def standard_attention(q, k, v, q_slots, kv_lengths, *, sm_scale):
  """Per-head attention over a head-major cache k [B,H,S,K+R], v [B,H,S,V]: q [B,T,H,K+R] ->
  [B,T,H,V].

  Both products keep heads major like the cache, and decode (T=1) is written as batched GEMVs:
  otherwise XLA CPU (jax 0.11.2) transposes the whole cache every step, or fails on bf16
  inputs with an f32 result (DotThunk: BF16 x BF16 = F32).
  """
  dtype = q.dtype
  visible = causal_visibility(q_slots, kv_lengths, k.shape[2])[:, None]  # [B,1,T,S]
  if q.shape[1] == 1:
    scores = jnp.einsum("bhd,bhsd->bhs", q[:, 0], k, preferred_element_type=f32)[:, :, None]
  else:
    scores = jnp.einsum("bthd,bhsd->bhts", q, k, preferred_element_type=f32)
  p, inv_l, _ = _softmax(scores * sm_scale, visible)
  p = p.astype(v.dtype)
  if q.shape[1] == 1:
    out = jnp.einsum("bhs,bhsv->bhv", p[:, :, 0], v, preferred_element_type=f32)[:, :, None]
  else:
    out = jnp.einsum("bhts,bhsv->bhtv", p, v, preferred_element_type=f32)
  return (out * inv_l).astype(dtype).transpose(0, 2, 1, 3)


def batched_gemv(x, w):
  """x [B,H,K] · w [H,K,N] -> [B,H,N] in x.dtype; a quantized w is dequantized first."""
  w = quant.dequantize(w, x.dtype)
  # Heads-major operands: XLA CPU (jax 0.11.2) rejects "bhk,hkn->bhn" for bf16 inputs with an
  # f32 result at run time (DotThunk: BF16 x BF16 = F32). x and y are small; w is not moved.
  y = jnp.einsum("hbk,hkn->hbn", x.transpose(1, 0, 2), w, preferred_element_type=f32)
  return y.transpose(1, 0, 2).astype(x.dtype)
