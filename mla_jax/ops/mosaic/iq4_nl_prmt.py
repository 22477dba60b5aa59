"""IQ4_NL decoding by byte permutes, for the Mosaic GPU GEMV (ops/gemv/mosaic.py, through
iq4_nl_registers.py) and the Triton one (ops/gemv/triton.py, lookup="prmt").

An IQ4_NL weight is d·T[i]: i is a 4-bit index into the 16-entry table T (quant.IQ4_NL_VALUES).
Mosaic GPU has no register gather. Like ggml's CUDA kernels (`get_int_from_table_16`), the table
lives in registers and PTX's `prmt` looks it up. prmt is a byte permute: it picks 4 bytes out of
8 by four 3-bit selectors, so it looks up 4 indices per instruction.

The table here holds the two bytes of each entry's float16 or bfloat16 encoding, not int8 values.
The encoding is exact, because |T| <= 127 fits in 8 significant bits. So the lookup writes the
activations' dtype directly, with no integer-to-float conversion afterwards.

One 32-bit word q of packed bytes (4 columns) holds 8 indices: nibble 2c is column c's low
nibble (a block's elements 0-15) and nibble 2c+1 its high nibble (elements 16-31). For each
byte of the encoding:

- prmt(T[0:4], T[4:8], q & 0x7777) picks that byte of entries 0-7 for nibbles 0-3;
- prmt(T[8:12], T[12:16], q & 0x7777) picks it from entries 8-15;
- a third prmt chooses, byte by byte, between the two by bit 3 of the index: its selector is
  0x3210 plus 4 where bit 3 is set.

The same three prmt with q >> 16 serve nibbles 4-7. Four more prmt then interleave the low and
high bytes into pairs of 16-bit floats, split into the low-nibble and high-nibble halves. That is
22 integer instructions for 8 weights. The selectors are masked to 3 bits, because a selector's
bit 3 asks prmt to replicate the sign.

`decode_words` writes the sequence once, over an `ops` namespace that is PTX on registers
(`decode_register`, compiled by Mosaic GPU: iq4_nl_registers.py), PTX text (`decode_triton`,
Triton's inline assembly) or jnp on uint32 arrays (`decode`: both, interpreted, and the CPU
tests).
"""

from __future__ import annotations

import numpy as np

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import triton as pltriton
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith, llvm

from mla_jax import quant

# prmt selectors: byte k of the result is byte sel_k of the 8 bytes {b, a} (a = bytes 0-3).
_INDEX_BITS = 0x77777777  # each index's selector bits, its bit 3 cleared
_HIGH_BITS = 0x88888888  # each index's bit 3
_IDENTITY = 0x32103210  # bytes 0-3 of a; + 4 (bit 3 >> 1) takes the same byte of b
_EVEN, _ODD = 0x6240, 0x7351  # {lo(n0), hi(n0), lo(n2), hi(n2)}: the 16-bit floats of nibbles 0, 2
_BYTE_PAIRS = (0x5140, 0x7362)  # {lo(n0), hi(n0), lo(n1), hi(n1)}: byte 0's two floats; byte 1's


def table_words(dtype) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """The table as two sets of four 32-bit words, low bytes and high bytes of each entry's encoding
  in `dtype` (float16 or bfloat16); byte k of word w belongs to entry 4w + k."""
  bits = np.asarray(quant.IQ4_NL_VALUES, np.float32).astype(jnp.dtype(dtype)).view(np.uint16)
  words = lambda b: tuple(int(w) for w in b.astype(np.uint8).view("<u4"))
  return words(bits & 0xFF), words(bits >> 8)


def decode_words(q, ops, tables, orders=(_EVEN, _ODD)):
  """The 16-bit floats of q's 8 indices, each 32-bit word holding two: by default (low nibbles
  of columns 0-1, of columns 2-3, high nibbles of columns 0-1, of columns 2-3); with orders
  _BYTE_PAIRS, both nibbles of (column 0, column 2, column 1, column 3)."""
  index = ops.and_(q, _INDEX_BITS)
  pick = ops.or_(ops.shr(ops.and_(q, _HIGH_BITS), 1), _IDENTITY)
  halves = []
  for shift in (0, 16):
    i, s = ops.shr(index, shift), ops.shr(pick, shift)
    lo_byte, hi_byte = (ops.prmt(ops.prmt(t[0], t[1], i), ops.prmt(t[2], t[3], i), s)
                        for t in tables)
    halves.append((lo_byte, hi_byte))
  return tuple(ops.prmt(lo_byte, hi_byte, order)
               for order in orders for lo_byte, hi_byte in halves)


class _JnpOps:
  """decode_words' operations on uint32 arrays (prmt emulated byte by byte)."""

  @staticmethod
  def _u32(v):
    return jnp.asarray(v, jnp.uint32)

  def and_(self, a, b):
    return self._u32(a) & self._u32(b)

  def or_(self, a, b):
    return self._u32(a) | self._u32(b)

  def shr(self, a, n):
    return self._u32(a) >> n

  def prmt(self, a, b, sel):
    a, b, sel = self._u32(a), self._u32(b), self._u32(sel)
    out = jnp.zeros(jnp.broadcast_shapes(a.shape, b.shape, sel.shape), jnp.uint32)
    for k in range(4):
      s = (sel >> (4 * k)) & 7
      byte = (jnp.where(s < 4, a, b) >> (8 * (s & 3))) & 0xFF
      out = out | (byte << (8 * k))
    return out


