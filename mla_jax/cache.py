"""Decode caches as pytrees: LatentCache (absorbed MLA) and KVCache (standard attention).

Slots vs positions: row b's valid entries are slots [0, lengths[b]); rope positions are separate
inputs, so a row may start at any position. New tokens go to slots lengths[b], lengths[b]+1, ...

Writes are scatters with out-of-range slots dropped, so under `jax.jit` with the cache donated
(`mla_jax.jit_step`) they update the buffers in place. A write that does not fit never wraps or
clobbers valid entries: the tokens past max_len are dropped, lengths stop at max_len and the
sticky `overflow[b]` flag is set. `check()` raises on it; the module raises at once when called
outside jit.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mla_jax import quant


def _scatter_rows(buffer, new, start, num_new, seq_axis=1):
  """buffer[b, start[b] + t] = new[b, t] for t < num_new[b] along seq_axis (1 or 2).

  new is [B,T,...] in both cases; other slots are untouched.
  """
  B, T = new.shape[:2]
  S = buffer.shape[seq_axis]
  t = jnp.arange(T)[None, :]
  slots = jnp.where(t < num_new[:, None], start[:, None] + t, S)  # S is out of range: dropped
  rows = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
  index = (rows, slots) if seq_axis == 1 else (rows, slice(None), slots)
  return buffer.at[index].set(new.astype(buffer.dtype), mode="drop")


def _write(buffer, new, start, num_new, seq_axis=1):
  """Scatters new rows into buffer (array or quant.Int8Rows).

  The optimization barrier makes XLA materialise the updated buffer once, in place, before the
  attention reads it. Without it XLA CPU duplicates the update into each consumer's fusion, and
  every duplicate needs its own copy of the whole cache (seen in the compiled HLO at B=1).
  """
  if isinstance(buffer, quant.Int8Rows):
    q = quant.quantize_rows(new)
    buffer = quant.Int8Rows(_scatter_rows(buffer.values, q.values, start, num_new),
                            _scatter_rows(buffer.scales, q.scales, start, num_new))
  else:
    buffer = _scatter_rows(buffer, new, start, num_new, seq_axis)
  return jax.lax.optimization_barrier(buffer)


def _advance(lengths, overflow, num_new, max_len):
  total = lengths + num_new
  return jnp.minimum(total, max_len), overflow | (total > max_len)


class _CacheMixin:
  """Shared bookkeeping: lengths [B] int32 and the sticky overflow [B] bool."""

  @property
  def batch_size(self) -> int:
    return self.lengths.shape[0]

  def check(self):
    """Raises ValueError if any row overflowed (needs concrete values: call outside jit)."""
    overflow = np.asarray(self.overflow)
    if overflow.any():
      raise ValueError(f"cache overflow in rows {np.flatnonzero(overflow).tolist()}: more tokens "
                       f"were written than max_len={self.max_len}; the excess was dropped")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LatentCache(_CacheMixin):
  """Absorbed-MLA cache: c_kv [B,S,C] (array or quant.Int8Rows) and k_rope [B,S,R] after rope,
  in the interleaved pair layout of rope.py. 576 elements a token for V2-Lite, shared by heads."""

  c_kv: jax.Array | quant.Int8Rows
  k_rope: jax.Array
  lengths: jax.Array   # [B] int32
  overflow: jax.Array  # [B] bool

  @property
  def max_len(self) -> int:
    return self.k_rope.shape[1]

  @classmethod
  def zeros(cls, batch_size, max_len, kv_lora_rank, rope_dim, dtype) -> LatentCache:
    if jnp.dtype(dtype) == jnp.int8:
      c_kv = quant.zeros_rows((batch_size, max_len, kv_lora_rank))
      rope_dtype = jnp.bfloat16
    else:
      c_kv = jnp.zeros((batch_size, max_len, kv_lora_rank), dtype)
      rope_dtype = dtype
    return cls(c_kv, jnp.zeros((batch_size, max_len, rope_dim), rope_dtype),
               jnp.zeros((batch_size,), jnp.int32), jnp.zeros((batch_size,), bool))

  def write(self, c_kv_new, k_rope_new, num_new) -> LatentCache:
    """Appends c_kv_new [B,T,C], k_rope_new [B,T,R]; row b keeps its first num_new[b] tokens."""
    lengths, overflow = _advance(self.lengths, self.overflow, num_new, self.max_len)
    return LatentCache(_write(self.c_kv, c_kv_new, self.lengths, num_new),
                       _write(self.k_rope, k_rope_new, self.lengths, num_new), lengths, overflow)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache(_CacheMixin):
  """Standard-attention cache of decompressed heads, head-major: k [B,H,S,K+R], v [B,H,S,V].

  Head-major is transformers' layout. It is also what XLA's batched dot wants: with [B,S,H,D]
  every decode step transposed the whole cache into a temporary (seen in the compiled HLO).
  """

  k: jax.Array
  v: jax.Array
  lengths: jax.Array   # [B] int32
  overflow: jax.Array  # [B] bool

  @property
  def max_len(self) -> int:
    return self.k.shape[2]

  @classmethod
  def zeros(cls, batch_size, max_len, num_heads, qk_dim, v_dim, dtype) -> KVCache:
    if jnp.dtype(dtype) == jnp.int8:
      raise ValueError("dtype=int8 is only supported by the absorbed (latent) cache")
    return cls(jnp.zeros((batch_size, num_heads, max_len, qk_dim), dtype),
               jnp.zeros((batch_size, num_heads, max_len, v_dim), dtype),
               jnp.zeros((batch_size,), jnp.int32), jnp.zeros((batch_size,), bool))

  def write(self, k_new, v_new, num_new) -> KVCache:
    """Appends k_new [B,T,H,K+R], v_new [B,T,H,V]; row b keeps its first num_new[b] tokens."""
    lengths, overflow = _advance(self.lengths, self.overflow, num_new, self.max_len)
    return KVCache(_write(self.k, k_new, self.lengths, num_new, seq_axis=2),
                   _write(self.v, v_new, self.lengths, num_new, seq_axis=2), lengths, overflow)
