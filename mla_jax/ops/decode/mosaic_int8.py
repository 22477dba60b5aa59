"""Split-KV absorbed MLA decode over an int8 latent cache on Hopper: Pallas with the Mosaic GPU
lowering, no converted tile in shared memory.

The products are ops/decode/mosaic.py's, swapped for few heads (H ≤ 32), with c_kv ≈ d_s·q_s
(quant.Int8Rows: int8 values q_s, one scale d_s per token):

  scoresᵀ [T, N]  = d ⊙ (q_s[T, C] · q_latentᵀ[C, N]) + k_rope[T, R] · q_ropeᵀ[R, N]
  accᵀ    [C, N] += q_sᵀ[C, T] · (d ⊙ pᵀ)[T, N]

d_s scales c_kv's part of the score rows and the probabilities, never k_rope's part.

- Scores: an int8 × int8 wgmma (exact, int32) straight from the tile TMA wrote. The kernel first
  splits the query into two int8 parts of a 15-bit fixed point per head (`fixed_point_parts`),
  which wgmma takes as 2N columns: latent = 128·high + low, times the head's scale. That is 16
  instructions of K=32 a tile, where bfloat16 needs 32 of K=16, and no conversion at all.
- Values: A = q_sᵀ needs the tile transposed, which an 8-bit wgmma cannot read from shared
  memory; it is loaded into registers with a transposing ldmatrix and converted there, exactly,
  to the query's dtype (ops/mosaic/int8_cache_registers.py), in `value_parts` accumulators of C /
  value_parts rows, each product issued as its operand is converted.

So beside the query, shared memory holds only what TMA brought: 4 stages of 40 KiB (int8
values, k_rope, scales).
A schedule whose converting warpgroup wrote each tile to shared memory in the query's dtype,
for both products to read, was held by shared-memory traffic at 260 µs at B=64, S=16384, H=16,
where this one takes 157–161 (docs/decode_gpu.md).

Two warpgroups split each tile's work (warp specialisation, FlashAttention-3), as the many-heads
kernel (ops/decode/mosaic_heads.py) does:
- warpgroup 0 issues the first loads, computes tile t's scores and online softmax (m and the
  running sum Lᵀ are its own), writes d ⊙ pᵀ into the tile's k_rope slot (dead once the scores
  are in) and the rescale alpha [N] beside it, signals, and goes on to tile t+1;
- warpgroup 1 owns accᵀ, rescales it by alpha(t), adds tile t's values, and then loads tile
  t + stages into the slot: both warpgroups are done with it.
At the end warpgroup 0 hands the running sums to warpgroup 1, which normalises accᵀ and writes
it, in channel order, to the partials. Grid (pieces P, batch B), partials [P, B, N, C] and
[P, B, N], merged by merge_triton's kernel, as for the float caches.
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

from mla_jax.ops.common import LN2, LOG2E, cache_dtype, check_field, is_positive_int
from mla_jax.ops.decode import mosaic_common as mc
from mla_jax.ops.decode.merge_triton import MERGES
from mla_jax.ops.mosaic import int8_cache_registers as icr
from mla_jax.ops.mosaic.common import accumulate, smem, wait_for_inputs

MAX_STAGES = 4  # tiles in flight; 3, 4 and 5 ran alike at B=64, S=16384 (docs/decode_gpu.md)
_FIXED = 127 * 128  # the query's fixed-point unit: max|q| maps to 127·128


@dataclasses.dataclass(frozen=True)
class MosaicInt8Tuning:
  """Launch shape of the int8-cache kernel."""

  num_splits: int            # P: pieces of the S axis
  stages: int = MAX_STAGES   # cache tiles in flight (choose_stages: as many as fit)
  merge: str = "pallas"      # "pallas": merge_triton's kernel; "xla": ops.merge_partials

  def __post_init__(self):
    check_field(self, "num_splits", is_positive_int(self.num_splits), "an integer >= 1")
    check_field(self, "stages", is_positive_int(self.stages), "an integer >= 1")
    check_field(self, "merge", self.merge in MERGES, f"one of {MERGES}")


def shared_bytes(N: int, C: int, R: int, itemsize: int, stages: int) -> int:
  """Bytes of the kernel's shared-memory buffers: the query, its int8 parts and q_rope, then per
  stage the int8 tile, k_rope, the token scales and alpha, and l and lse."""
  T = mc.TILE
  queries = N * C * itemsize + 2 * N * C + N * R * itemsize
  return queries + stages * (T * C + T * R * itemsize + 4 * T + 4 * N) + 2 * 4 * N


def choose_stages(N: int, C: int, R: int, itemsize: int) -> int:
  """Tiles in flight: MAX_STAGES, or as many as shared memory holds (at least 1, which
  unsupported checks)."""
  fits = [s for s in range(1, MAX_STAGES + 1)
          if shared_bytes(N, C, R, itemsize, s) + mc.SMEM_SLACK <= mc.SMEM_LIMIT]
  return max(fits, default=1)


def choose_tuning(B: int, H: int, S: int, C: int, R: int, itemsize: int, *,
                  num_sms: int) -> MosaicInt8Tuning:
  """One program per SM (mosaic_common.choose_splits), as many tiles in flight as fit."""
  return MosaicInt8Tuning(num_splits=mc.choose_splits(B, S, num_sms),
                          stages=choose_stages(mc.padded_heads(H), C, R, itemsize))


def unsupported(q_latent, c_kv, k_rope) -> str | None:
  """Why this kernel cannot take these arguments, or None if it can."""
  reason = mc.few_heads_unsupported(q_latent, c_kv, k_rope)
  H, C = q_latent.shape[1:]
  S, R = k_rope.shape[1:]
  if reason is None and cache_dtype(c_kv) != jnp.int8:
    reason = f"c_kv.dtype={c_kv.dtype}: this kernel takes a quant.Int8Rows cache"
  if reason is None and (R != mc.TILE or C % 128):
    reason = (f"C={C}, R={R}: an int8 cache needs R = {mc.TILE} (pᵀ reuses the k_rope tile) and "
              "C a multiple of 128 (the int8 product's K steps)")
  needed = shared_bytes(mc.padded_heads(H), C, R, jnp.dtype(q_latent.dtype).itemsize, stages=1)
  return reason or mc.rows_unsupported(S) or mc.smem_unsupported(needed, C, R, H)


def value_parts(C: int) -> int:
  """Accumulators of accᵀ: 4 (C=512: 128 rows each; 2 and 8 were slower), or fewer, so that
  each holds whole 64-row wgmma blocks."""
  return next(p for p in (4, 2, 1) if (C // 64) % p == 0)


def fixed_point_parts(q):
  """q [C, N] (float32, any layout) as a 15-bit fixed point per column, in two parts that int8
  holds exactly: high in [-127, 127] and low in [-64, 64] (floats), with 128·high + low within
  0.5 of q·16256/max|q|, and the scale [N] that takes 128·high + low back to q (3e-5 of the
  column's largest element per unit). A column of zeros gives zeros and a finite scale."""
  amax = jnp.max(jnp.abs(q), axis=0)
  safe = jnp.where(amax > 0, amax, 1.0)
  x = q * lax.broadcast_in_dim(_FIXED / safe, q.shape, [1])
  high = jnp.round(x * (1 / 128))
  return high, jnp.round(x - high * 128), safe * (1 / _FIXED)


def _split_query(qf_smem, q_smem):
  """The query q_latent [N, C] in qf_smem -> its fixed_point_parts, as int8 [2N, C] in q_smem
  (high, then low: the int8 product's B operand, channels contiguous); returns the scale [N]."""
  N = qf_smem.shape[0]
  q = plgpu.load(qf_smem.T, layout=plgpu.Layout.WGMMA_TRANSPOSED)
  high, low, scale = fixed_point_parts(
      plgpu.layout_cast(q, plgpu.Layout.WGMMA).astype(jnp.float32))  # [C, N]
  for first, part in ((0, high), (N, low)):  # 8-bit arrays cannot change layout; floats can
    q_smem.at[pl.ds(first, N)].T[...] = plgpu.layout_cast(
        part, plgpu.Layout.WGMMA_TRANSPOSED).astype(jnp.int8)
  plgpu.commit_smem()
  return scale


class _Scratch(NamedTuple):
  qf_smem: Any     # [N, C] q_latent as given
  q_smem: Any      # [2N, C] int8: its fixed_point_parts, high then low
  qr_smem: Any     # [N, R] q_rope
  int8_smem: Any   # [stages, T, C] int8 cache tiles (icr.TRANSFORMS)
  kr_smem: Any     # [stages, T, R] k_rope tiles; then d ⊙ pᵀ [N, T] in rows [0, N)
  d_smem: Any      # [stages, T] float32 token scales
  alpha_smem: Any  # [stages, N] float32 rescale of each tile
  l_smem: Any      # [N] float32 running sums at the end
  lse_smem: Any    # [N] float32
  q_bar: Any       # the query's copies landed
  tile_bars: Any   # [stages]: a tile's copies landed
  p_bars: Any      # [stages]: d ⊙ pᵀ and alpha of a tile written
  done_bar: Any    # the running sums written
  values_staging: Any = None  # [C / value_parts, T]: interpret mode's A operand (else None)


def split_kv(q_latent, q_rope, c_kv, k_rope, lengths, *, sm_scale: float, num_splits: int,
             stages: int, interpret: bool = False):
  """Per-piece partials o_p [P, B, N, C] (in the query's dtype) and lse_p [P, B, N] over the
  quant.Int8Rows cache c_kv; q_latent [B, N, C] and q_rope [B, N, R] are padded to N heads (16 or
  32), R = 64 (pᵀ takes the k_rope tile), C a multiple of 128. `stages`: tiles in flight.
  interpret: run in Mosaic GPU's interpret mode (on a CPU)."""
  B, N, C = q_latent.shape
  S, R = k_rope.shape[1:]
  dtype, T = q_latent.dtype, mc.TILE
  parts = value_parts(C)
  part = C // parts
  piece_rows = pl.cdiv(pl.cdiv(S, T), num_splits) * T
  scale_log2 = sm_scale * LOG2E

  def kernel(lengths_ref,  # [B] int32
             q_ref,        # [B, N, C]
             qr_ref,       # [B, N, R]
             cv_ref,       # [B, S, C] int8
             kr_ref,       # [B, S, R]
             sc_ref,       # [B, S] float32
             o_ref,        # [P, B, N, C]
             lse_ref,      # [P, B, N]
             *, scratch: _Scratch):
    wait_for_inputs(interpret)
    piece, b, start, end, num_tiles = mc.piece_bounds(lengths_ref, S, piece_rows)
    int8_smem, kr_smem = scratch.int8_smem, scratch.kr_smem

    def fetch(t, slot):
      rows = pl.ds(start + t * T, T)
      for src, dst in ((cv_ref, int8_smem), (kr_ref, kr_smem), (sc_ref, scratch.d_smem)):
        plgpu.copy_gmem_to_smem(src.at[b, rows], dst.at[slot], scratch.tile_bars.at[slot])

    @pl.when(lax.axis_index("wg") == 0)
    def _scores():
      for src, dst in ((q_ref, scratch.qf_smem), (qr_ref, scratch.qr_smem)):
        plgpu.copy_gmem_to_smem(src.at[b], dst, scratch.q_bar)
      for slot in range(stages):
        pl.when(slot < num_tiles)(functools.partial(fetch, slot, slot))
      plgpu.barrier_wait(scratch.q_bar)
      q_scale = _split_query(scratch.qf_smem, scratch.q_smem)

      def step(t, carry):
        slot = lax.rem(t, stages)
        plgpu.barrier_wait(scratch.tile_bars.at[slot])
        kr_tile = kr_smem.at[slot]

        def scores(latent_ref, rope_ref):  # int8 · int8 (exact, int32), and bf16/f16 rope
          plgpu.wgmma(latent_ref, int8_smem.at[slot], scratch.q_smem.T)
          plgpu.wgmma(rope_ref, kr_tile, scratch.qr_smem.T)
          return latent_ref[...], rope_ref[...]

        latent, rope = pl.run_scoped(scores, plgpu.ACC((T, 2 * N), jnp.int32),
                                     plgpu.ACC((T, N), jnp.float32))
        latent = latent.astype(jnp.float32)
        d = lax.broadcast_in_dim(plgpu.load(scratch.d_smem.at[slot],
                                            layout=plgpu.Layout.WGMMA.reduce(1)), (T, N), [0])
        s = ((latent[:, :N] * 128.0 + latent[:, N:]) * d
             * lax.broadcast_in_dim(q_scale, (T, N), [1]) + rope)
        valid_rows = end - (start + t * T)
        p, alpha, m_i, l_part = mc.online_softmax(s * scale_log2, valid_rows, *carry)
        scratch.alpha_smem.at[slot][...] = alpha
        # p·d_s, 0 past the row's end: a stale row's scale may be NaN, and p = 0 times it is NaN
        row = plgpu.broadcasted_iota(jnp.int32, p.shape, 0, layout=plgpu.Layout.WGMMA)
        p = jnp.where(row < valid_rows, p * d, 0.0)
        mc.store_transposed(p, kr_tile.at[pl.ds(0, N)])  # pᵀ [N, T]: R = T, same swizzle
        plgpu.barrier_arrive(scratch.p_bars.at[slot])
        return m_i, l_part

      m_i, l_part = lax.fori_loop(0, num_tiles, step, (
          plgpu.layout_cast(jnp.full((N,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(0)),
          plgpu.layout_cast(jnp.zeros((T, N), jnp.float32), plgpu.Layout.WGMMA)))
      l_i = l_part.sum(axis=0)
      nonempty = l_i > 0  # an empty piece: o = 0, lse = -inf
      safe_l = jnp.where(nonempty, l_i, 1.0)
      scratch.l_smem[...] = safe_l
      scratch.lse_smem[...] = jnp.where(nonempty, (m_i + jnp.log2(safe_l)) * LN2, -jnp.inf)
      plgpu.commit_smem()
      plgpu.barrier_arrive(scratch.done_bar)
      plgpu.copy_smem_to_gmem(scratch.lse_smem, lse_ref.at[piece, b])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(lax.axis_index("wg") == 1)
    def _values():
      def step(t, accs):
        slot = lax.rem(t, stages)
        plgpu.barrier_wait(scratch.tile_bars.at[slot])
        plgpu.barrier_wait(scratch.p_bars.at[slot])
        alpha = plgpu.load(scratch.alpha_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
        p_t = kr_smem.at[slot, pl.ds(0, N)].T

        def product(acc_refs):
          for i, acc_ref in enumerate(acc_refs):
            a = icr.values_operand(int8_smem.at[slot], dtype, i * part, part,
                                   scratch.values_staging)
            plgpu.wgmma(acc_ref, a, p_t)

        accs = accumulate(tuple(mc.rescale(acc, alpha) for acc in accs), product, interpret)
        pl.when(t + stages < num_tiles)(lambda: fetch(t + stages, slot))
        return accs

      zero = plgpu.layout_cast(jnp.zeros((part, N), jnp.float32), plgpu.Layout.WGMMA)
      accs = lax.fori_loop(0, num_tiles, step, (zero,) * parts)
      plgpu.barrier_wait(scratch.done_bar)
      l_i = plgpu.load(scratch.l_smem, layout=plgpu.Layout.WGMMA.reduce(0))
      icr.store_output([acc / lax.broadcast_in_dim(l_i, acc.shape, [1]) for acc in accs],
                       o_ref.at[piece, b], interpret)

  scratch = _Scratch(
      qf_smem=smem((N, C), dtype), q_smem=smem((2 * N, C), jnp.int8), qr_smem=smem((N, R), dtype),
      int8_smem=plgpu.SMEM((stages, T, C), jnp.int8, transforms=icr.TRANSFORMS),
      kr_smem=smem((stages, T, R), dtype), d_smem=plgpu.SMEM((stages, T), jnp.float32),
      alpha_smem=plgpu.SMEM((stages, N), jnp.float32), l_smem=plgpu.SMEM((N,), jnp.float32),
      lse_smem=plgpu.SMEM((N,), jnp.float32),
      q_bar=plgpu.Barrier(num_arrivals=2),  # the copies of q_latent and q_rope
      # int8 values, k_rope and the token scales: three copies a tile
      tile_bars=plgpu.Barrier(num_arrivals=3, num_barriers=stages),
      # warpgroup 0's one arrival once a tile's d ⊙ pᵀ and alpha are written
      p_bars=plgpu.Barrier(num_arrivals=1, num_barriers=stages),
      done_bar=plgpu.Barrier(num_arrivals=1),  # warpgroup 0's, once l and lse are written
      # the interpreter's wgmma takes A only from shared memory
      values_staging=smem((part, T), dtype) if interpret else None)
  operands = (lengths, q_latent, q_rope, c_kv.values, k_rope, c_kv.scales.astype(jnp.float32))
  return mc.call(kernel, q_latent, num_splits, operands, scratch,
                 "mla_decode_split_kv_mgpu_int8", interpret, num_threads=2, thread_name="wg")


@functools.partial(jax.jit, static_argnames=("sm_scale", "tuning", "interpret"))
def mla_decode(q_latent, q_rope, c_kv, k_rope, lengths, wv_b=None, *, sm_scale: float,
               tuning: MosaicInt8Tuning, interpret: bool = False):
  """out [B,H,C] (or [B,H,V] with wv_b) in q_latent.dtype, lse [B,H]; arguments as
  ops.mla_decode, c_kv a quant.Int8Rows (see unsupported()). Heads are padded to 16 or 32."""
  split = functools.partial(split_kv, sm_scale=sm_scale, num_splits=tuning.num_splits,
                            stages=tuning.stages, interpret=interpret)
  return mc.padded_decode(split, q_latent, q_rope, c_kv, k_rope, lengths, wv_b,
                          N=mc.padded_heads(q_latent.shape[1]), merge=tuning.merge,
                          interpret=interpret)
