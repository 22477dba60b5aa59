"""Split-KV absorbed MLA decode on Hopper: Pallas with the Mosaic GPU lowering (TMA + wgmma).

Same math as ops/decode_gpu.py (FlashDecoding over the latent cache, DeepSeek-V2 §2.1), laid out
for the tensor cores' warpgroup MMA, whose M is at least 64. With few heads (H ≤ 32) the heads
cannot fill M, so the products are swapped (the "swap AB" of small-batch GEMMs): the cache tile
is the M operand and the heads are N.

  scoresᵀ [T, N]  = c_kv[T, C] · q_latentᵀ[C, N] + k_rope[T, R] · q_ropeᵀ[R, N]
  accᵀ    [C, N] += c_kvᵀ[C, T] · pᵀ[T, N]

Both products read the same shared-memory tile of c_kv (the second through a transposed
descriptor), so the cache is read from HBM once. The softmax runs down the columns of scoresᵀ:
per head, the running max m [N] needs one cross-warp max per tile; the running sum is kept
per element (Lᵀ [T, N], rescaled like acc) and reduced once at the end.

Two schedules run that loop:
- float caches: one warpgroup issues the TMA loads of tile t+stages after it has finished with
  tile t, so `stages` tiles are in flight while it computes;
- int8 caches (quant.Int8Rows, c ≈ d_s·q_s) are warp-specialised, as in FlashAttention-3: a
  converting warpgroup streams int8 half tiles [T, C/2] through TMA and converts them, exactly,
  into one of two shared-memory tiles of the query's dtype (|q_s| ≤ 127 fits 8 significant
  bits), while the computing warpgroup runs the products on the other; mbarriers hand each
  converted tile over and back. d_s scales c_kv's part of the score rows and the probabilities
  pᵀ (ops/decode_gpu.py does the same), never k_rope's part. With one warpgroup doing both, the
  conversion sat on the critical path: on the H200 this schedule is 9% faster
  (docs/decode_gpu.md).

Grid (pieces P, batch B); a program runs only the tiles of its piece below the row's length (none
past it) and writes its partial o [N, C] (in the query's dtype) and lse [N] to [P, B, N, C] and
[P, B, N]; merge_pieces (a small Triton kernel) merges them by log-sum-exp (ops/merge.py has the
math).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import triton as pltriton

from mla_jax import quant
from mla_jax.ops.merge import merge_partials
from mla_jax.ops.mgpu_common import accumulate, interpret_params

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_TILE = 64          # cache rows per tile: the wgmma M
MAX_HEADS = 32     # accᵀ [C, N] float32 lives in registers: 4·N registers a thread at C=512
_STAGES = 2         # tiles in flight: 2 × 72 KiB (bf16, C=512, R=64) is all shared memory allows
# int8: half tiles [T, C/2] in flight, beside the two converted tiles (2 × 64 KiB at C=512):
# 3 × 16 KiB fit with N=16 queries, 2 with N=32.
_HALF_STAGES_INT8 = {16: 3, 32: 2}
_MERGE_PROGRAMS = 128
_MERGE_TILE = 8192  # partial values the merge loads per step
_SMEM_LIMIT = 232448  # bytes of shared memory a program may use on Hopper (sm_90's opt-in maximum)
_SMEM_SLACK = 4096  # Mosaic GPU's alignment padding on top of the buffers (its count, C=1024: 3 KiB)


def _smem_transforms(minor: int, dtype):
  bits = jnp.dtype(dtype).itemsize * 8
  swizzle = plgpu.find_swizzle(minor * bits)
  return (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))


def _smem(shape, dtype):
  """A shared-memory buffer laid out for TMA and wgmma (tiled and swizzled on its minor axis)."""
  return plgpu.SMEM(shape, dtype, transforms=_smem_transforms(shape[-1], dtype))


def _piece(lengths_ref, S: int, piece_rows: int):
  """This program's (piece, b, first row, end row, number of tiles): rows [start, end) of
  sequence b, none at or past its length."""
  piece, b = lax.axis_index("p"), lax.axis_index("b")
  length = jnp.clip(lengths_ref[b], 0, S)
  start = piece * piece_rows
  end = jnp.minimum(length, start + piece_rows)
  return piece, b, start, end, jnp.maximum(pl.cdiv(end - start, _TILE), 0)


def _initial_carry(C: int, N: int):
  """(accᵀ [C, N], m [N], Lᵀ [T, N]) of an empty piece."""
  return (plgpu.layout_cast(jnp.zeros((C, N), jnp.float32), plgpu.Layout.WGMMA),
          plgpu.layout_cast(jnp.full((N,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(0)),
          plgpu.layout_cast(jnp.zeros((_TILE, N), jnp.float32), plgpu.Layout.WGMMA))


def _softmax_step(s, valid_rows, carry):
  """One tile of the online softmax (FlashAttention-2) down the columns of scoresᵀ s [T, N], in
  log2 units; rows >= valid_rows are masked. Returns pᵀ [T, N] and the rescaled carry."""
  acc, m_i, l_part = carry
  row = plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=plgpu.Layout.WGMMA)
  s = jnp.where(row < valid_rows, s, -jnp.inf)
  m_new = jnp.maximum(m_i, s.max(axis=0))  # finite: every tile run has a valid row
  alpha = jnp.exp2(m_i - m_new)
  p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [1]))
  l_part = l_part * lax.broadcast_in_dim(alpha, s.shape, [1]) + p
  acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [1])
  return p, (acc, m_new, l_part)


def _store_transposed(x, smem):
  """x [M, N] (WGMMA layout) into smem [N, M] through a transposed view (WGMMA_TRANSPOSED: a
  shuffle, no shared-memory round trip), so that the buffer keeps M minor and its swizzle."""
  smem.T[...] = plgpu.layout_cast(x.astype(smem.dtype), plgpu.Layout.WGMMA_TRANSPOSED)
  plgpu.commit_smem()


def _write_partial(carry, o_smem, lse_smem, o_dst, lse_dst):
  """o = acc / l and lse = m + log l (natural log) of the piece to o_dst [N, C] and lse_dst [N],
  staged in o_smem [N, C] and lse_smem [N]; an empty piece gives o = 0 and lse = -inf."""
  acc, m_i, l_part = carry
  l_i = l_part.sum(axis=0)
  nonempty = l_i > 0
  safe_l = jnp.where(nonempty, l_i, 1.0)
  lse_smem[...] = jnp.where(nonempty, (m_i + jnp.log2(safe_l)) * _LN2, -jnp.inf)
  _store_transposed(acc / lax.broadcast_in_dim(safe_l, acc.shape, [1]), o_smem)
  plgpu.copy_smem_to_gmem(o_smem, o_dst)
  plgpu.copy_smem_to_gmem(lse_smem, lse_dst)
  plgpu.wait_smem_to_gmem(0)


def split_kv(q_latent, q_rope, c_kv, k_rope, lengths, *, sm_scale: float, num_splits: int,
             stages: int | None = None, interpret: bool = False):
  """Per-piece partials: o_p [P, B, N, C] (normalised within the piece, in the query's dtype)
  and lse_p [P, B, N].

  q_latent [B, N, C] and q_rope [B, N, R] are already padded to N heads (16 or 32);
  k_rope [B, S, R] is bfloat16 or float16 like the query, and so is c_kv [B, S, C] unless it is
  a quant.Int8Rows (then R = 64 and C a multiple of 256: see unsupported()). `stages` (float
  caches) overrides _STAGES. interpret: run in Mosaic GPU's interpret mode (on a CPU).
  """
  if isinstance(c_kv, quant.Int8Rows):
    return _split_kv_int8(q_latent, q_rope, c_kv, k_rope, lengths, sm_scale=sm_scale,
                          num_splits=num_splits, interpret=interpret)
  return _split_kv_float(q_latent, q_rope, c_kv, k_rope, lengths, sm_scale=sm_scale,
                         num_splits=num_splits, stages=stages or _STAGES, interpret=interpret)


def _call(kernel, q_latent, num_splits, operands, scratch, kernel_name, interpret,
          **kernel_args):
  B, N, C = q_latent.shape
  return plgpu.kernel(
      kernel,
      out_type=[jax.ShapeDtypeStruct((num_splits, B, N, C), q_latent.dtype),
                jax.ShapeDtypeStruct((num_splits, B, N), jnp.float32)],
      grid=(num_splits, B),
      grid_names=("p", "b"),
      scratch_types=scratch,
      compiler_params=plgpu.CompilerParams(approx_math=True,
                                          lowering_semantics=plgpu.LoweringSemantics.Lane),
      kernel_name=kernel_name,
      interpret=interpret_params(interpret),
      **kernel_args,
  )(*operands)


def _split_kv_float(q_latent, q_rope, c_kv, k_rope, lengths, *, sm_scale, num_splits, stages,
                    interpret):
  """One warpgroup per program: TMA prefetch `stages` tiles ahead, products, online softmax."""
  B, N, C = q_latent.shape
  S, R = k_rope.shape[1:]
  dtype, T = q_latent.dtype, _TILE
  piece_rows = pl.cdiv(pl.cdiv(S, T), num_splits) * T
  scale_log2 = sm_scale * _LOG2E

  def kernel(lengths_ref, q_ref, qr_ref, c_ref, kr_ref, o_ref, lse_ref,
             q_smem, qr_smem, p_smem, lse_smem, q_bar, tile_bars):
    piece, b, start, end, num_tiles = _piece(lengths_ref, S, piece_rows)
    plgpu.copy_gmem_to_smem(q_ref.at[b], q_smem, q_bar)
    plgpu.copy_gmem_to_smem(qr_ref.at[b], qr_smem, q_bar)

    def tile_loop(c_smem, kr_smem):  # [stages, T, C], [stages, T, R]
      def fetch(t, slot):
        rows = pl.ds(start + t * T, T)
        plgpu.copy_gmem_to_smem(c_ref.at[b, rows], c_smem.at[slot], tile_bars.at[slot])
        plgpu.copy_gmem_to_smem(kr_ref.at[b, rows], kr_smem.at[slot], tile_bars.at[slot])

      for slot in range(stages):
        pl.when(slot < num_tiles)(functools.partial(fetch, slot, slot))
      plgpu.barrier_wait(q_bar)

      def step(t, carry):
        slot = lax.rem(t, stages)
        plgpu.barrier_wait(tile_bars.at[slot])
        c_tile = c_smem.at[slot]

        def scores(s_ref):
          plgpu.wgmma(s_ref, c_tile, q_smem.T)
          plgpu.wgmma(s_ref, kr_smem.at[slot], qr_smem.T)
          return s_ref[...]

        s = pl.run_scoped(scores, plgpu.ACC((T, N), jnp.float32)) * scale_log2
        p, (acc, m_i, l_part) = _softmax_step(s, end - (start + t * T), carry)
        _store_transposed(p, p_smem)  # pᵀ [N, T]: T minor, like c_kv, with the same swizzle
        acc = accumulate(acc, lambda acc_ref: plgpu.wgmma(acc_ref, c_tile.T, p_smem.T),
                          interpret)
        pl.when(t + stages < num_tiles)(lambda: fetch(t + stages, slot))
        return acc, m_i, l_part

      return lax.fori_loop(0, num_tiles, step, _initial_carry(C, N))

    carry = pl.run_scoped(tile_loop, _smem((stages, T, C), dtype), _smem((stages, T, R), dtype))
    _write_partial(carry, q_smem, lse_smem, o_ref.at[piece, b], lse_ref.at[piece, b])

  scratch = [_smem((N, C), dtype), _smem((N, R), dtype), _smem((N, T), dtype),
             plgpu.SMEM((N,), jnp.float32),
             plgpu.Barrier(num_arrivals=2),
             plgpu.Barrier(num_arrivals=2, num_barriers=stages)]
  return _call(kernel, q_latent, num_splits, (lengths, q_latent, q_rope, c_kv, k_rope), scratch,
               "mla_decode_split_kv_mgpu", interpret)


def _split_kv_int8(q_latent, q_rope, c_kv, k_rope, lengths, *, sm_scale, num_splits, interpret):
  """Warpgroup 1 converts int8 half tiles into converted[t % 2]; warpgroup 0 computes on them.

  Per tile t (slot t % 2), the handshakes are mbarriers: `converted_bars` (tile t is ready),
  `consumed_bars` (tile t's products are done, its slot may be overwritten by tile t+2), the TMA
  barriers of the int8 half tiles (converter) and of k_rope and the scales (computer). pᵀ reuses
  the k_rope tile of its slot, dead once the scores are in (this needs R = T), and the output
  is staged in q_smem; that is what makes both converted tiles fit.
  """
  B, N, C = q_latent.shape
  S, R = k_rope.shape[1:]
  dtype, T, half = q_latent.dtype, _TILE, C // 2
  half_stages = _HALF_STAGES_INT8[N]
  piece_rows = pl.cdiv(pl.cdiv(S, T), num_splits) * T
  scale_log2 = sm_scale * _LOG2E

  def kernel(lengths_ref, q_ref, qr_ref, cv_ref, kr_ref, sc_ref, o_ref, lse_ref,
             q_smem, qr_smem, int8_smem, converted, kr_smem, d_smem, lse_smem,
             q_bar, int8_bars, side_bars, converted_bars, consumed_bars):
    piece, b, start, end, num_tiles = _piece(lengths_ref, S, piece_rows)
    warpgroup = lax.axis_index("wg")

    def rows(t):
      return pl.ds(start + t * T, T)

    def fetch_half(k, stage):  # half tile k: the rows of tile k // 2, columns of half k % 2
      cols = pl.ds(lax.rem(k, 2) * half, half)
      plgpu.copy_gmem_to_smem(cv_ref.at[b, rows(lax.div(k, 2)), cols], int8_smem.at[stage],
                              int8_bars.at[stage])

    def fetch_side(t, slot):  # k_rope and the scales of tile t
      plgpu.copy_gmem_to_smem(kr_ref.at[b, rows(t)], kr_smem.at[slot], side_bars.at[slot])
      plgpu.copy_gmem_to_smem(sc_ref.at[b, rows(t)], d_smem.at[slot], side_bars.at[slot])

    @pl.when(warpgroup == 1)
    def _convert():
      for k in range(half_stages):
        pl.when(k < 2 * num_tiles)(functools.partial(fetch_half, k, k))

      @pl.loop(0, num_tiles)
      def _(t):
        slot = lax.rem(t, 2)
        pl.when(t >= 2)(lambda: plgpu.barrier_wait(consumed_bars.at[slot]))
        for h in range(2):
          k = 2 * t + h
          stage = lax.rem(k, half_stages)
          plgpu.barrier_wait(int8_bars.at[stage])
          values = plgpu.load(int8_smem.at[stage], layout=plgpu.Layout.WGMMA_8BIT)
          converted.at[slot, :, pl.ds(h * half, half)][...] = values.astype(dtype)
          plgpu.commit_smem()  # the whole warpgroup has read the stage before TMA refills it
          pl.when(k + half_stages < 2 * num_tiles)(lambda: fetch_half(k + half_stages, stage))
        plgpu.barrier_arrive(converted_bars.at[slot])

      for t in (num_tiles - 2, num_tiles - 1):  # observe the last two tiles' completions too
        pl.when(t >= 0)(lambda t=t: plgpu.barrier_wait(consumed_bars.at[lax.rem(t, 2)]))

    @pl.when(warpgroup == 0)
    def _compute():
      plgpu.copy_gmem_to_smem(q_ref.at[b], q_smem, q_bar)
      plgpu.copy_gmem_to_smem(qr_ref.at[b], qr_smem, q_bar)
      for slot in range(2):
        pl.when(slot < num_tiles)(functools.partial(fetch_side, slot, slot))
      plgpu.barrier_wait(q_bar)

      def step(t, carry):
        slot = lax.rem(t, 2)
        plgpu.barrier_wait(side_bars.at[slot])
        plgpu.barrier_wait(converted_bars.at[slot])
        c_tile, kr_tile = converted.at[slot], kr_smem.at[slot]
        d = lax.broadcast_in_dim(
            plgpu.load(d_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(1)), (T, N), [0])

        def latent_scores(s_ref):
          plgpu.wgmma(s_ref, c_tile, q_smem.T)
          return s_ref[...]

        s = pl.run_scoped(latent_scores, plgpu.ACC((T, N), jnp.float32))
        s = accumulate(s * d, lambda s_ref: plgpu.wgmma(s_ref, kr_tile, qr_smem.T),
                        interpret)  # d_s scales c_kv's part of the scores, not k_rope's
        p, (acc, m_i, l_part) = _softmax_step(s * scale_log2, end - (start + t * T), carry)
        p_smem = kr_tile.at[pl.ds(0, N)]  # pᵀ [N, T] in the k_rope tile: R = T, same swizzle
        _store_transposed(p * d, p_smem)
        acc = accumulate(acc, lambda acc_ref: plgpu.wgmma(acc_ref, c_tile.T, p_smem.T),
                          interpret)
        plgpu.barrier_arrive(consumed_bars.at[slot])
        pl.when(t + 2 < num_tiles)(lambda: fetch_side(t + 2, slot))
        return acc, m_i, l_part

      carry = lax.fori_loop(0, num_tiles, step, _initial_carry(C, N))
      _write_partial(carry, q_smem, lse_smem, o_ref.at[piece, b], lse_ref.at[piece, b])

  scratch = [_smem((N, C), dtype), _smem((N, R), dtype),
             _smem((half_stages, T, half), jnp.int8), _smem((2, T, C), dtype),
             _smem((2, T, R), dtype), plgpu.SMEM((2, T), jnp.float32),
             plgpu.SMEM((N,), jnp.float32),
             plgpu.Barrier(num_arrivals=2),
             plgpu.Barrier(num_arrivals=1, num_barriers=half_stages),
             plgpu.Barrier(num_arrivals=2, num_barriers=2),
             plgpu.Barrier(num_arrivals=1, num_barriers=2),
             plgpu.Barrier(num_arrivals=1, num_barriers=2)]
  operands = (lengths, q_latent, q_rope, c_kv.values, k_rope, c_kv.scales.astype(jnp.float32))
  return _call(kernel, q_latent, num_splits, operands, scratch, "mla_decode_split_kv_mgpu_int8",
               interpret, num_threads=2, thread_name="wg")


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def _merge_kernel(lse_parts_ref,  # [P, block_n]
                  o_parts_ref,    # [P, block_n, block_c]
                  out_ref,        # [block_n, block_c]
                  lse_ref,        # [block_n]
                  *, num_pieces: int, chunk: int):
  """lse = logsumexp_p(lse_p), out = Σ_p exp(lse_p − lse)·o_p, per head (ops/merge.py)."""
  P_pad = _next_pow2(num_pieces)
  lse_p = pltriton.load(lse_parts_ref.at[pl.ds(0, P_pad), :],
                        mask=(jnp.arange(P_pad) < num_pieces)[:, None], other=-jnp.inf)
  m = jnp.max(lse_p, axis=0)
  m = jnp.where(m > -jnp.inf, m, 0.0)
  l = jnp.sum(jnp.exp(lse_p - m[None, :]), axis=0)

  def body(i, acc):
    valid = i * chunk + jnp.arange(chunk) < num_pieces
    rows = pl.ds(i * chunk, chunk)
    w = jnp.exp(pltriton.load(lse_parts_ref.at[rows, :], mask=valid[:, None], other=-jnp.inf)
                - m[None, :])                                            # [chunk, block_n]
    o = pltriton.load(o_parts_ref.at[rows, :, :], mask=valid[:, None, None],
                      other=0.0).astype(jnp.float32)                     # [chunk, block_n, block_c]
    return acc + jnp.sum(w[:, :, None] * o, axis=0)

  acc = jax.lax.fori_loop(0, pl.cdiv(num_pieces, chunk), body,
                          jnp.zeros(o_parts_ref.shape[1:], jnp.float32))
  safe_l = jnp.where(l > 0, l, 1.0)
  out_ref[...] = (acc / safe_l[:, None]).astype(out_ref.dtype)
  lse_ref[...] = jnp.where(l > 0, m + jnp.log(safe_l), -jnp.inf)


def merge_pieces(o_parts, lse_parts, out_dtype, *, interpret: bool = False):
  """[P,B,N,C] and [P,B,N] partials -> out [B,N,C], lse [B,N]: a program per (block_n heads,
  64 columns, b), so that every partial row it reads is contiguous (128 bytes in bf16), with
  heads per program chosen to give about _MERGE_PROGRAMS programs."""
  P, B, N, C = o_parts.shape
  block_c = min(C, 64)
  block_n = min(N, _next_pow2(pl.cdiv(N * (C // block_c) * B, _MERGE_PROGRAMS)))
  chunk = min(_next_pow2(P), max(1, _MERGE_TILE // (block_c * block_n)))
  return pl.pallas_call(
      functools.partial(_merge_kernel, num_pieces=P, chunk=chunk),
      grid=(N // block_n, C // block_c, B),
      in_specs=[pl.BlockSpec((P, None, block_n), lambda n, c, b: (0, b, n)),
                pl.BlockSpec((P, None, block_n, block_c), lambda n, c, b: (0, b, n, c))],
      out_specs=[pl.BlockSpec((None, block_n, block_c), lambda n, c, b: (b, n, c)),
                 pl.BlockSpec((None, block_n), lambda n, c, b: (b, n))],
      out_shape=[jax.ShapeDtypeStruct((B, N, C), out_dtype),
                 jax.ShapeDtypeStruct((B, N), jnp.float32)],
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret,
      name="mla_decode_merge_mgpu",
  )(lse_parts, o_parts)


def unsupported(q_latent, c_kv, k_rope) -> str | None:
  """Why this kernel cannot take these arguments, or None if it can."""
  H, C = q_latent.shape[1:]
  S, R = k_rope.shape[1:]
  dtype = jnp.dtype(q_latent.dtype)
  cache_dtype = jnp.dtype(jnp.int8 if isinstance(c_kv, quant.Int8Rows) else c_kv.dtype)
  if (dtype not in (jnp.bfloat16, jnp.float16) or k_rope.dtype != dtype
      or cache_dtype not in (dtype, jnp.int8)):
    return (f"q_latent.dtype={q_latent.dtype}, c_kv.dtype={cache_dtype}, "
            f"k_rope.dtype={k_rope.dtype}: q_latent and k_rope must be both bfloat16 or both "
            "float16, and c_kv the same or a quant.Int8Rows")
  if H > MAX_HEADS:
    return f"H={H}: at most {MAX_HEADS} heads (the accumulator lives in registers)"
  if C % 64 or R % 16:
    return f"C={C}, R={R}: C must be a multiple of 64 and R of 16 (wgmma tiles)"
  if cache_dtype == jnp.int8 and (R != _TILE or C % 256):
    return (f"C={C}, R={R}: an int8 cache needs R = {_TILE} (pᵀ reuses the k_rope tile) and C a "
            "multiple of 256 (int8 half tiles of 128-column multiples)")
  if S % 8:
    return f"S={S}: the cache length must be a multiple of 8 (TMA tiles)"
  needed = _shared_bytes(_padded_heads(H), C, R, dtype.itemsize, cache_dtype == jnp.int8)
  if needed + _SMEM_SLACK > _SMEM_LIMIT:
    return (f"C={C}, R={R}, H={H}: the buffers need {needed} bytes of shared memory, more than "
            f"the {_SMEM_LIMIT} an SM gives a program")
  return None


def _padded_heads(H: int) -> int:
  """The heads a program computes: 16, or MAX_HEADS."""
  return 16 if H <= 16 else MAX_HEADS


def _shared_bytes(N: int, C: int, R: int, itemsize: int, int8: bool) -> int:
  """Bytes of the shared-memory buffers of _split_kv_float / _split_kv_int8 (queries, lse,
  tiles; the int8 kernel's pᵀ lives in its k_rope tiles, the float kernel's p has its own)."""
  T = _TILE
  queries = N * (C + R) * itemsize + N * 4
  if int8:
    return (queries + _HALF_STAGES_INT8[N] * T * (C // 2) + 2 * T * (C + R) * itemsize
            + 2 * T * 4)
  return queries + N * T * itemsize + _STAGES * T * (C + R) * itemsize


def choose_splits(B: int, S: int, num_sms: int) -> int:
  """P pieces of the S axis: one program per SM (shared memory holds one), so B·P ≈ num_sms,
  with pieces of at least two tiles and no empty trailing piece."""
  tiles = pl.cdiv(S, _TILE)
  P = max(1, min(round(num_sms / B), tiles // 2))
  return pl.cdiv(tiles, pl.cdiv(tiles, P))


@functools.partial(jax.jit, static_argnames=("sm_scale", "num_splits", "merge", "interpret"))
def mla_decode(q_latent, q_rope, c_kv, k_rope, lengths, *, sm_scale: float, num_splits: int,
               merge: str = "pallas", interpret: bool = False):
  """out [B,H,C] in q_latent.dtype, lse [B,H]; arguments as ops.mla_decode (see unsupported())."""
  H = q_latent.shape[1]
  N = _padded_heads(H)
  pad = ((0, 0), (0, N - H), (0, 0))
  o_p, lse_p = split_kv(jnp.pad(q_latent, pad), jnp.pad(q_rope, pad), c_kv, k_rope,
                        lengths.astype(jnp.int32), sm_scale=sm_scale, num_splits=num_splits,
                        interpret=interpret)
  return merge_heads(o_p, lse_p, H, q_latent.dtype, merge=merge, interpret=interpret)


def merge_heads(o_parts, lse_parts, H: int, out_dtype, *, merge: str, interpret: bool = False):
  """The first H heads of the merged partials: out [B,H,C] in out_dtype, lse [B,H]; merge is
  "pallas" (merge_pieces) or "xla" (ops.merge_partials)."""
  if merge == "xla":
    out, lse = merge_partials(o_parts[:, :, :H].astype(jnp.float32), lse_parts[:, :, :H])
    return out.astype(out_dtype), lse
  out, lse = merge_pieces(o_parts, lse_parts, out_dtype, interpret=interpret)
  return out[:, :H], lse[:, :H]
