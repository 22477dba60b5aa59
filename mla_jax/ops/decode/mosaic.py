"""Split-KV absorbed MLA decode on Hopper for few heads and a float cache: Pallas with the Mosaic
GPU lowering (TMA + wgmma).

Same math as ops/decode/triton.py (FlashDecoding over the latent cache, DeepSeek-V2 §2.1), laid
out for the tensor cores' warpgroup MMA, whose M is at least 64. With few heads (H ≤ 32) the heads
cannot fill M, so the products are swapped (the "swap AB" of small-batch GEMMs): the cache tile
is the M operand and the heads are N.

  scoresᵀ [T, N]  = c_kv[T, C] · q_latentᵀ[C, N] + k_rope[T, R] · q_ropeᵀ[R, N]
  accᵀ    [C, N] += c_kvᵀ[C, T] · pᵀ[T, N]

Both products read the same shared-memory tile of c_kv (the second through a transposed
descriptor), so the cache is read from HBM once. The softmax runs down the columns of scoresᵀ:
per head, the running max m [N] needs one cross-warp max per tile; the running sum is kept
per element (Lᵀ [T, N], rescaled like acc) and reduced once at the end. One warpgroup issues the
TMA loads of tile t+stages after it has finished with tile t, so `stages` tiles are in flight
while it computes. (An int8 cache has its own schedule: ops/decode/mosaic_int8.py.)

Grid (pieces P, batch B); a program runs only the tiles of its piece below the row's length (none
past it) and writes its partial o [N, C] (in the query's dtype) and lse [N] to [P, B, N, C] and
[P, B, N]; the Triton merge kernel (merge_triton.py) merges them by log-sum-exp.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from mla_jax import quant
from mla_jax.ops.common import LN2, LOG2E, check_field, is_positive_int
from mla_jax.ops.decode import mosaic_common as mc
from mla_jax.ops.decode.merge_triton import MERGES
from mla_jax.ops.mosaic.common import accumulate, smem, wait_for_inputs

STAGES = 2  # tiles in flight: 2 × 72 KiB (bf16, C=512, R=64) is all shared memory allows


@dataclasses.dataclass(frozen=True)
class MosaicTuning:
  """Launch shape of the few-heads float-cache kernel."""

  num_splits: int         # P: pieces of the S axis
  stages: int = STAGES    # cache tiles in flight
  merge: str = "pallas"   # "pallas": merge_triton's kernel; "xla": ops.merge_partials

  def __post_init__(self):
    check_field(self, "num_splits", is_positive_int(self.num_splits), "an integer >= 1")
    check_field(self, "stages", is_positive_int(self.stages), "an integer >= 1")
    check_field(self, "merge", self.merge in MERGES, f"one of {MERGES}")


def choose_tuning(B: int, S: int, *, num_sms: int) -> MosaicTuning:
  """One program per SM (mosaic_common.choose_splits), STAGES tiles in flight."""
  return MosaicTuning(num_splits=mc.choose_splits(B, S, num_sms))


def _shared_bytes(N: int, C: int, R: int, itemsize: int) -> int:
  """Bytes of the kernel's shared-memory buffers (queries, lse, p, tiles)."""
  T = mc.TILE
  return N * (C + R) * itemsize + N * 4 + N * T * itemsize + STAGES * T * (C + R) * itemsize


def unsupported(q_latent, c_kv, k_rope) -> str | None:
  """Why this kernel cannot take these arguments, or None if it can."""
  reason = mc.few_heads_unsupported(q_latent, c_kv, k_rope)
  if reason is None and isinstance(c_kv, quant.Int8Rows):
    reason = "c_kv is a quant.Int8Rows: the int8 cache kernel (mosaic_int8.py) takes it"
  H, C = q_latent.shape[1:]
  S, R = k_rope.shape[1:]
  needed = _shared_bytes(mc.padded_heads(H), C, R, jnp.dtype(q_latent.dtype).itemsize)
  return reason or mc.rows_unsupported(S) or mc.smem_unsupported(needed, C, R, H)


