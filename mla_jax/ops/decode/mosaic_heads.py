"""Split-KV absorbed MLA decode on Hopper for many heads (H > 32, DeepSeek-V3's 128): Pallas with
the Mosaic GPU lowering, heads as wgmma's M, three warpgroups.

ops/decode/mosaic.py swaps the products because a few heads cannot fill wgmma's M of 64. With many
heads no swap is needed: a program takes a block of 64 heads of one sequence, and the cache tile
is the B operand (the FlashMLA layout):

  scores [64, T]  = q_latent[64, C] · c_kvᵀ[C, T] + q_rope[64, R] · k_ropeᵀ[R, T]
  acc    [64, C] += p[64, T] · c_kv[T, C]

acc [64, 512] float32 would be 256 registers a thread of one warpgroup, so its columns are split
over two, and a third computes the scores (warp specialisation, FlashAttention-3):
- warpgroup 0 issues the TMA loads, computes the scores and the online softmax (FlashAttention-2,
  log2 units) of tile t, writes p(t) into the tile's k_rope slot (dead once the scores are in)
  and the rescale factor alpha(t) beside it, signals, and goes on to tile t+1;
- warpgroups 1 and 2 each own half of the value columns, acc [64, C/2], and run
  p(t)·c_kv(t)[:, half] while warpgroup 0 scores tile t+1; when both are done with tile t, its
  slot is refilled with tile t+2.
The two programs of a 128-head sequence read the same cache tiles, the second mostly from L2. On
the H200 at B=64, S=16384, H=128 a prototype of this ran 650 µs against 862 µs for a
two-warpgroup version whose warpgroup 0 also ran half of the values (255 registers and spills);
the benchmark measured 641–692 µs with the merge (docs/decode_gpu.md).

Shared memory (bf16, C=512, R=64): q 72 KiB and two 72 KiB tiles, about 217 KiB of 227; a third
tile does not fit. The cache tile and q are stored as two column halves [., C/2], one per value
warpgroup; q's halves stage the output at the end. Grid (head blocks, pieces P, batch B); the
pieces and the merge are the few-heads kernels' (mosaic_common.py: partials [P, B, H, C], merged
by merge_triton's kernel).
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
from mla_jax.ops.mosaic.common import accumulate, interpret_params, smem, wait_for_inputs

HEADS = 64      # heads a program: wgmma's M
_STAGES = 2     # cache tiles in flight


@dataclasses.dataclass(frozen=True)
class HeadsTuning:
  """Launch shape of the many-heads kernel."""

  num_splits: int         # P: pieces of the S axis
  merge: str = "pallas"   # "pallas": merge_triton's kernel; "xla": ops.merge_partials

  def __post_init__(self):
    check_field(self, "num_splits", is_positive_int(self.num_splits), "an integer >= 1")
    check_field(self, "merge", self.merge in MERGES, f"one of {MERGES}")


def choose_splits(B: int, H: int, S: int, num_sms: int) -> int:
  """P pieces so that head blocks × B × P ≈ num_sms (one program an SM), as for few heads, of
  at least two tiles each."""
  return mc.choose_splits(B * pl.cdiv(H, HEADS), S, num_sms, min_tiles=2)


def choose_tuning(B: int, H: int, S: int, *, num_sms: int) -> HeadsTuning:
  return HeadsTuning(num_splits=choose_splits(B, H, S, num_sms))


def unsupported(q_latent, c_kv, k_rope) -> str | None:
  """Why this kernel cannot take these arguments, or None if it can."""
  C = q_latent.shape[2]
  S, R = k_rope.shape[1:]
  dtype = jnp.dtype(q_latent.dtype)
  cache = cache_dtype(c_kv)
  if dtype not in (jnp.bfloat16, jnp.float16) or cache != dtype or k_rope.dtype != dtype:
    return (f"q_latent.dtype={q_latent.dtype}, c_kv.dtype={cache}, "
            f"k_rope.dtype={k_rope.dtype}: with more than {mc.MAX_HEADS} heads the "
            "Mosaic kernel takes bfloat16 or float16, the same for all three")
  if R != mc.TILE:
    return (f"R={R}: with more than {mc.MAX_HEADS} heads R must be {mc.TILE} (p takes "
            "the k_rope tile)")
  if C % 128 or C > 512:
    return (f"C={C}: with more than {mc.MAX_HEADS} heads C must be a multiple of 128 "
            "up to 512 (two value halves, each at most wgmma's N of 256)")
  return mc.rows_unsupported(S)


class _Scratch(NamedTuple):
  q_smem: Any      # [2, HEADS, C/2] q_latent's column halves; stage the output at the end
  qr_smem: Any     # [HEADS, R] q_rope
  c_smem: Any      # [stages, 2, T, C/2] cache tiles, as two column halves
  kr_smem: Any     # [stages, T, R] k_rope tiles; then p [HEADS, T] (R = T)
  alpha_smem: Any  # [stages, HEADS] float32 rescale of each tile
  l_smem: Any      # [HEADS] float32 running sums at the end
  lse_smem: Any    # [HEADS] float32
  q_bar: Any       # the query's copies landed
  tile_bars: Any   # [stages]: a tile's copies landed
  p_bars: Any      # [stages]: p(t) and alpha(t) written
  free_bars: Any   # [stages]: both value halves done with the slot
  l_bar: Any       # l written (and q dead)


def split_kv(q_latent, q_rope, c_kv, k_rope, lengths, *, sm_scale: float, num_splits: int,
             interpret: bool = False):
  """Partials o [P, B, H, C] (q_latent.dtype) and lse [P, B, H] of P = num_splits pieces; H a
  multiple of HEADS (see unsupported() for the rest)."""
  B, H, C = q_latent.shape
  S, R = k_rope.shape[1:]
  dtype, T, Cv = q_latent.dtype, mc.TILE, C // 2
  piece_rows = pl.cdiv(pl.cdiv(S, T), num_splits) * T
  scale_log2 = sm_scale * LOG2E
  row_vector = plgpu.Layout.WGMMA.reduce(1)

  def kernel(lengths_ref,  # [B] int32
             q_ref,        # [B, H, C]
             qr_ref,       # [B, H, R]
             c_ref,        # [B, S, C]
             kr_ref,       # [B, S, R]
             o_ref,        # [P, B, H, C]
             lse_ref,      # [P, B, H]
             *, scratch: _Scratch):
    wait_for_inputs(interpret)
    piece, b, start, end, num_tiles = mc.piece_bounds(lengths_ref, S, piece_rows)
    heads = pl.ds(lax.axis_index("g") * HEADS, HEADS)
    wg = lax.axis_index("wg")
    q_smem, c_smem, kr_smem = scratch.q_smem, scratch.c_smem, scratch.kr_smem

    def fetch(t, slot):
      rows = pl.ds(start + t * T, T)
      for h in range(2):
        plgpu.copy_gmem_to_smem(c_ref.at[b, rows, pl.ds(h * Cv, Cv)], c_smem.at[slot, h],
                                scratch.tile_bars.at[slot])
      plgpu.copy_gmem_to_smem(kr_ref.at[b, rows], kr_smem.at[slot], scratch.tile_bars.at[slot])

    @pl.when(wg == 0)
    def _scores():
      for h in range(2):
        plgpu.copy_gmem_to_smem(q_ref.at[b, heads, pl.ds(h * Cv, Cv)], q_smem.at[h],
                                scratch.q_bar)
      plgpu.copy_gmem_to_smem(qr_ref.at[b, heads], scratch.qr_smem, scratch.q_bar)
      for slot in range(_STAGES - 1):
        pl.when(slot < num_tiles)(functools.partial(fetch, slot, slot))
      plgpu.barrier_wait(scratch.q_bar)

      def step(t, carry):
        m_i, l_i = carry
        slot = lax.rem(t, _STAGES)
        plgpu.barrier_wait(scratch.tile_bars.at[slot])

        def scores(s_ref):
          for h in range(2):
            plgpu.wgmma(s_ref, q_smem.at[h], c_smem.at[slot, h].T)
          plgpu.wgmma(s_ref, scratch.qr_smem, kr_smem.at[slot].T)
          return s_ref[...]

        s = pl.run_scoped(scores, plgpu.ACC((HEADS, T), jnp.float32)) * scale_log2
        col = plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA)
        s = jnp.where(col < end - (start + t * T), s, -jnp.inf)
        m_new = jnp.maximum(m_i, s.max(axis=1))  # finite: every tile run has a valid column
        alpha = jnp.exp2(m_i - m_new)
        p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
        kr_smem.at[slot][...] = p.astype(dtype)
        scratch.alpha_smem.at[slot][...] = alpha
        plgpu.commit_smem()
        plgpu.barrier_arrive(scratch.p_bars.at[slot])

        @pl.when(t + _STAGES - 1 < num_tiles)
        def _refill():  # tile t+STAGES-1 into tile t-1's slot, once both halves are done with it
          slot = lax.rem(t + _STAGES - 1, _STAGES)
          pl.when(t >= 1)(lambda: plgpu.barrier_wait(scratch.free_bars.at[slot]))
          fetch(t + _STAGES - 1, slot)

        return m_new, l_i * alpha + p.sum(axis=1)

      empty = (jnp.full((HEADS,), -jnp.inf, jnp.float32), jnp.zeros((HEADS,), jnp.float32))
      m_i, l_i = lax.fori_loop(0, num_tiles, step,
                               tuple(plgpu.layout_cast(x, row_vector) for x in empty))
      scratch.l_smem[...] = l_i
      plgpu.commit_smem()
      plgpu.barrier_arrive(scratch.l_bar)  # and q is dead: the value halves stage output in it
      for i in range(_STAGES):  # observe the last tiles' completions too (every phase is waited)
        t = num_tiles - _STAGES + i
        pl.when(t >= 0)(lambda t=t: plgpu.barrier_wait(scratch.free_bars.at[lax.rem(t, _STAGES)]))
      nonempty = l_i > 0
      scratch.lse_smem[...] = jnp.where(
          nonempty, (m_i + jnp.log2(jnp.where(nonempty, l_i, 1.0))) * LN2, -jnp.inf)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(scratch.lse_smem, lse_ref.at[piece, b, heads])
      plgpu.wait_smem_to_gmem(0)

    def value_half(h):
      def step(t, acc):
        slot = lax.rem(t, _STAGES)
        plgpu.barrier_wait(scratch.p_bars.at[slot])
        valid_rows = end - (start + t * T)  # the scores have read the tile: p(t) is written
        pl.when(valid_rows < T)(lambda: mc.zero_stale_rows(c_smem.at[slot, h], valid_rows))
        alpha = plgpu.load(scratch.alpha_smem.at[slot], layout=row_vector)
        acc = accumulate(acc * lax.broadcast_in_dim(alpha, acc.shape, [0]),
                         lambda acc_ref: plgpu.wgmma(acc_ref, kr_smem.at[slot],
                                                     c_smem.at[slot, h]),
                         interpret)
        plgpu.barrier_arrive(scratch.free_bars.at[slot])
        return acc

      acc = lax.fori_loop(0, num_tiles, step, plgpu.layout_cast(
          jnp.zeros((HEADS, Cv), jnp.float32), plgpu.Layout.WGMMA))
      plgpu.barrier_wait(scratch.l_bar)
      l_i = plgpu.load(scratch.l_smem, layout=row_vector)
      safe_l = jnp.where(l_i > 0, l_i, 1.0)  # an empty piece: acc = 0, o = 0
      stage = q_smem.at[h]
      stage[...] = (acc / lax.broadcast_in_dim(safe_l, acc.shape, [0])).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(stage, o_ref.at[piece, b, heads, pl.ds(h * Cv, Cv)])
      plgpu.wait_smem_to_gmem(0)

    for h in range(2):
      pl.when(wg == 1 + h)(functools.partial(value_half, h))

  scratch = _Scratch(
      q_smem=smem((2, HEADS, Cv), dtype), qr_smem=smem((HEADS, R), dtype),
      c_smem=smem((_STAGES, 2, T, Cv), dtype), kr_smem=smem((_STAGES, T, R), dtype),
      alpha_smem=plgpu.SMEM((_STAGES, HEADS), jnp.float32),
      l_smem=plgpu.SMEM((HEADS,), jnp.float32), lse_smem=plgpu.SMEM((HEADS,), jnp.float32),
      q_bar=plgpu.Barrier(num_arrivals=3),  # q_latent's two column halves and q_rope
      # a tile's two c_kv column halves and its k_rope
      tile_bars=plgpu.Barrier(num_arrivals=3, num_barriers=_STAGES),
      # warpgroup 0's one arrival once p(t) and alpha(t) are written
      p_bars=plgpu.Barrier(num_arrivals=1, num_barriers=_STAGES),
      # one arrival from each value warpgroup once its half is done with the slot
      free_bars=plgpu.Barrier(num_arrivals=2, num_barriers=_STAGES),
      l_bar=plgpu.Barrier(num_arrivals=1))  # warpgroup 0's, once l is written
  return plgpu.kernel(
      kernel,
      out_type=[jax.ShapeDtypeStruct((num_splits, B, H, C), dtype),
                jax.ShapeDtypeStruct((num_splits, B, H), jnp.float32)],
      grid=(H // HEADS, num_splits, B),
      grid_names=("g", "p", "b"),
      num_threads=3,
      thread_name="wg",
      scratch_types={"scratch": scratch},
      compiler_params=plgpu.CompilerParams(approx_math=True,
                                          lowering_semantics=plgpu.LoweringSemantics.Lane),
      interpret=interpret_params(interpret),
      kernel_name="mla_decode_split_kv_mgpu_heads",
  )(lengths, q_latent, q_rope, c_kv, k_rope)


@functools.partial(jax.jit, static_argnames=("sm_scale", "tuning", "interpret"))
def mla_decode(q_latent, q_rope, c_kv, k_rope, lengths, wv_b=None, *, sm_scale: float,
               tuning: HeadsTuning, interpret: bool = False):
  """out [B,H,C] (or [B,H,V] with wv_b) in q_latent.dtype, lse [B,H]; arguments as
  ops.mla_decode (see unsupported()). Heads are padded to a multiple of HEADS."""
  split = functools.partial(split_kv, sm_scale=sm_scale, num_splits=tuning.num_splits,
                            interpret=interpret)
  return mc.padded_decode(split, q_latent, q_rope, c_kv, k_rope, lengths, wv_b,
                          N=pl.cdiv(q_latent.shape[1], HEADS) * HEADS, merge=tuning.merge,
                          interpret=interpret)
