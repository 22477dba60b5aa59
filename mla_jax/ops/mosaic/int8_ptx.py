"""int8 data into wgmma's A operand registers, in PTX for Mosaic GPU kernels.

Mosaic GPU cannot load an 8-bit tile transposed, nor convert it in an arbitrary register order,
so the kernels that take int8 A operands from registers (q8_0_registers.py for the GEMV,
int8_cache_registers.py for the decode's values) emit two things here:

- `ldmatrix_x4`: one warp loads four 8x8 matrices of 16-bit elements from shared memory (lane l
  names the address of row l % 8 of matrix l // 8). With int8 data each 16-bit element is a
  pair of adjacent bytes. Lane l receives, of each matrix, the word at row l / 4, elements
  2(l % 4) and the next: 4 bytes of one row; with `.trans`, the matrix is transposed first, so
  the word holds [x[r, c], x[r, c+1], x[r+1, c], x[r+1, c+1]] with r = 2(l % 4), c = 2(l / 4).
- `convert_pair`: two bytes of a word (a prmt selector) become two 16-bit floats, exactly. A
  byte b becomes the low byte of a 16-bit float whose high byte is fixed, so that b counts
  units:
  - bfloat16 (Mosaic GPU's own int8 conversion): 0x43·· is 128 + (b & 127); the sign bit of b
    lands in the exponent's lowest bit, and subtracting the bits kept by the second mask (128
    or 256) leaves the int8 value;
  - float16: with its sign flipped, b is q + 128; 0x64·· is 1024 + q + 128, less 1152 leaves q.

A transposed load puts two columns of the data (c and c+1) in one lane's word. Taken apart by
`COLUMN_PAIRS`, they land in the fragment's rows 8 apart, so that fragment row ρ holds data
column `column(ρ)`: within each 16, the even columns, then the odd ones. `to_rows` and
`to_columns` apply that order to arrays (interpret mode, tests), `column` index by index
(compiled code, with `IndexOps`).
"""

from __future__ import annotations

import numpy as np

import jax.numpy as jnp
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith, llvm

BF16_HIGH, BF16_KEEP, BF16_SIGN = 0x43, 0xFF7FFF7F, 0xFF80FF80
F16_FLIP, F16_HIGH, F16_BIAS = 0x80808080, 0x64, 0x64806480
_CONVERT = {  # s0-s2: scratch registers
    jnp.dtype(jnp.bfloat16): (f"prmt.b32 s0, $1, {BF16_HIGH:#x}, {{sel}}; "
                              f"and.b32 s1, s0, {BF16_KEEP:#x}; and.b32 s2, s0, {BF16_SIGN:#x}; "
                              "sub.bf16x2 $0, s1, s2;"),
    jnp.dtype(jnp.float16): (f"xor.b32 s1, $1, {F16_FLIP:#x}; prmt.b32 s0, s1, {F16_HIGH:#x}, "
                             f"{{sel}}; mov.b32 s2, {F16_BIAS:#x}; sub.f16x2 $0, s0, s2;"),
}
# prmt selectors of byte pairs (low half first): (0, 2) and (1, 3) split a transposed word into
# its two columns.
COLUMN_PAIRS = (0x4240, 0x4341)


def column(rho, ops=np):
  """The data column behind fragment row rho: (rho & ~15) | (rho & 7) << 1 | (rho >> 3) & 1."""
  return ops.bitwise_or(
      ops.bitwise_or(ops.bitwise_and(rho, -16), ops.left_shift(ops.bitwise_and(rho, 7), 1)),
      ops.bitwise_and(ops.right_shift(rho, 3), 1))


def to_rows(a):
  """a's leading axis (data columns, a multiple of 16) in the fragment rows' order: row
  16a + 8c + b <- column 16a + 2b + c, as column() computes index by index."""
  return a.reshape(-1, 8, 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


def to_columns(a):
  """to_rows' inverse."""
  return a.reshape(-1, 2, 8, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


class IndexOps:
  """column()'s operations on MLIR index values."""

  def __init__(self):
    self.index = ir.IndexType.get()

  def value(self, v):
    return v if isinstance(v, ir.Value) else arith.constant(self.index, v)

  def bitwise_or(self, a, b):
    return arith.ori(self.value(a), self.value(b))

  def bitwise_and(self, a, b):
    return arith.andi(self.value(a), self.value(b))

  def left_shift(self, a, n):
    return arith.shli(self.value(a), self.value(n))

  def right_shift(self, a, n):
    return arith.shrui(self.value(a), self.value(n))


def _i32():
  return ir.IntegerType.get_signless(32)


def ldmatrix_x4(address, trans: bool):
  """The 4 words (i32) this lane loads with ldmatrix.x4 from the shared-memory byte address
  (i32) it names."""
  i32 = _i32()
  op = "ldmatrix.sync.aligned.m8n8.x4" + (".trans" if trans else "") + ".shared.b16"
  words = llvm.inline_asm(
      llvm.StructType.get_literal([i32] * 4), [address], op + " {$0, $1, $2, $3}, [$4];",
      "=r,=r,=r,=r,r", has_side_effects=True)  # kept after the wait for the tile's TMA
  return [llvm.extractvalue(i32, words, [j]) for j in range(4)]


def shared_address(ref, offset):
  """The 32-bit shared-memory address of byte `offset` (i32) of the buffer `ref`."""
  return arith.addi(llvm.ptrtoint(_i32(), mgpu_utils.memref_ptr(ref)), offset)


def convert_pair(word, sel: int, dtype):
  """Bytes `sel` of the i32 word as a vector of two `dtype` (bfloat16 or float16) values."""
  float_type = mgpu_utils.dtype_to_ir_type(jnp.dtype(dtype))
  pair = llvm.inline_asm(_i32(), [word], "{ .reg .b32 s<3>; "
                         + _CONVERT[jnp.dtype(dtype)].format(sel=hex(sel)) + " }", "=r,r")
  return mgpu_utils.bitcast(pair, ir.VectorType.get((2,), float_type))


def empty_fragment(shape, dtype, layout):
  """(registers, layout) of a `shape` array of `dtype` in the Mosaic GPU `layout`: an object
  array of the right shape to fill, then wrap with `fragment`."""
  zero = arith.constant(mgpu_utils.dtype_to_ir_type(jnp.dtype(dtype)), 0.0)
  splat = mgpu.FragmentedArray.splat(zero, shape, layout)
  return np.empty_like(splat.registers), splat.layout


def fragment(registers, layout):
  return mgpu.FragmentedArray(_registers=registers, _layout=layout, _is_signed=None)