class _PtxOps:
  """decode_words' operations on i32 registers."""

  def __init__(self):
    self.i32 = ir.IntegerType.get_signless(32)

  def _value(self, v):
    if isinstance(v, ir.Value):
      return v
    return mgpu_utils.c(v - (1 << 32) if v >= 1 << 31 else v, self.i32)  # i32 is signed

  def and_(self, a, b):
    return arith.andi(self._value(a), self._value(b))

  def or_(self, a, b):
    return arith.ori(self._value(a), self._value(b))

  def shr(self, a, n):
    return a if n == 0 else arith.shrui(self._value(a), self._value(n))

  def prmt(self, a, b, sel):
    return llvm.inline_asm(self.i32, [self._value(a), self._value(b), self._value(sel)],
                           "prmt.b32 $0, $1, $2, $3;", "=r,r,r,r")


class _PtxText:
  """decode_words' operations as lines of PTX over 32-bit registers iq<n> (one per result), for
  an inline-assembly block; an operand is a register's name or an integer (an immediate)."""

  def __init__(self):
    self.lines = []

  def _emit(self, op, *operands):
    reg = f"iq{len(self.lines)}"
    args = ", ".join(v if isinstance(v, str) else f"0x{v:08x}" for v in operands)
    self.lines.append(f"{op} {reg}, {args};")
    return reg

  def and_(self, a, b):
    return self._emit("and.b32", a, b)

  def or_(self, a, b):
    return self._emit("or.b32", a, b)

  def shr(self, a, n):
    return a if n == 0 else self._emit("shr.b32", a, n)

  def prmt(self, a, b, sel):
    return self._emit("prmt.b32", a, b, sel)


def triton_asm() -> str:
  """decode_words as one inline-assembly block for Triton's elementwise_inline_asm with pack=4:
  operand $4 holds 4 packed bytes, and result $k the bfloat16 values of byte k's two nibbles,
  the low nibble's in bits 0-15 and the high nibble's in bits 16-31."""
  ops = _PtxText()
  w0, w2, w1, w3 = decode_words("$4", ops, table_words(jnp.bfloat16), _BYTE_PAIRS)
  moves = [f"mov.b32 ${k}, {word};" for k, word in enumerate((w0, w1, w2, w3))]
  return "\n".join(["{", f".reg .b32 iq<{len(ops.lines)}>;", *ops.lines, *moves, "}"])


def decode_triton(packed: jax.Array, interpret: bool) -> tuple[jax.Array, jax.Array]:
  """As decode, inside a Pallas Triton kernel: packed, a uint8 array whose last axis is a
  multiple of 4, as the float32 table values of its low and of its high nibbles. The assembly
  writes each byte's two values as bfloat16 into one 32-bit word (triton_asm), which is
  elementwise, so Triton may group any 4 of a thread's bytes into its operand; a bfloat16 in a
  word's high half is that float32, so each value then costs one integer op. (One result of 32
  bits, not two of 16: Pallas lowers this primitive to a single result.) `interpret`: Pallas'
  interpret mode (jnp)."""
  if interpret:
    w0, w2, w1, w3 = decode_words(_words(packed), _JnpOps(), table_words(jnp.bfloat16),
                                  _BYTE_PAIRS)
    words = lax.bitcast_convert_type(jnp.stack([w0, w1, w2, w3], axis=-1), jnp.int32)
    words = words.reshape(packed.shape)
  else:  # Triton's integers are signless: int32
    (words,) = pltriton.elementwise_inline_asm(
        triton_asm(), args=[packed], constraints="=r,=r,=r,=r,r", pack=4,
        result_shape_dtypes=[jax.ShapeDtypeStruct(packed.shape, jnp.int32)])
  as_float = lambda bits: lax.bitcast_convert_type(bits, jnp.float32)
  return as_float(words << 16), as_float(words & jnp.int32(-1 << 16))


def _words(packed):
  """packed [rows, cols] uint8 as [rows, cols / 4] uint32 words of 4 consecutive bytes."""
  rows, cols = packed.shape
  return lax.bitcast_convert_type(packed.reshape(rows, cols // 4, 4), jnp.uint32)


def decode_register(word, dtype, byte_order: int | None = None):
  """decode_words of an i32 register in compiled Mosaic GPU code (inside inline_mgpu), its bytes
  first permuted by the prmt selector byte_order if given: (the low nibbles of bytes 0-1, of
  bytes 2-3, the high nibbles of bytes 0-1, of bytes 2-3), four i32 words of two floats."""
  ops = _PtxOps()
  if byte_order is not None:
    word = ops.prmt(word, 0, byte_order)
  return decode_words(word, ops, table_words(dtype))


def decode(packed, dtype):
  """IQ4_NL indices, packed two to a byte (quant's layout), as table values in `dtype` (bfloat16
  or float16): (the low nibbles, the high nibbles), each of packed's shape [rows, cols], cols a
  multiple of 4. The same permute sequence on arrays, prmt emulated: interpret mode's decoding
  (iq4_nl_registers) and the tests'."""
  lo01, lo23, hi01, hi23 = decode_words(_words(packed), _JnpOps(), table_words(dtype))
  as_floats = lambda a, b: lax.bitcast_convert_type(
      jnp.stack([a, b], axis=-1), dtype).reshape(packed.shape)
  return as_floats(lo01, lo23), as_floats(hi01, hi23)
