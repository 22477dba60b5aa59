"""Decode caches as pytrees: LatentCache (absorbed MLA) and KVCache (standard attention).

`init_cache(cfg, batch_size, max_len, mode=..., dtype=...)` builds an empty one from a config
alone (no module instance needed, e.g. for a Linen model wrapping MLAttention through
flax.nnx.bridge); `MLAttention.init_cache` calls it.

Slots vs positions: row b's valid entries are slots [0, lengths[b]); rope positions are separate
inputs, so a row may start at any position. New tokens go to slots lengths[b], lengths[b]+1, ...

Writes are scatters with out-of-range slots dropped, so under `jax.jit` with the cache donated
(`mla_jax.jit_step`) they update the buffers in place. A write that does not fit never wraps or
clobbers valid entries: the tokens past max_len are dropped, lengths stop at max_len and the
sticky `overflow[b]` flag is set to 1. `check()` raises on it; the module raises at once when
called outside jit. The flag is int32 (0 or 1), not bool, so that a Pallas kernel with the Triton
lowering, which has no boolean buffers, can advance it in place with the lengths
(ops/latent_update.py).
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from mla_jax import parallel, quant
from mla_jax.config import MLAConfig
from mla_jax.ops.common import TMA_SLOTS

MODES = ("standard", "absorbed")  # MLAttention's modes; each has its own cache type


def round_slots(num_tokens: int) -> int:
  """The least slot count of at least num_tokens that every decode kernel takes: the Mosaic
  GPU kernels read the latent cache in TMA tiles, which need a multiple of ops.common.TMA_SLOTS
  slots, and run the Triton kernel otherwise. A cache sized for a known number of tokens
  (mla_jax.generate's) allocates this many."""
  return -(-num_tokens // TMA_SLOTS) * TMA_SLOTS


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


def advance(lengths, overflow, num_new, max_len):
  """(lengths, overflow) after appending num_new [B] tokens a row to rows of max_len slots:
  lengths stop at max_len, and a row that did not fit sets its sticky overflow flag (int32 1)."""
  total = lengths + num_new
  return jnp.minimum(total, max_len), overflow | (total > max_len).astype(overflow.dtype)


class _CacheMixin:
  """Shared bookkeeping: lengths [B] int32, the sticky overflow [B] int32 (0 or 1), and appending
  to the two token buffers named by _BUFFERS, whose sequence (slot) axis is _SEQ_AXIS."""

  _BUFFERS: ClassVar[tuple[str, str]]
  _SEQ_AXIS: ClassVar[int]

  @property
  def batch_size(self) -> int:
    """B."""
    return self.lengths.shape[0]

  @property
  def max_len(self) -> int:
    """S, the number of slots per row."""
    return getattr(self, self._BUFFERS[1]).shape[self._SEQ_AXIS]

  def _append(self, news, num_new):
    """Writes news (one [B,T,...] array per buffer) from slot lengths[b] on, keeping the first
    num_new[b] tokens of row b; advances lengths and overflow."""
    lengths, overflow = advance(self.lengths, self.overflow, num_new, self.max_len)
    written = {name: _write(getattr(self, name), new, self.lengths, num_new, self._SEQ_AXIS)
               for name, new in zip(self._BUFFERS, news)}
    return dataclasses.replace(self, **written, lengths=lengths, overflow=overflow)

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
  in the interleaved pair layout of rope.py. 576 elements a token for V2-Lite, shared by heads.

  Build one with `mla_jax.init_cache(cfg, B, S, mode="absorbed", dtype=...)`.
  """

  c_kv: jax.Array | quant.Int8Rows
  k_rope: jax.Array
  lengths: jax.Array   # [B] int32
  overflow: jax.Array  # [B] int32, 1: a write did not fit

  _BUFFERS = ("c_kv", "k_rope")
  _SEQ_AXIS = 1

  def write(self, c_kv_new, k_rope_new, num_new) -> LatentCache:
    """Appends c_kv_new [B,T,C], k_rope_new [B,T,R]; row b keeps its first num_new[b] tokens."""
    return self._append((c_kv_new, k_rope_new), num_new)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache(_CacheMixin):
  """Standard-attention cache of decompressed heads, head-major: k [B,H,S,K+R], v [B,H,S,V].

  Head-major is transformers' layout. It is also what XLA's batched dot wants: with [B,S,H,D]
  every decode step transposed the whole cache into a temporary (seen in the compiled HLO).
  Build one with `mla_jax.init_cache(cfg, B, S, mode="standard", dtype=...)`.
  """

  k: jax.Array
  v: jax.Array
  lengths: jax.Array   # [B] int32
  overflow: jax.Array  # [B] int32, 1: a write did not fit

  _BUFFERS = ("k", "v")
  _SEQ_AXIS = 2

  def write(self, k_new, v_new, num_new) -> KVCache:
    """Appends k_new [B,T,H,K+R], v_new [B,T,H,V]; row b keeps its first num_new[b] tokens."""
    return self._append((k_new, v_new), num_new)


def init_cache(cfg: MLAConfig, batch_size: int, max_len: int, *, mode: str = "absorbed",
               dtype=jnp.bfloat16, mesh=None, axis: str = "kv") -> LatentCache | KVCache:
  """An empty decode cache for B=batch_size rows of S=max_len slots each.

  mode="absorbed": LatentCache, c_kv [B,S,C] and k_rope [B,S,R] in `dtype`; dtype=jnp.int8
  stores c_kv as quant.Int8Rows (int8 [B,S,C] with a float32 scale per row) and k_rope in
  bfloat16. mode="standard": KVCache, head-major k [B,H,S,K+R] and v [B,H,S,V]. lengths [B] start
  at 0. This is what `MLAttention(cfg, mode=mode).init_cache(batch_size, max_len, dtype)`
  returns. mesh (absorbed only): a jax.sharding.Mesh; c_kv and k_rope are created sharded along S
  over its axis `axis` (and along B over its "batch" axis, if it has one), each device making its
  own slots; lengths and overflow are replicated (parallel.py). Raises ValueError naming the
  argument for a non-positive size, an unknown mode, a dtype that is neither floating nor int8,
  int8 or a mesh with mode="standard", or a mesh that parallel.check_mesh refuses.
  """
  for name, size in (("batch_size", batch_size), ("max_len", max_len)):
    try:
      size = operator.index(size)
    except TypeError:
      raise ValueError(f"{name}={size!r}: expected a positive integer") from None
    if size <= 0:
      raise ValueError(f"{name}={size}: expected a positive integer")
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}; expected one of {MODES}")
  try:
    kind = None if dtype is None else jnp.dtype(dtype)
  except TypeError:
    kind = None
  if kind is None or not (kind == jnp.int8 or jnp.issubdtype(kind, jnp.floating)):
    raise ValueError(f"dtype={dtype!r}: expected a floating dtype, or int8 for an absorbed "
                     "cache (quant.Int8Rows)")
  B, S = batch_size, max_len
  if mode == "standard":
    if kind == jnp.int8:
      raise ValueError("dtype=int8 is only supported by the absorbed (latent) cache")
    if mesh is not None:
      raise ValueError("mesh: only the absorbed (latent) cache is sharded")
    H = cfg.num_heads
    return KVCache(k=jnp.zeros((B, H, S, cfg.qk_head_dim), dtype),
                   v=jnp.zeros((B, H, S, cfg.v_head_dim), dtype), **_empty_lengths(B))
  build = functools.partial(_empty_latent_cache, cfg, B, S, kind)
  if mesh is None:
    return build()
  parallel.check_mesh(mesh, axis, parallel.BATCH_AXIS, B, S)
  buffers = parallel.sequence_sharding(mesh, axis)
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(build, out_shardings=LatentCache(c_kv=buffers, k_rope=buffers,
                                                  lengths=replicated, overflow=replicated))()


def _empty_lengths(B):
  return dict(lengths=jnp.zeros((B,), jnp.int32), overflow=jnp.zeros((B,), jnp.int32))


def _empty_latent_cache(cfg, B, S, dtype) -> LatentCache:
  if dtype == jnp.int8:
    c_kv, rope_dtype = quant.zeros_rows((B, S, cfg.kv_lora_rank)), jnp.bfloat16
  else:
    c_kv, rope_dtype = jnp.zeros((B, S, cfg.kv_lora_rank), dtype), dtype
  return LatentCache(c_kv=c_kv, k_rope=jnp.zeros((B, S, cfg.qk_rope_head_dim), rope_dtype),
                     **_empty_lengths(B))
