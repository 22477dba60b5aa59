"""Q8_0 weights as wgmma's A operand in registers, for the Mosaic GPU GEMV (ops/gemv_mgpu.py).

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
- Bytes (0, 2) and (1, 3) of each word become two 16-bit floats, exactly. For bfloat16 this is
  Mosaic GPU's own int8 conversion (prmt, two ands, a packed subtract). For float16, the byte
  with its sign flipped becomes the low 8 bits of a float16 of exponent 10 (1024 + q + 128),
  and a packed subtract of 1152 leaves q.

In interpret mode (on a CPU) the same order is applied with array operations, so CI checks that
the operand, the scales and the output agree. The PTX runs only compiled; the GPU tests check
it.
"""

from __future__ import annotations

import numpy as np

import jax.numpy as jnp
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith, llvm, memref

from mla_jax import quant

ROWS = 64  # the fragment's rows: the program's weight columns
BLOCK = quant.BLOCK
SWIZZLE = 64  # bytes: the int8 tile's rows


def column(rho, ops=np):
  """The weight column behind wgmma row rho < 64: (rho & 48) | (rho & 7) << 1 | (rho >> 3) & 1."""
  return ops.bitwise_or(
      ops.bitwise_or(ops.bitwise_and(rho, 48), ops.left_shift(ops.bitwise_and(rho, 7), 1)),
      ops.bitwise_and(ops.right_shift(rho, 3), 1))


