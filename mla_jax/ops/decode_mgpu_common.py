"""What the few-heads Mosaic GPU decode kernels (ops/decode_mgpu.py, ops/decode_mgpu_int8.py) and
the many-heads one (ops/decode_mgpu_heads.py) share: the tiles, the pieces of the S axis, the
online softmax down the columns of scoresᵀ, and the launch."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from mla_jax.ops.mgpu_common import interpret_params

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
TILE = 64  # cache rows per tile: the wgmma M
SMEM_LIMIT = 232448  # bytes of shared memory a program may use on Hopper (sm_90's opt-in maximum)
SMEM_SLACK = 4096  # Mosaic GPU's alignment padding on top of the buffers (its count, C=1024: 3 KiB)


def smem_transforms(minor: int, dtype):
  bits = jnp.dtype(dtype).itemsize * 8
  swizzle = plgpu.find_swizzle(minor * bits)
  return (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))


def smem(shape, dtype):
  """A shared-memory buffer laid out for TMA and wgmma (tiled and swizzled on its minor axis)."""
  return plgpu.SMEM(shape, dtype, transforms=smem_transforms(shape[-1], dtype))


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
  query's dtype and lse_p [P, B, N]."""
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
