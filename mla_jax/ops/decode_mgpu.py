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

An int8 cache (quant.Int8Rows, c ≈ d_s·q_s) is converted once per tile, exactly, into one
shared-memory tile of the query's dtype (|q_s| ≤ 127 fits 8 significant bits) that both
products read; d_s scales c_kv's part of the score rows and the probabilities pᵀ
(ops/decode_gpu.py does the same), never k_rope's part.

One warpgroup per program issues the TMA loads of tile t+stages after it has finished with tile
t, so `stages` tiles are in flight while it computes. Grid (pieces P, batch B); a program runs
only the tiles of its piece below the row's length (none past it) and writes its partial
oᵀ [C, N] and lse [N] to [P, B, C, N] and [P, B, N]; merge_pieces (a small Triton kernel)
merges them by log-sum-exp (ops/merge.py has the math).
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

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_TILE = 64          # cache rows per tile: the wgmma M
_MAX_HEADS = 32     # accᵀ [C, N] float32 lives in registers: 4·N registers a thread at C=512
_STAGES = 2         # tiles in flight: 2 × 72 KiB (bf16, C=512, R=64) is all shared memory allows
_STAGES_INT8 = 3    # 3 × 40 KiB int8 tiles + the 64 KiB converted tile (N=32 queries: 2 stages)
_MERGE_PROGRAMS = 128
_MERGE_TILE = 8192  # partial values the merge loads per step


def _smem_transforms(minor: int, dtype):
  bits = jnp.dtype(dtype).itemsize * 8
  swizzle = plgpu.find_swizzle(minor * bits)
  return (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))


