"""Split-KV absorbed MLA decode on Hopper for many heads (H > 32, DeepSeek-V3's 128): Pallas with
the Mosaic GPU lowering, heads as wgmma's M, three warpgroups.

ops/decode_mgpu.py swaps the products because a few heads cannot fill wgmma's M of 64. With many
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
pieces and the merge are decode_mgpu's (partials [P, B, H, C], merge_pieces).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from mla_jax import quant
from mla_jax.ops import decode_mgpu
from mla_jax.ops.decode_mgpu_common import LN2, LOG2E, TILE, piece_bounds, smem
from mla_jax.ops.mgpu_common import accumulate, interpret_params

HEADS = 64      # heads a program: wgmma's M
_STAGES = 2     # cache tiles in flight


def unsupported(q_latent, c_kv, k_rope) -> str | None:
  """Why this kernel cannot take these arguments, or None if it can."""
  C = q_latent.shape[2]
  S, R = k_rope.shape[1:]
  dtype = jnp.dtype(q_latent.dtype)
  cache_dtype = jnp.dtype(jnp.int8 if isinstance(c_kv, quant.Int8Rows) else c_kv.dtype)
  if dtype not in (jnp.bfloat16, jnp.float16) or cache_dtype != dtype or k_rope.dtype != dtype:
    return (f"q_latent.dtype={q_latent.dtype}, c_kv.dtype={cache_dtype}, "
            f"k_rope.dtype={k_rope.dtype}: with more than {decode_mgpu.MAX_HEADS} heads the "
            "Mosaic kernel takes bfloat16 or float16, the same for all three")
  if R != TILE:
    return (f"R={R}: with more than {decode_mgpu.MAX_HEADS} heads R must be {TILE} (p takes "
            "the k_rope tile)")
  if C % 128 or C > 512:
    return (f"C={C}: with more than {decode_mgpu.MAX_HEADS} heads C must be a multiple of 128 "
            "up to 512 (two value halves, each at most wgmma's N of 256)")
  if S % 8:
    return f"S={S}: the cache length must be a multiple of 8 (TMA tiles)"
  return None


def split_kv(q_latent, q_rope, c_kv, k_rope, lengths, *, sm_scale: float, num_splits: int,
             interpret: bool = False):
  """Partials o [P, B, H, C] (q_latent.dtype) and lse [P, B, H] of P = num_splits pieces; H a
  multiple of HEADS (see unsupported() for the rest)."""
  B, H, C = q_latent.shape
  S, R = k_rope.shape[1:]
  dtype, T, Cv = q_latent.dtype, TILE, C // 2
  piece_rows = pl.cdiv(pl.cdiv(S, T), num_splits) * T
  scale_log2 = sm_scale * LOG2E
  row_vector = plgpu.Layout.WGMMA.reduce(1)

  def kernel(lengths_ref, q_ref, qr_ref, c_ref, kr_ref, o_ref, lse_ref,
             q_smem, qr_smem, c_smem, kr_smem, alpha_smem, l_smem, lse_smem,
             q_bar, tile_bars, p_bars, free_bars, l_bar):
    piece, b, start, end, num_tiles = piece_bounds(lengths_ref, S, piece_rows)
    heads = pl.ds(lax.axis_index("g") * HEADS, HEADS)
    wg = lax.axis_index("wg")

    def fetch(t, slot):
      rows = pl.ds(start + t * T, T)
      for h in range(2):
        plgpu.copy_gmem_to_smem(c_ref.at[b, rows, pl.ds(h * Cv, Cv)], c_smem.at[slot, h],
                                tile_bars.at[slot])
      plgpu.copy_gmem_to_smem(kr_ref.at[b, rows], kr_smem.at[slot], tile_bars.at[slot])

    @pl.when(wg == 0)
    def _scores():
      for h in range(2):
        plgpu.copy_gmem_to_smem(q_ref.at[b, heads, pl.ds(h * Cv, Cv)], q_smem.at[h], q_bar)
      plgpu.copy_gmem_to_smem(qr_ref.at[b, heads], qr_smem, q_bar)
      for slot in range(_STAGES - 1):
        pl.when(slot < num_tiles)(functools.partial(fetch, slot, slot))
      plgpu.barrier_wait(q_bar)

      def step(t, carry):
        m_i, l_i = carry
        slot = lax.rem(t, _STAGES)
        plgpu.barrier_wait(tile_bars.at[slot])

        def scores(s_ref):
          for h in range(2):
            plgpu.wgmma(s_ref, q_smem.at[h], c_smem.at[slot, h].T)
          plgpu.wgmma(s_ref, qr_smem, kr_smem.at[slot].T)
          return s_ref[...]

        s = pl.run_scoped(scores, plgpu.ACC((HEADS, T), jnp.float32)) * scale_log2
        col = plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA)
        s = jnp.where(col < end - (start + t * T), s, -jnp.inf)
        m_new = jnp.maximum(m_i, s.max(axis=1))  # finite: every tile run has a valid column
        alpha = jnp.exp2(m_i - m_new)
        p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
        kr_smem.at[slot][...] = p.astype(dtype)
        alpha_smem.at[slot][...] = alpha
        plgpu.commit_smem()
        plgpu.barrier_arrive(p_bars.at[slot])

        @pl.when(t + _STAGES - 1 < num_tiles)
        def _refill():  # tile t+STAGES-1 into tile t-1's slot, once both halves are done with it
          slot = lax.rem(t + _STAGES - 1, _STAGES)
          pl.when(t >= 1)(lambda: plgpu.barrier_wait(free_bars.at[slot]))
          fetch(t + _STAGES - 1, slot)

        return m_new, l_i * alpha + p.sum(axis=1)

      empty = (jnp.full((HEADS,), -jnp.inf, jnp.float32), jnp.zeros((HEADS,), jnp.float32))
      m_i, l_i = lax.fori_loop(0, num_tiles, step,
                               tuple(plgpu.layout_cast(x, row_vector) for x in empty))
      l_smem[...] = l_i
      plgpu.commit_smem()
      plgpu.barrier_arrive(l_bar)  # and q is dead: the value halves stage their output in it
      for i in range(_STAGES):  # observe the last tiles' completions too (every phase is waited)
        t = num_tiles - _STAGES + i
        pl.when(t >= 0)(lambda t=t: plgpu.barrier_wait(free_bars.at[lax.rem(t, _STAGES)]))
      nonempty = l_i > 0
      lse_smem[...] = jnp.where(nonempty, (m_i + jnp.log2(jnp.where(nonempty, l_i, 1.0))) * LN2,
                                -jnp.inf)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[piece, b, heads])
      plgpu.wait_smem_to_gmem(0)

    def value_half(h):
      def step(t, acc):
        slot = lax.rem(t, _STAGES)
        plgpu.barrier_wait(p_bars.at[slot])
        alpha = plgpu.load(alpha_smem.at[slot], layout=row_vector)
        acc = accumulate(acc * lax.broadcast_in_dim(alpha, acc.shape, [0]),
                          lambda acc_ref: plgpu.wgmma(acc_ref, kr_smem.at[slot],
                                                      c_smem.at[slot, h]),
                          interpret)
        plgpu.barrier_arrive(free_bars.at[slot])
        return acc

      acc = lax.fori_loop(0, num_tiles, step, plgpu.layout_cast(
          jnp.zeros((HEADS, Cv), jnp.float32), plgpu.Layout.WGMMA))
      plgpu.barrier_wait(l_bar)
      l_i = plgpu.load(l_smem, layout=row_vector)
      safe_l = jnp.where(l_i > 0, l_i, 1.0)  # an empty piece: acc = 0, o = 0
      stage = q_smem.at[h]
      stage[...] = (acc / lax.broadcast_in_dim(safe_l, acc.shape, [0])).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(stage, o_ref.at[piece, b, heads, pl.ds(h * Cv, Cv)])
      plgpu.wait_smem_to_gmem(0)

    for h in range(2):
      pl.when(wg == 1 + h)(functools.partial(value_half, h))

  scratch = [smem((2, HEADS, Cv), dtype), smem((HEADS, R), dtype),
             smem((_STAGES, 2, T, Cv), dtype), smem((_STAGES, T, R), dtype),
             plgpu.SMEM((_STAGES, HEADS), jnp.float32), plgpu.SMEM((HEADS,), jnp.float32),
             plgpu.SMEM((HEADS,), jnp.float32),
             plgpu.Barrier(num_arrivals=3),                           # q: 3 copies
             plgpu.Barrier(num_arrivals=3, num_barriers=_STAGES),     # a tile: 3 copies
             plgpu.Barrier(num_arrivals=1, num_barriers=_STAGES),     # p(t) written
             plgpu.Barrier(num_arrivals=2, num_barriers=_STAGES),     # both halves done
             plgpu.Barrier(num_arrivals=1)]                           # l written, q dead
  return plgpu.kernel(
      kernel,
      out_type=[jax.ShapeDtypeStruct((num_splits, B, H, C), dtype),
                jax.ShapeDtypeStruct((num_splits, B, H), jnp.float32)],
      grid=(H // HEADS, num_splits, B),
      grid_names=("g", "p", "b"),
      num_threads=3,
      thread_name="wg",
      scratch_types=scratch,
      compiler_params=plgpu.CompilerParams(approx_math=True,
                                          lowering_semantics=plgpu.LoweringSemantics.Lane),
      interpret=interpret_params(interpret),
      kernel_name="mla_decode_split_kv_mgpu_heads",
  )(lengths, q_latent, q_rope, c_kv, k_rope)


def choose_splits(B: int, H: int, S: int, num_sms: int) -> int:
  """P pieces so that head blocks × B × P ≈ num_sms (one program an SM), as decode_mgpu."""
  return decode_mgpu.choose_splits(B * pl.cdiv(H, HEADS), S, num_sms)


@functools.partial(jax.jit, static_argnames=("sm_scale", "num_splits", "merge", "interpret"))
def mla_decode(q_latent, q_rope, c_kv, k_rope, lengths, *, sm_scale: float, num_splits: int,
               merge: str = "pallas", interpret: bool = False):
  """out [B,H,C] in q_latent.dtype, lse [B,H]; arguments as ops.mla_decode (see unsupported()).
  Heads are padded to a multiple of HEADS; the pad is never returned."""
  H = q_latent.shape[1]
  pad = ((0, 0), (0, pl.cdiv(H, HEADS) * HEADS - H), (0, 0))
  o_p, lse_p = split_kv(jnp.pad(q_latent, pad), jnp.pad(q_rope, pad), c_kv, k_rope,
                        lengths.astype(jnp.int32), sm_scale=sm_scale, num_splits=num_splits,
                        interpret=interpret)
  return decode_mgpu.merge_heads(o_p, lse_p, H, q_latent.dtype, merge=merge, interpret=interpret)
