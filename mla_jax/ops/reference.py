"""Float32 oracles for every op. Plain jnp, no tricks: these are what tests compare against.

Masking rule shared by every attention op: key slot j is visible to a query at cache slot s_q of
row b iff j < kv_lengths[b] and j <= s_q. A query that sees nothing gets out = 0 and lse = -inf.
Slots past a row's length may hold anything (stale tokens, NaN, Inf): they never reach a result.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mla_jax import quant
from mla_jax.ops.common import causal_visibility

f32 = jnp.float32


def _as_f32(x) -> jax.Array:
  return quant.dequantize(x, f32)


def _valid_slots(values, kv_lengths, seq_axis):
  """values with the slots at or past each row's length (along seq_axis) set to 0."""
  j = jnp.arange(values.shape[seq_axis])
  valid = j[None, :] < jnp.asarray(kv_lengths)[:, None]  # [B,S]
  shape = [values.shape[0]] + [1] * (values.ndim - 1)
  shape[seq_axis] = values.shape[seq_axis]
  return jnp.where(valid.reshape(shape), values, 0.0)


def masked_softmax_apply(scores, visible, values_fn):
  """softmax(scores) over the last axis restricted to `visible`, applied through values_fn.

  Returns (out, lse); rows with no visible entry give out = 0 and lse = -inf, never NaN.
  """
  scores = jnp.where(visible, scores, -jnp.inf)
  lse = jax.nn.logsumexp(scores, axis=-1, keepdims=True)
  p = jnp.where(visible, jnp.exp(scores - jnp.where(jnp.isfinite(lse), lse, 0.0)), 0.0)
  return values_fn(p), lse[..., 0]


def mla_decode(q_latent, q_rope, c_kv, k_rope, lengths, *, sm_scale):
  """Absorbed MLA decode (DeepSeek-V2 §2.1): multi-query attention over the latent cache.

  q_latent [B,H,C], q_rope [B,H,R], c_kv [B,S,C] (array or quant.Int8Rows), k_rope [B,S,R],
  lengths [B]. Returns out [B,H,C] float32 and lse [B,H] float32 (natural log, scaled scores).
  """
  c_kv, k_rope = _valid_slots(_as_f32(c_kv), lengths, 1), _valid_slots(_as_f32(k_rope), lengths, 1)
  scores = (jnp.einsum("bhc,bsc->bhs", _as_f32(q_latent), c_kv)
            + jnp.einsum("bhr,bsr->bhs", _as_f32(q_rope), k_rope)) * sm_scale
  visible = jnp.arange(c_kv.shape[1])[None, None, :] < jnp.asarray(lengths)[:, None, None]
  return masked_softmax_apply(scores, visible, lambda p: jnp.einsum("bhs,bsc->bhc", p, c_kv))


def latent_attention(q_latent, q_rope, c_kv, k_rope, q_slots, kv_lengths, *, sm_scale):
  """Absorbed MLA for T queries: q_latent [B,T,H,C], q_rope [B,T,H,R], q_slots [B,T].

  Returns o_latent [B,T,H,C] float32 (lse dropped).
  """
  c_kv = _valid_slots(_as_f32(c_kv), kv_lengths, 1)
  k_rope = _valid_slots(_as_f32(k_rope), kv_lengths, 1)
  scores = (jnp.einsum("bthc,bsc->bths", _as_f32(q_latent), c_kv)
            + jnp.einsum("bthr,bsr->bths", _as_f32(q_rope), k_rope)) * sm_scale
  visible = causal_visibility(q_slots, kv_lengths, c_kv.shape[1])[:, :, None, :]
  out, _ = masked_softmax_apply(scores, visible, lambda p: jnp.einsum("bths,bsc->bthc", p, c_kv))
  return out


def standard_attention(q, k, v, q_slots, kv_lengths, *, sm_scale):
  """Per-head attention: q [B,T,H,K+R], k [B,H,S,K+R], v [B,H,S,V] -> [B,T,H,V] float32."""
  k, v = _valid_slots(_as_f32(k), kv_lengths, 2), _valid_slots(_as_f32(v), kv_lengths, 2)
  scores = jnp.einsum("bthd,bhsd->bths", _as_f32(q), k) * sm_scale
  visible = causal_visibility(q_slots, kv_lengths, k.shape[2])[:, :, None, :]
  out, _ = masked_softmax_apply(scores, visible, lambda p: jnp.einsum("bths,bhsv->bthv", p, v))
  return out


def merge_partials(outs, lses):
  """Log-sum-exp merge of P partial softmax results (FlashDecoding split-KV).

  outs [P,...,C], lses [P,...] -> out [...,C] float32, lse [...] float32.
  """
  outs, lses = _as_f32(outs), _as_f32(lses)
  lse = jax.nn.logsumexp(lses, axis=0)
  safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
  weights = jnp.where(jnp.isfinite(lses), jnp.exp(lses - safe), 0.0)
  return jnp.sum(weights[..., None] * outs, axis=0), lse


def batched_gemv(x, w):
  """x [B,H,K] · w [H,K,N] -> [B,H,N] float32, one small matrix per head."""
  return jnp.einsum("bhk,hkn->bhn", _as_f32(x), _as_f32(w))