def to_rows(a):
  """a's leading axis (64 weight columns) in the rows' order: row 16a + 8c + b <- column
  16a + 2b + c, as column() computes index by index."""
  return a.reshape(4, 8, 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


def to_columns(a):
  """to_rows' inverse."""
  return a.reshape(4, 2, 8, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


COLUMNS = to_rows(np.arange(ROWS))

# Two bytes of a word (prmt selector) -> two 16-bit floats. A byte b becomes the low byte of a
# 16-bit float whose high byte is fixed, so that b counts units:
# - bfloat16 (Mosaic GPU's int8 conversion): 0x43·· is 128 + (b & 127); the sign bit of b lands
#   in the exponent's lowest bit, and subtracting the bits kept by the second mask (128 or 256)
#   leaves the int8 value;
# - float16: with its sign flipped, b is q + 128; 0x64·· is 1024 + q + 128, less 1152 leaves q.
BF16_HIGH, BF16_KEEP, BF16_SIGN = 0x43, 0xFF7FFF7F, 0xFF80FF80
F16_FLIP, F16_HIGH, F16_BIAS = 0x80808080, 0x64, 0x64806480
_CONVERT = {  # s0-s2: scratch registers
    jnp.dtype(jnp.bfloat16): (f"prmt.b32 s0, $1, {BF16_HIGH:#x}, {{sel}}; "
                              f"and.b32 s1, s0, {BF16_KEEP:#x}; and.b32 s2, s0, {BF16_SIGN:#x}; "
                              "sub.bf16x2 $0, s1, s2;"),
    jnp.dtype(jnp.float16): (f"xor.b32 s1, $1, {F16_FLIP:#x}; prmt.b32 s0, s1, {F16_HIGH:#x}, "
                             f"{{sel}}; mov.b32 s2, {F16_BIAS:#x}; sub.f16x2 $0, s0, s2;"),
}
PAIRS = (0x4240, 0x4341)  # bytes (0, 2), then (1, 3): column n, then n + 1


class _IndexOps:
  """column()'s operations on MLIR index values."""

  def __init__(self):
    self.index = ir.IndexType.get()

  def _value(self, v):
    return v if isinstance(v, ir.Value) else arith.constant(self.index, v)

  def bitwise_or(self, a, b):
    return arith.ori(self._value(a), self._value(b))

  def bitwise_and(self, a, b):
    return arith.andi(self._value(a), self._value(b))

  def left_shift(self, a, n):
    return arith.shli(self._value(a), self._value(n))

  def right_shift(self, a, n):
    return arith.shrui(self._value(a), self._value(n))


def _thread_words(ref):
  """The 4 words of the block [32, 64] (int8, tiled (8, 64), swizzled) this thread loads."""
  i32 = ir.IntegerType.get_signless(32)
  k = lambda v: mgpu_utils.c(v, i32)
  thread = arith.remui(mgpu_utils.thread_idx(), k(128))
  warp, lane = arith.shrui(thread, k(5)), arith.andi(thread, k(31))
  chunk = arith.xori(warp, arith.andi(arith.shrui(lane, k(1)), k(3)))
  row = arith.addi(arith.muli(lane, k(SWIZZLE)), arith.muli(chunk, k(16)))
  address = arith.addi(llvm.ptrtoint(i32, mgpu_utils.memref_ptr(ref)), row)
  words = llvm.inline_asm(
      llvm.StructType.get_literal([i32] * 4), [address],
      "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {$0, $1, $2, $3}, [$4];",
      "=r,=r,=r,=r,r", has_side_effects=True)  # kept after the wait for the chunk's TMA
  return [llvm.extractvalue(i32, words, [j]) for j in range(4)]


def _a_operand_compiled(block_ref, dtype):
  layout = plgpu.Layout.WGMMA
  convert = _CONVERT[jnp.dtype(dtype)]

  @plgpu.inline_mgpu(
      arg_types=(plgpu.RefType((plgpu.TilingTransform((8, SWIZZLE)),
                                plgpu.SwizzleTransform(SWIZZLE))),),
      return_type=plgpu.ShapeDtypeStruct((ROWS, BLOCK), dtype, layout=layout))
  def build(ctx, ref):
    del ctx
    i32 = ir.IntegerType.get_signless(32)
    float_type = mgpu_utils.dtype_to_ir_type(jnp.dtype(dtype))
    shape = mgpu.FragmentedArray.splat(arith.constant(float_type, 0.0), (ROWS, BLOCK),
                                       layout.to_mgpu())
    regs = np.empty_like(shape.registers)
    # WGMMA layout of [64, 32]: register [0, j, 0, 0, i, 0, ...] holds row 16w + 8i + l/4, columns
    # 8j + 2(l % 4) and the next.
    assert regs.shape == (1, 4, 1, 1, 2, 1, 1, 1, 1), regs.shape
    pair_type = ir.VectorType.get((2,), float_type)
    for j, word in enumerate(_thread_words(ref)):
      for i, sel in enumerate(PAIRS):
        pair = llvm.inline_asm(i32, [word], "{ .reg .b32 s<3>; " + convert.format(sel=hex(sel))
                               + " }", "=r,r")
        regs[0, j, 0, 0, i, 0, 0, 0, 0] = mgpu_utils.bitcast(pair, pair_type)
    return mgpu.FragmentedArray(_registers=regs, _layout=shape.layout, _is_signed=None)

  return build(block_ref)


def a_operand(block_ref, dtype, staging=None):
  """wᵀ of the Q8_0 block in `block_ref` (int8 [32, 64] in shared memory, tiled (8, 64) and
  64-byte swizzled) as wgmma's A operand, rows in COLUMNS' order: a [64, 32] array of `dtype` in
  the WGMMA layout. In interpret mode, whose wgmma takes A only from shared memory, the operand
  is written to `staging` (a [64, 32] shared-memory ref), which is returned."""
  if staging is None:
    return _a_operand_compiled(block_ref, dtype)
  staging[...] = to_rows(block_ref[...].astype(dtype).T)
  return staging


def row_scales(d_ref, interpret: bool):
  """A block's float16 scales (d_ref: [64] in shared memory) in the rows' order, as a [64] array
  in the WGMMA row layout."""
  if interpret:
    return to_rows(d_ref[...])
  layout = plgpu.Layout.WGMMA.reduce(1)

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),),
                     return_type=plgpu.ShapeDtypeStruct((ROWS,), d_ref.dtype, layout=layout))
  def load(ctx, ref):
    del ctx
    zero = arith.constant(mgpu_utils.dtype_to_ir_type(d_ref.dtype), 0.0)
    rows = mgpu.FragmentedArray.splat(zero, (ROWS,), layout.to_mgpu())
    return rows.foreach(lambda _, idx: memref.load(ref, [column(idx[0], _IndexOps())]),
                        create_array=True)

  return load(d_ref)


def store_rows(total, y_ref, interpret: bool):
  """y_ref [Bp, 64] (shared memory, not swizzled) = totalᵀ [64 rows, Bp] back in column order,
  in y_ref's dtype."""
  if interpret:
    y_ref[...] = to_columns(total).T.astype(y_ref.dtype)
    return

  @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.RefType()))
  def store(ctx, acc, ref):
    del ctx
    out_type = ir.MemRefType(ref.type).element_type
    acc.foreach(lambda v, idx: memref.store(arith.truncf(out_type, v), ref,
                                            [idx[1], column(idx[0], _IndexOps())]))

  store(total, y_ref)
