"""Q8_0 weights as wgmma's A operand in registers, for the Mosaic GPU GEMV (ops/gemv/mosaic.py).

The GEMV's product is swapped: a block's weights transposed, wᵀ [64 columns, 32 rows], are
wgmma's A operand. Staging the converted block in shared memory for wgmma costs a load, a store
and wgmma's own read per element, which left q8_0 about 1.1 µs of its 5.9 at H=128, K=512, B=1
(docs/batched_gemv.md). A from registers skips the store and the read. wgmma's A fragment holds, per
thread, pairs of elements adjacent along the contraction (the tile's rows), while the int8 tile
in shared memory has its columns contiguous. Mosaic GPU cannot load an 8-bit tile transposed,
so the load is written here:

- `ldmatrix.trans` with 16-bit elements loads a pair of adjacent bytes (two columns) as one
  element, and transposes 8x8 matrices of such pairs. Thread (warp w, lane l) then holds, per
  8 rows k0 of the block, the word [w[k, n], w[k, n+1], w[k+1, n], w[k+1, n+1]] with
  k = k0 + 2(l % 4) and n = 16w + 2(l / 4). One `ldmatrix.x4` loads a block: lane l names the
  address of row l, the 16 bytes of the warp's columns, swizzled as TMA wrote them (64-byte
  swizzle: 16-byte chunk c of row r sits at chunk c ^ ((r / 2) % 4)).
- The fragment's row 16w + 8i + l/4 then holds column n + i. So wgmma row ρ is weight column
  `COLUMNS[ρ]`: within each 16, the even columns, then the odd ones. The block's scales
  (`row_scales`) and the output tile (`store_rows`) follow the same order, so the product
  comes out right.
- Bytes (0, 2) and (1, 3) of each word become two 16-bit floats, exactly (int8_ptx.py: prmt,
  integer ops and a packed subtract).

In interpret mode (on a CPU) the same order is applied with array operations, so CI checks that
the operand, the scales and the output agree. The PTX runs only compiled; the GPU tests check
it.
"""

from __future__ import annotations

import numpy as np

from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith, memref

from mla_jax import quant
from mla_jax.ops.mosaic import int8_ptx

ROWS = 64  # the fragment's rows: the program's weight columns
BLOCK = quant.BLOCK
SWIZZLE = 64  # bytes: the int8 tile's rows


COLUMNS = int8_ptx.to_rows(np.arange(ROWS))  # the weight column behind each fragment row
PAIRS = int8_ptx.COLUMN_PAIRS  # bytes (0, 2), then (1, 3): column n, then n + 1


def _column(rho):
  return int8_ptx.column(rho, int8_ptx.IndexOps())


def thread_words(ref):
  """The 4 words of the 8-bit tile [32, 64] (tiled (8, 64), swizzled) this thread loads: word j
  holds rows 8j + 2(l % 4) and the next, columns 16w + 2(l / 4) and the next."""
  i32 = ir.IntegerType.get_signless(32)
  k = lambda v: mgpu_utils.c(v, i32)
  thread = arith.remui(mgpu_utils.thread_idx(), k(128))
  warp, lane = arith.shrui(thread, k(5)), arith.andi(thread, k(31))
  chunk = arith.xori(warp, arith.andi(arith.shrui(lane, k(1)), k(3)))
  row = arith.addi(arith.muli(lane, k(SWIZZLE)), arith.muli(chunk, k(16)))
  return int8_ptx.ldmatrix_x4(int8_ptx.shared_address(ref, row), trans=True)


def _a_operand_compiled(block_ref, dtype):
  layout = plgpu.Layout.WGMMA

  @plgpu.inline_mgpu(
      arg_types=(plgpu.RefType((plgpu.TilingTransform((8, SWIZZLE)),
                                plgpu.SwizzleTransform(SWIZZLE))),),
      return_type=plgpu.ShapeDtypeStruct((ROWS, BLOCK), dtype, layout=layout))
  def build(ctx, ref):
    del ctx
    regs, fragment_layout = int8_ptx.empty_fragment((ROWS, BLOCK), dtype, layout.to_mgpu())
    # WGMMA layout of [64, 32]: register [0, j, 0, 0, i, 0, ...] holds row 16w + 8i + l/4, columns
    # 8j + 2(l % 4) and the next.
    assert regs.shape == (1, 4, 1, 1, 2, 1, 1, 1, 1), regs.shape
    for j, word in enumerate(thread_words(ref)):
      for i, sel in enumerate(PAIRS):
        regs[0, j, 0, 0, i, 0, 0, 0, 0] = int8_ptx.convert_pair(word, sel, dtype)
    return int8_ptx.fragment(regs, fragment_layout)

  return build(block_ref)


def a_operand(block_ref, dtype, staging=None):
  """wᵀ of the Q8_0 block in `block_ref` (int8 [32, 64] in shared memory, tiled (8, 64) and
  64-byte swizzled) as wgmma's A operand, rows in COLUMNS' order: a [64, 32] array of `dtype` in
  the WGMMA layout. In interpret mode, whose wgmma takes A only from shared memory, the operand
  is written to `staging` (a [64, 32] shared-memory ref), which is returned."""
  if staging is None:
    return _a_operand_compiled(block_ref, dtype)
  staging[...] = int8_ptx.to_rows(block_ref[...].astype(dtype).T)
  return staging


def row_scales(d_ref, interpret: bool):
  """A block's float16 scales (d_ref: [64] in shared memory) in the rows' order, as a [64] array
  in the WGMMA row layout."""
  if interpret:
    return int8_ptx.to_rows(d_ref[...])
  layout = plgpu.Layout.WGMMA.reduce(1)

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),),
                     return_type=plgpu.ShapeDtypeStruct((ROWS,), d_ref.dtype, layout=layout))
  def load(ctx, ref):
    del ctx
    zero = arith.constant(mgpu_utils.dtype_to_ir_type(d_ref.dtype), 0.0)
    rows = mgpu.FragmentedArray.splat(zero, (ROWS,), layout.to_mgpu())
    return rows.foreach(lambda _, idx: memref.load(ref, [_column(idx[0])]),
                        create_array=True)

  return load(d_ref)


def store_rows(total, y_ref, interpret: bool):
  """y_ref [Bp, 64] (shared memory, not swizzled) = totalᵀ [64 rows, Bp] back in column order,
  in y_ref's dtype (16-bit floats, or float32)."""
  if interpret:
    y_ref[...] = int8_ptx.to_columns(total).T.astype(y_ref.dtype)
    return

  @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.RefType()))
  def store(ctx, acc, ref):
    del ctx
    out_type = ir.MemRefType(ref.type).element_type

    def cast(v):  # float32 (split-K partial sums) is stored as it is
      return v if out_type == ir.F32Type.get() else arith.truncf(out_type, v)

    acc.foreach(lambda v, idx: memref.store(cast(v), ref, [idx[1], _column(idx[0])]))

  store(total, y_ref)