def split_kv(q_latent, q_rope, c_kv, k_rope, lengths, *, sm_scale: float, num_splits: int,
             stages: int | None = None):
  """Per-piece partials: o_p [P, B, C, N] (normalised within the piece) and lse_p [P, B, N].

  q_latent [B, N, C] and q_rope [B, N, R] are already padded to N heads (a multiple of 16);
  k_rope [B, S, R] is bfloat16 or float16 like the query, and so is c_kv [B, S, C] unless it is
  a quant.Int8Rows. o_p is bfloat16 for bfloat16 (the output is rounded to it anyway), else
  float32.
  """
  B, N, C = q_latent.shape
  S, R = k_rope.shape[1:]
  quantized = isinstance(c_kv, quant.Int8Rows)
  operands = ((c_kv.values, k_rope, c_kv.scales.astype(jnp.float32)) if quantized
              else (c_kv, k_rope))
  dtype = q_latent.dtype
  stages = stages or (_STAGES_INT8 if quantized and N <= 16 else _STAGES)
  partials_dtype = jnp.bfloat16 if dtype == jnp.bfloat16 else jnp.float32
  T = _TILE
  piece_tiles = pl.cdiv(pl.cdiv(S, T), num_splits)
  scale_log2 = sm_scale * _LOG2E

  def kernel(lengths_ref, q_ref, qr_ref, *refs):
    tile_refs = refs[:len(operands)]  # c_kv (values), k_rope (, scales)
    o_ref, lse_ref, q_smem, qr_smem, p_smem, q_bar, tile_bars = refs[len(operands):]
    piece, b = lax.axis_index("p"), lax.axis_index("b")
    length = jnp.clip(lengths_ref[b], 0, S)
    start = piece * (piece_tiles * T)
    end = jnp.minimum(length, start + piece_tiles * T)
    num_tiles = jnp.maximum(pl.cdiv(end - start, T), 0)
    plgpu.copy_gmem_to_smem(q_ref.at[b], q_smem, q_bar)
    plgpu.copy_gmem_to_smem(qr_ref.at[b], qr_smem, q_bar)

    def tile_loop(*buffers):
      """FlashAttention-2 over the piece's tiles: returns (acc [C, N], m [N], Lᵀ [T, N])."""
      tile_smem = buffers[:len(operands)]  # [stages, T, ...] each, like tile_refs
      def fetch(t, slot):
        rows = pl.ds(start + t * T, T)
        for ref, smem in zip(tile_refs, tile_smem):
          plgpu.copy_gmem_to_smem(ref.at[b, rows], smem.at[slot], tile_bars.at[slot])

      for slot in range(stages):
        pl.when(slot < num_tiles)(functools.partial(fetch, slot, slot))
      plgpu.barrier_wait(q_bar)

      def step(t, carry):
        acc, m_i, l_part = carry
        slot = lax.rem(t, stages)
        plgpu.barrier_wait(tile_bars.at[slot])
        c_tile, kr_tile = tile_smem[0].at[slot], tile_smem[1].at[slot]
        if quantized:
          c_tile = buffers[-1]
          c_tile[...] = plgpu.load(tile_smem[0].at[slot],
                                   layout=plgpu.Layout.WGMMA_8BIT).astype(dtype)
          plgpu.commit_smem()
          d = lax.broadcast_in_dim(
              plgpu.load(tile_smem[2].at[slot], layout=plgpu.Layout.WGMMA.reduce(1)), (T, N), [0])

        def rope(s_ref):
          plgpu.wgmma(s_ref, kr_tile, qr_smem.T)

        def scores(s_ref):
          plgpu.wgmma(s_ref, c_tile, q_smem.T)
          if not quantized:
            rope(s_ref)
          return s_ref[...]

        s = pl.run_scoped(scores, plgpu.ACC((T, N), jnp.float32))
        if quantized:  # d_s scales c_kv's part of the scores, not k_rope's
          s = pl.run_state(rope)(plgpu.ACC.init(s * d))
        s = s * scale_log2
        row = plgpu.broadcasted_iota(jnp.int32, (T, N), 0, layout=plgpu.Layout.WGMMA)
        s = jnp.where(row < end - (start + t * T), s, -jnp.inf)
        m_new = jnp.maximum(m_i, s.max(axis=0))  # finite: every tile run has a valid row
        alpha = jnp.exp2(m_i - m_new)
        p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [1]))
        l_part = l_part * lax.broadcast_in_dim(alpha, s.shape, [1]) + p
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [1])
        # pᵀ is stored through a transposed view (WGMMA_TRANSPOSED: a shuffle, no shared memory
        # round trip) so that p_smem [N, T] has T minor, like c_kv, and the same 128-byte swizzle.
        pv = p * d if quantized else p
        p_smem.T[...] = plgpu.layout_cast(pv.astype(dtype), plgpu.Layout.WGMMA_TRANSPOSED)
        plgpu.commit_smem()

        def values(acc_ref):
          plgpu.wgmma(acc_ref, c_tile.T, p_smem.T)

        acc = pl.run_state(values)(plgpu.ACC.init(acc))
        pl.when(t + stages < num_tiles)(lambda: fetch(t + stages, slot))
        return acc, m_new, l_part

      carry = (plgpu.layout_cast(jnp.zeros((C, N), jnp.float32), plgpu.Layout.WGMMA),
               plgpu.layout_cast(jnp.full((N,), -jnp.inf, jnp.float32),
                                 plgpu.Layout.WGMMA.reduce(0)),
               plgpu.layout_cast(jnp.zeros((T, N), jnp.float32), plgpu.Layout.WGMMA))
      return lax.fori_loop(0, num_tiles, step, carry)

    # The tile buffers' scope closes before the output's opens, so they share shared memory.
    tile_buffers = [plgpu.SMEM((stages, T, C), operands[0].dtype,
                               transforms=_smem_transforms(C, operands[0].dtype)),
                    plgpu.SMEM((stages, T, R), dtype, transforms=_smem_transforms(R, dtype))]
    if quantized:  # the scales, then the converted tile
      tile_buffers += [plgpu.SMEM((stages, T), jnp.float32),
                       plgpu.SMEM((T, C), dtype, transforms=_smem_transforms(C, dtype))]
    acc, m_i, l_part = pl.run_scoped(tile_loop, *tile_buffers)
    l_i = l_part.sum(axis=0)
    nonempty = l_i > 0
    safe_l = jnp.where(nonempty, l_i, 1.0)
    o = acc / lax.broadcast_in_dim(safe_l, acc.shape, [1])
    lse = jnp.where(nonempty, (m_i + jnp.log2(safe_l)) * _LN2, -jnp.inf)

    def write(o_smem, lse_smem):
      o_smem[...] = o.astype(o_smem.dtype)
      lse_smem[...] = lse
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem, o_ref.at[piece, b])
      plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[piece, b])
      plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(write, plgpu.SMEM((C, N), partials_dtype), plgpu.SMEM((N,), jnp.float32))

  scratch = [
      plgpu.SMEM((N, C), dtype, transforms=_smem_transforms(C, dtype)),
      plgpu.SMEM((N, R), dtype, transforms=_smem_transforms(R, dtype)),
      plgpu.SMEM((N, T), dtype, transforms=_smem_transforms(T, dtype)),
      plgpu.Barrier(num_arrivals=2),
      plgpu.Barrier(num_arrivals=len(operands), num_barriers=stages),
  ]
  return plgpu.kernel(
      kernel,
      out_type=[jax.ShapeDtypeStruct((num_splits, B, C, N), partials_dtype),
                jax.ShapeDtypeStruct((num_splits, B, N), jnp.float32)],
      grid=(num_splits, B),
      grid_names=("p", "b"),
      scratch_types=scratch,
      compiler_params=plgpu.CompilerParams(approx_math=True,
                                          lowering_semantics=plgpu.LoweringSemantics.Lane),
      kernel_name="mla_decode_split_kv_mgpu",
  )(lengths, q_latent, q_rope, *operands)


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def _merge_kernel(lse_parts_ref,  # [P, N]
                  o_parts_ref,    # [P, block_c, N]
                  out_ref,        # [N, block_c]
                  lse_ref,        # [N]
                  *, num_pieces: int, chunk: int):
  """lse = logsumexp_p(lse_p), out = Σ_p exp(lse_p − lse)·o_p, per head column (ops/merge.py);
  the [block_c, N] sum is written transposed, as out [N, block_c]."""
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
                - m[None, :])                                                  # [chunk, N]
    o = pltriton.load(o_parts_ref.at[rows, :, :], mask=valid[:, None, None],
                      other=0.0).astype(jnp.float32)                           # [chunk, block_c, N]
    return acc + jnp.sum(w[:, None, :] * o, axis=0)

  block_c, N = o_parts_ref.shape[1:]
  acc = jax.lax.fori_loop(0, pl.cdiv(num_pieces, chunk), body,
                          jnp.zeros((block_c, N), jnp.float32))
  safe_l = jnp.where(l > 0, l, 1.0)
  out_ref[...] = (acc / safe_l[None, :]).T.astype(out_ref.dtype)
  lse_ref[...] = jnp.where(l > 0, m + jnp.log(safe_l), -jnp.inf)


