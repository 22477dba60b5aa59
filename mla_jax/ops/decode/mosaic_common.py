"""What the few-heads Mosaic GPU decode kernels (mosaic.py, mosaic_int8.py) and the many-heads one
(mosaic_heads.py) share: the tiles, the pieces of the S axis and how many there are, the online
softmax down the columns of scoresᵀ, the shape rules of the few-heads layout, the launch, and the
merge of their partials [P, B, N, C]."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from mla_jax.ops.common import TMA_SLOTS, cache_dtype, next_pow2
from mla_jax.ops.decode.merge_triton import MergeLaunch, merge_heads, merge_values
from mla_jax.ops.mosaic.common import interpret_params

TILE = 64  # cache rows per tile: the wgmma M
MAX_HEADS = 32  # few heads: accᵀ [C, N] float32 lives in registers, 4·N registers a thread at C=512
SMEM_LIMIT = 232448  # bytes of shared memory a program may use on Hopper (sm_90's opt-in maximum)
SMEM_SLACK = 4096  # Mosaic GPU's alignment padding on top of the buffers (its count, C=1024: 3 KiB)
_MERGE_PROGRAMS = 128
_MERGE_TILE = 8192  # partial values the merge loads per step


def padded_heads(H: int) -> int:
  """The heads a few-heads program computes: 16, or MAX_HEADS."""
  return 16 if H <= 16 else MAX_HEADS


def choose_splits(B: int, S: int, num_sms: int, *, min_tiles: int = 1) -> int:
  """P pieces of the S axis: one program per SM (shared memory holds one), so B·P ≈ num_sms,
  with pieces of at least min_tiles tiles and no empty trailing piece.

  A few-heads program costs about 6 µs of latency even when its piece is a single tile, so a
  short cache gains from as many pieces as it has tiles: inside a 4-layer V2-Lite absorbed
  step (H100, bf16, B=1) one tile a piece against two took the split from 8.2 to 6.0 µs a layer
  at S=128 and from 8.3 to 6.5 µs at S=2048, the merge 0.2 µs longer; at S=16384 both give 128
  pieces. The many-heads kernel keeps two tiles a piece (min_tiles=2), unmeasured there."""
  tiles = pl.cdiv(S, TILE)
  P = max(1, min(round(num_sms / B), tiles // min_tiles))
  return pl.cdiv(tiles, pl.cdiv(tiles, P))


def few_heads_unsupported(q_latent, c_kv, k_rope) -> str | None:
  """Why the swapped (few heads) layout cannot take these arguments, or None if it can."""
  H, C = q_latent.shape[1:]
  R = k_rope.shape[2]
  dtype = jnp.dtype(q_latent.dtype)
  if (dtype not in (jnp.bfloat16, jnp.float16) or k_rope.dtype != dtype
      or cache_dtype(c_kv) not in (dtype, jnp.int8)):
    return (f"q_latent.dtype={q_latent.dtype}, c_kv.dtype={cache_dtype(c_kv)}, "
            f"k_rope.dtype={k_rope.dtype}: q_latent and k_rope must be both bfloat16 or both "
            "float16, and c_kv the same or a quant.Int8Rows")
  if H > MAX_HEADS:
    return f"H={H}: at most {MAX_HEADS} heads (the accumulator lives in registers)"
  if C % 64 or R % 16:
    return f"C={C}, R={R}: C must be a multiple of 64 and R of 16 (wgmma tiles)"
  return None


def rows_unsupported(S: int) -> str | None:
  """Why TMA cannot load tiles of an S-row cache, or None if it can."""
  if S % TMA_SLOTS:
    return f"S={S}: the cache length must be a multiple of {TMA_SLOTS} (TMA tiles)"
  return None


def smem_unsupported(needed_smem: int, C: int, R: int, H: int) -> str | None:
  """Why buffers of needed_smem bytes do not fit a program's shared memory, or None."""
  if needed_smem + SMEM_SLACK > SMEM_LIMIT:
    return (f"C={C}, R={R}, H={H}: the buffers need {needed_smem} bytes of shared memory, more "
            f"than the {SMEM_LIMIT} an SM gives a program")
  return None


def piece_bounds(lengths_ref, S: int, piece_rows: int):
  """This program's (piece, b, first row, end row, number of tiles): rows [start, end) of
  sequence b, none at or past its length."""
  piece, b = lax.axis_index("p"), lax.axis_index("b")
  length = jnp.clip(lengths_ref[b], 0, S)
  start = piece * piece_rows
  end = jnp.minimum(length, start + piece_rows)
  return piece, b, start, end, jnp.maximum(pl.cdiv(end - start, TILE), 0)