def _initial_carry(C: int, N: int):
  """(accᵀ [C, N], m [N], Lᵀ [T, N]) of an empty piece."""
  return (plgpu.layout_cast(jnp.zeros((C, N), jnp.float32), plgpu.Layout.WGMMA),
          plgpu.layout_cast(jnp.full((N,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(0)),
          plgpu.layout_cast(jnp.zeros((mc.TILE, N), jnp.float32), plgpu.Layout.WGMMA))


def _softmax_step(s, valid_rows, carry):
  """online_softmax, with accᵀ rescaled: pᵀ and the new (accᵀ, m, Lᵀ)."""
  acc, m_i, l_part = carry
  p, alpha, m_i, l_part = mc.online_softmax(s, valid_rows, m_i, l_part)
  return p, (mc.rescale(acc, alpha), m_i, l_part)


def _write_partial(carry, o_smem, lse_smem, o_dst, lse_dst):
  """o = acc / l and lse = m + log l (natural log) of the piece to o_dst [N, C] and lse_dst [N],
  staged in o_smem [N, C] and lse_smem [N]; an empty piece gives o = 0 and lse = -inf."""
  acc, m_i, l_part = carry
  l_i = l_part.sum(axis=0)
  nonempty = l_i > 0
  safe_l = jnp.where(nonempty, l_i, 1.0)
  lse_smem[...] = jnp.where(nonempty, (m_i + jnp.log2(safe_l)) * LN2, -jnp.inf)
  mc.store_transposed(acc / lax.broadcast_in_dim(safe_l, acc.shape, [1]), o_smem)
  plgpu.copy_smem_to_gmem(o_smem, o_dst)
  plgpu.copy_smem_to_gmem(lse_smem, lse_dst)
  plgpu.wait_smem_to_gmem(0)


class _Scratch(NamedTuple):
  q_smem: Any      # [N, C] q_latent; stages the output o at the end
  qr_smem: Any     # [N, R] q_rope
  p_smem: Any      # [N, T] pᵀ of the current tile
  lse_smem: Any    # [N] float32
  q_bar: Any       # the query's copies landed
  tile_bars: Any   # [stages]: a tile's copies landed


def split_kv(q_latent, q_rope, c_kv, k_rope, lengths, *, sm_scale: float, num_splits: int,
             stages: int = STAGES, interpret: bool = False):
  """Per-piece partials o_p [P, B, N, C] (normalised within the piece, in the query's dtype)
  and lse_p [P, B, N]: one warpgroup per program, TMA prefetching `stages` tiles ahead.

  q_latent [B, N, C] and q_rope [B, N, R] are already padded to N heads (16 or 32); c_kv
  [B, S, C] and k_rope [B, S, R] are bfloat16 or float16 like the query (see unsupported()).
  interpret: run in Mosaic GPU's interpret mode (on a CPU).
  """
  B, N, C = q_latent.shape
  S, R = k_rope.shape[1:]
  dtype, T = q_latent.dtype, mc.TILE
  piece_rows = pl.cdiv(pl.cdiv(S, T), num_splits) * T
  scale_log2 = sm_scale * LOG2E

  def kernel(lengths_ref,  # [B] int32
             q_ref,        # [B, N, C]
             qr_ref,       # [B, N, R]
             c_ref,        # [B, S, C]
             kr_ref,       # [B, S, R]
             o_ref,        # [P, B, N, C]
             lse_ref,      # [P, B, N]
             *, scratch: _Scratch):
    wait_for_inputs(interpret)
    piece, b, start, end, num_tiles = mc.piece_bounds(lengths_ref, S, piece_rows)
    plgpu.copy_gmem_to_smem(q_ref.at[b], scratch.q_smem, scratch.q_bar)
    plgpu.copy_gmem_to_smem(qr_ref.at[b], scratch.qr_smem, scratch.q_bar)

    def tile_loop(c_smem, kr_smem):  # [stages, T, C], [stages, T, R]
      def fetch(t, slot):
        rows = pl.ds(start + t * T, T)
        bar = scratch.tile_bars.at[slot]
        plgpu.copy_gmem_to_smem(c_ref.at[b, rows], c_smem.at[slot], bar)
        plgpu.copy_gmem_to_smem(kr_ref.at[b, rows], kr_smem.at[slot], bar)

      for slot in range(stages):
        pl.when(slot < num_tiles)(functools.partial(fetch, slot, slot))
      plgpu.barrier_wait(scratch.q_bar)

      def step(t, carry):
        slot = lax.rem(t, stages)
        plgpu.barrier_wait(scratch.tile_bars.at[slot])
        c_tile = c_smem.at[slot]

        def scores(s_ref):
          plgpu.wgmma(s_ref, c_tile, scratch.q_smem.T)
          plgpu.wgmma(s_ref, kr_smem.at[slot], scratch.qr_smem.T)
          return s_ref[...]

        s = pl.run_scoped(scores, plgpu.ACC((T, N), jnp.float32)) * scale_log2
        valid_rows = end - (start + t * T)
        p, (acc, m_i, l_part) = _softmax_step(s, valid_rows, carry)
        pl.when(valid_rows < T)(lambda: mc.zero_stale_rows(c_tile, valid_rows))
        mc.store_transposed(p, scratch.p_smem)  # pᵀ [N, T]: T minor, like c_kv, same swizzle
        acc = accumulate(acc, lambda acc_ref: plgpu.wgmma(acc_ref, c_tile.T, scratch.p_smem.T),
                         interpret)
        pl.when(t + stages < num_tiles)(lambda: fetch(t + stages, slot))
        return acc, m_i, l_part

      return lax.fori_loop(0, num_tiles, step, _initial_carry(C, N))

    carry = pl.run_scoped(tile_loop, smem((stages, T, C), dtype), smem((stages, T, R), dtype))
    _write_partial(carry, scratch.q_smem, scratch.lse_smem, o_ref.at[piece, b],
                   lse_ref.at[piece, b])

  scratch = _Scratch(
      q_smem=smem((N, C), dtype), qr_smem=smem((N, R), dtype), p_smem=smem((N, T), dtype),
      lse_smem=plgpu.SMEM((N,), jnp.float32),
      q_bar=plgpu.Barrier(num_arrivals=2),  # the copies of q_latent and q_rope
      tile_bars=plgpu.Barrier(num_arrivals=2, num_barriers=stages))  # c_kv's and k_rope's tiles
  return mc.call(kernel, q_latent, num_splits, (lengths, q_latent, q_rope, c_kv, k_rope),
                 scratch, "mla_decode_split_kv_mgpu", interpret)


@functools.partial(jax.jit, static_argnames=("sm_scale", "tuning", "interpret"))
def mla_decode(q_latent, q_rope, c_kv, k_rope, lengths, wv_b=None, *, sm_scale: float,
               tuning: MosaicTuning, interpret: bool = False):
  """out [B,H,C] (or [B,H,V] with wv_b) in q_latent.dtype, lse [B,H]; arguments as
  ops.mla_decode (see unsupported()). Heads are padded to 16 or 32."""
  split = functools.partial(split_kv, sm_scale=sm_scale, num_splits=tuning.num_splits,
                            stages=tuning.stages, interpret=interpret)
  return mc.padded_decode(split, q_latent, q_rope, c_kv, k_rope, lengths, wv_b,
                          N=mc.padded_heads(q_latent.shape[1]), merge=tuning.merge,
                          interpret=interpret)