def merge_pieces(o_parts, lse_parts, out_dtype, *, interpret: bool = False):
  """[P,B,C,N] and [P,B,N] partials -> out [B,N,C], lse [B,N]: one program per (B, C columns)."""
  P, B, C, N = o_parts.shape
  block_c = min(C, 128, max(4, _next_pow2(pl.cdiv(C * B, _MERGE_PROGRAMS))))
  chunk = min(_next_pow2(P), max(1, _MERGE_TILE // (block_c * N)))
  return pl.pallas_call(
      functools.partial(_merge_kernel, num_pieces=P, chunk=chunk),
      grid=(C // block_c, B),
      in_specs=[pl.BlockSpec((P, None, N), lambda c, b: (0, b, 0)),
                pl.BlockSpec((P, None, block_c, N), lambda c, b: (0, b, c, 0))],
      out_specs=[pl.BlockSpec((None, N, block_c), lambda c, b: (b, 0, c)),
                 pl.BlockSpec((None, N), lambda c, b: (b, 0))],
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
  if H > _MAX_HEADS:
    return f"H={H}: at most {_MAX_HEADS} heads (the accumulator lives in registers)"
  if C % 64 or R % 16:
    return f"C={C}, R={R}: C must be a multiple of 64 and R of 16 (wgmma tiles)"
  if S % 8:
    return f"S={S}: the cache length must be a multiple of 8 (TMA tiles)"
  return None


def choose_splits(B: int, S: int, num_sms: int) -> int:
  """P pieces of the S axis: one program per SM (shared memory holds one), so B·P ≈ num_sms,
  with pieces of at least two tiles and no empty trailing piece."""
  tiles = pl.cdiv(S, _TILE)
  P = max(1, min(round(num_sms / B), tiles // 2))
  return pl.cdiv(tiles, pl.cdiv(tiles, P))


@functools.partial(jax.jit, static_argnames=("sm_scale", "num_splits", "merge"))
def mla_decode(q_latent, q_rope, c_kv, k_rope, lengths, *, sm_scale: float, num_splits: int,
               merge: str = "pallas"):
  """out [B,H,C] in q_latent.dtype, lse [B,H]; arguments as ops.mla_decode (see unsupported())."""
  B, H, C = q_latent.shape
  N = 16 if H <= 16 else _MAX_HEADS
  pad = ((0, 0), (0, N - H), (0, 0))
  o_p, lse_p = split_kv(jnp.pad(q_latent, pad), jnp.pad(q_rope, pad), c_kv, k_rope,
                        lengths.astype(jnp.int32), sm_scale=sm_scale, num_splits=num_splits)
  if merge == "xla":
    out, lse = merge_partials(jnp.swapaxes(o_p, 2, 3)[:, :, :H].astype(jnp.float32),
                              lse_p[:, :, :H])
    return out.astype(q_latent.dtype), lse
  out, lse = merge_pieces(o_p, lse_p, q_latent.dtype)
  return out[:, :H], lse[:, :H]