def online_softmax(s, valid_rows, m_i, l_part):
  """One tile of the online softmax (FlashAttention-2) down the columns of scoresᵀ s [T, N], in
  log2 units; rows >= valid_rows are masked. Returns pᵀ [T, N], the rescale alpha [N] of what
  was accumulated so far, and the new m [N] and Lᵀ [T, N]."""
  row = plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=plgpu.Layout.WGMMA)
  s = jnp.where(row < valid_rows, s, -jnp.inf)
  m_new = jnp.maximum(m_i, s.max(axis=0))  # finite: every tile run has a valid row
  alpha = jnp.exp2(m_i - m_new)
  p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [1]))
  return p, alpha, m_new, l_part * lax.broadcast_in_dim(alpha, s.shape, [1]) + p


def zero_stale_rows(tile, valid_rows):
  """Sets rows valid_rows.. of the shared-memory tile [T, W] (W a multiple of 64) to 0, 64
  columns at a time through registers. The value product multiplies every row of a tile by its
  p, and p = 0 times a stale NaN or Inf past a row's length is NaN; only the tile that holds a
  row's end has such rows, so callers run this under pl.when(valid_rows < T), after the tile's
  score product has read it and before its value product does."""
  for j in range(tile.shape[1] // 64):
    block = tile.at[:, pl.ds(j * 64, 64)]
    x = plgpu.load(block, layout=plgpu.Layout.WGMMA)
    row = plgpu.broadcasted_iota(jnp.int32, x.shape, 0, layout=plgpu.Layout.WGMMA)
    block[...] = jnp.where(row < valid_rows, x, jnp.zeros_like(x))
  plgpu.commit_smem()


def rescale(acc, alpha):
  """accᵀ [., N] with column n multiplied by alpha[n]."""
  return acc * lax.broadcast_in_dim(alpha, acc.shape, [1])


def store_transposed(x, ref):
  """x [M, N] (WGMMA layout) into the shared-memory ref [N, M] through a transposed view
  (WGMMA_TRANSPOSED: a shuffle, no shared-memory round trip), so that the buffer keeps M minor
  and its swizzle."""
  ref.T[...] = plgpu.layout_cast(x.astype(ref.dtype), plgpu.Layout.WGMMA_TRANSPOSED)
  plgpu.commit_smem()


def call(kernel, q_latent, num_splits, operands, scratch, kernel_name, interpret, **kernel_args):
  """The split kernel over the grid (pieces P, batch B): partials o_p [P, B, N, C] in the
  query's dtype and lse_p [P, B, N]. kernel(*operand refs, o_ref, lse_ref, *, scratch) gets
  `scratch` (a NamedTuple of buffer types, allocated in field order) as the same NamedTuple of
  refs."""
  B, N, C = q_latent.shape
  return plgpu.kernel(
      kernel,
      out_type=[jax.ShapeDtypeStruct((num_splits, B, N, C), q_latent.dtype),
                jax.ShapeDtypeStruct((num_splits, B, N), jnp.float32)],
      grid=(num_splits, B),
      grid_names=("p", "b"),
      scratch_types={"scratch": scratch},
      compiler_params=plgpu.CompilerParams(approx_math=True,
                                          lowering_semantics=plgpu.LoweringSemantics.Lane),
      kernel_name=kernel_name,
      interpret=interpret_params(interpret),
      **kernel_args,
  )(*operands)


def padded_decode(split_kv, q_latent, q_rope, c_kv, k_rope, lengths, wv_b, *, N: int, merge: str,
                  interpret: bool):
  """out [B,H,C] in q_latent.dtype and lse [B,H] of split_kv(q_latent, q_rope, c_kv, k_rope,
  lengths) run on the query padded to N heads, its partials merged (merge_triton.merge_heads),
  or with wv_b [H,C,V] merged and projected, out [B,H,V] (merge_triton.merge_values); the pad is
  never returned."""
  H = q_latent.shape[1]
  pad = ((0, 0), (0, N - H), (0, 0))
  o_p, lse_p = split_kv(jnp.pad(q_latent, pad), jnp.pad(q_rope, pad), c_kv, k_rope,
                        lengths.astype(jnp.int32))
  if wv_b is not None:
    return merge_values(o_p, lse_p, wv_b, q_latent.dtype, merge=merge, interpret=interpret)
  return merge_heads(o_p, lse_p, H, q_latent.dtype, merge=merge, launch=merge_launch(*o_p.shape),
                     interpret=interpret)


def merge_launch(P: int, B: int, N: int, C: int) -> MergeLaunch:
  """The merge of partials [P, B, N, C]: a program per (block_n heads, 64 columns, b), so that
  every partial row it reads is contiguous (128 bytes in bf16), with heads per program chosen to
  give about _MERGE_PROGRAMS programs."""
  block_c = min(C, 64)
  block_n = min(N, next_pow2(pl.cdiv(N * (C // block_c) * B, _MERGE_PROGRAMS)))
  chunk = min(next_pow2(P), max(1, _MERGE_TILE // (block_c * block_n)))
  return MergeLaunch(heads=N, block_n=block_n, block_c=block_c, chunk=chunk, heads_outer=True,
                     name="mla_decode_merge_mgpu")
