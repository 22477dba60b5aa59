"""Cross-piece softmax merge for split-KV decoding (FlashDecoding, Dao et al. 2023).

Each piece p of the S axis yields o_p (softmax within the piece, applied to its values) and
lse_p = log Σ exp(score) over the piece. The full result is
  lse = logsumexp_p(lse_p),   o = Σ_p exp(lse_p − lse) · o_p.
Pieces with no valid entry carry lse_p = −inf and get weight 0; if every piece is empty the result
is o = 0, lse = −inf. The GPU kernel, the CPU shards and a multi-device split all use this.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mla_jax import quant


@jax.jit
def merge_partials(outs: jax.Array, lses: jax.Array) -> tuple[jax.Array, jax.Array]:
  """outs [P,...,C], lses [P,...] -> out [...,C] float32, lse [...] float32."""
  if outs.shape[:-1] != lses.shape:
    raise ValueError(f"merge_partials: {outs.shape=} must be {lses.shape=} + (C,)")
  lses = lses.astype(jnp.float32)
  m = jnp.max(lses, axis=0)
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  weights = jnp.exp(lses - m_safe)  # exp(-inf) = 0 for empty pieces
  l = jnp.sum(weights, axis=0)
  out = jnp.einsum("p...,p...c->...c", weights, outs.astype(jnp.float32))
  out = out / jnp.where(l > 0, l, 1.0)[..., None]
  lse = jnp.where(l > 0, m_safe + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
  return out, lse


def project_values(out: jax.Array, wv_b, out_dtype) -> jax.Array:
  """out [B,H,C] · wv_b [H,C,V] -> [B,H,V] in out_dtype, accumulated in float32: the value
  up-projection that absorbed decoding applies after the attention (DeepSeek-V2 §2.1.2). wv_b:
  an array, or a quant.QuantizedTensor, dequantized first."""
  precision = jax.lax.Precision.HIGHEST if jnp.dtype(out_dtype) == jnp.float32 else None
  return jnp.einsum("bhc,hcv->bhv", out, quant.dequantize(wv_b, out.dtype), precision=precision,
                    preferred_element_type=jnp.float32).astype(out_dtype)
