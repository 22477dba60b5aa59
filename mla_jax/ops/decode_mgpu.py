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
- int8 caches (quant.Int8Rows) run ops/decode_mgpu_int8.py: two warpgroups, an int8 product for
  the scores and the tile converted in registers for the values.

Grid (pieces P, batch B); a program runs only the tiles of its piece below the row's length (none
past it) and writes its partial o [N, C] (in the query's dtype) and lse [N] to [P, B, N, C] and
[P, B, N]; merge_pieces (a small Triton kernel) merges them by log-sum-exp (ops/merge.py has the
math).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import triton as pltriton

from mla_jax import quant
from mla_jax.ops import decode_mgpu_int8
from mla_jax.ops.decode_mgpu_common import (LN2, LOG2E, SMEM_LIMIT, SMEM_SLACK, TILE, call,
                                            online_softmax, piece_bounds, rescale, smem,
                                            store_transposed)
from mla_jax.ops.merge import merge_partials
from mla_jax.ops.mgpu_common import accumulate

MAX_HEADS = 32     # accᵀ [C, N] float32 lives in registers: 4·N registers a thread at C=512
_STAGES = 2         # tiles in flight: 2 × 72 KiB (bf16, C=512, R=64) is all shared memory allows
_MERGE_PROGRAMS = 128
_MERGE_TILE = 8192  # partial values the merge loads per step


def _initial_carry(C: int, N: int):
  """(accᵀ [C, N], m [N], Lᵀ [T, N]) of an empty piece."""
  return (plgpu.layout_cast(jnp.zeros((C, N), jnp.float32), plgpu.Layout.WGMMA),
          plgpu.layout_cast(jnp.full((N,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(0)),
          plgpu.layout_cast(jnp.zeros((TILE, N), jnp.float32), plgpu.Layout.WGMMA))


def _softmax_step(s, valid_rows, carry):
  """online_softmax, with accᵀ rescaled: pᵀ and the new (accᵀ, m, Lᵀ)."""
  acc, m_i, l_part = carry
  p, alpha, m_i, l_part = online_softmax(s, valid_rows, m_i, l_part)
  return p, (rescale(acc, alpha), m_i, l_part)


def _write_partial(carry, o_smem, lse_smem, o_dst, lse_dst):
  """o = acc / l and lse = m + log l (natural log) of the piece to o_dst [N, C] and lse_dst [N],
  staged in o_smem [N, C] and lse_smem [N]; an empty piece gives o = 0 and lse = -inf."""
  acc, m_i, l_part = carry
  l_i = l_part.sum(axis=0)
  nonempty = l_i > 0
  safe_l = jnp.where(nonempty, l_i, 1.0)
  lse_smem[...] = jnp.where(nonempty, (m_i + jnp.log2(safe_l)) * LN2, -jnp.inf)
  store_transposed(acc / lax.broadcast_in_dim(safe_l, acc.shape, [1]), o_smem)
  plgpu.copy_smem_to_gmem(o_smem, o_dst)
  plgpu.copy_smem_to_gmem(lse_smem, lse_dst)
  plgpu.wait_smem_to_gmem(0)


def split_kv(q_latent, q_rope, c_kv, k_rope, lengths, *, sm_scale: float, num_splits: int,
             stages: int | None = None, interpret: bool = False):
  """Per-piece partials: o_p [P, B, N, C] (normalised within the piece, in the query's dtype)
  and lse_p [P, B, N].

  q_latent [B, N, C] and q_rope [B, N, R] are already padded to N heads (16 or 32);
  k_rope [B, S, R] is bfloat16 or float16 like the query, and so is c_kv [B, S, C] unless it is
  a quant.Int8Rows (then R = 64 and C a multiple of 128: see unsupported()). `stages`
  overrides the tiles in flight (_STAGES; decode_mgpu_int8.choose_stages for int8). interpret: run in
  Mosaic GPU's interpret mode (on a CPU).
  """
  if isinstance(c_kv, quant.Int8Rows):
    return decode_mgpu_int8.split_kv(q_latent, q_rope, c_kv, k_rope, lengths,
                                     sm_scale=sm_scale, num_splits=num_splits, stages=stages,
                                     interpret=interpret)
  return _split_kv_float(q_latent, q_rope, c_kv, k_rope, lengths, sm_scale=sm_scale,
                         num_splits=num_splits, stages=stages or _STAGES, interpret=interpret)


def _split_kv_float(q_latent, q_rope, c_kv, k_rope, lengths, *, sm_scale, num_splits, stages,
                    interpret):
  """One warpgroup per program: TMA prefetch `stages` tiles ahead, products, online softmax."""
  B, N, C = q_latent.shape
  S, R = k_rope.shape[1:]
  dtype, T = q_latent.dtype, TILE
  piece_rows = pl.cdiv(pl.cdiv(S, T), num_splits) * T
  scale_log2 = sm_scale * LOG2E

  def kernel(lengths_ref, q_ref, qr_ref, c_ref, kr_ref, o_ref, lse_ref,
             q_smem, qr_smem, p_smem, lse_smem, q_bar, tile_bars):
    piece, b, start, end, num_tiles = piece_bounds(lengths_ref, S, piece_rows)
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
        store_transposed(p, p_smem)  # pᵀ [N, T]: T minor, like c_kv, with the same swizzle
        acc = accumulate(acc, lambda acc_ref: plgpu.wgmma(acc_ref, c_tile.T, p_smem.T),
                          interpret)
        pl.when(t + stages < num_tiles)(lambda: fetch(t + stages, slot))
        return acc, m_i, l_part

      return lax.fori_loop(0, num_tiles, step, _initial_carry(C, N))

    carry = pl.run_scoped(tile_loop, smem((stages, T, C), dtype), smem((stages, T, R), dtype))
    _write_partial(carry, q_smem, lse_smem, o_ref.at[piece, b], lse_ref.at[piece, b])

  scratch = [smem((N, C), dtype), smem((N, R), dtype), smem((N, T), dtype),
             plgpu.SMEM((N,), jnp.float32),
             plgpu.Barrier(num_arrivals=2),
             plgpu.Barrier(num_arrivals=2, num_barriers=stages)]
  return call(kernel, q_latent, num_splits, (lengths, q_latent, q_rope, c_kv, k_rope), scratch,
               "mla_decode_split_kv_mgpu", interpret)


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
  if cache_dtype == jnp.int8 and (R != TILE or C % 128):
    return (f"C={C}, R={R}: an int8 cache needs R = {TILE} (pᵀ reuses the k_rope tile) and C a "
            "multiple of 128 (the int8 product's K steps)")
  if S % 8:
    return f"S={S}: the cache length must be a multiple of 8 (TMA tiles)"
  N = _padded_heads(H)
  if cache_dtype == jnp.int8:
    needed = decode_mgpu_int8.shared_bytes(N, C, R, dtype.itemsize, stages=1)
  else:
    needed = _shared_bytes(N, C, R, dtype.itemsize)
  if needed + SMEM_SLACK > SMEM_LIMIT:
    return (f"C={C}, R={R}, H={H}: the buffers need {needed} bytes of shared memory, more than "
            f"the {SMEM_LIMIT} an SM gives a program")
  return None


def _padded_heads(H: int) -> int:
  """The heads a program computes: 16, or MAX_HEADS."""
  return 16 if H <= 16 else MAX_HEADS


def _shared_bytes(N: int, C: int, R: int, itemsize: int) -> int:
  """Bytes of _split_kv_float's shared-memory buffers (queries, lse, p, tiles)."""
  T = TILE
  return N * (C + R) * itemsize + N * 4 + N * T * itemsize + _STAGES * T * (C + R) * itemsize


def choose_splits(B: int, S: int, num_sms: int) -> int:
  """P pieces of the S axis: one program per SM (shared memory holds one), so B·P ≈ num_sms,
  with pieces of at least two tiles and no empty trailing piece."""
  tiles = pl.cdiv(S, TILE)
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
