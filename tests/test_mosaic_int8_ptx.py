"""int8 data as wgmma's A operand in registers (ops/mosaic/int8_ptx.py, used by
ops/mosaic/q8_0_registers.py and ops/mosaic/int8_cache_registers.py).

The PTX (ldmatrix, byte permutes, packed subtracts) runs only compiled; tests/test_gemv_mosaic.py
and tests/test_decode_mosaic.py check the whole products on a GPU, and in interpret mode on the
CPU, where the row order is applied by array operations. These tests check, on any host, that
the row order the compiled path computes index by index is the one the arrays use, and that the
conversions' arithmetic is exact for every int8 value.
"""

import ml_dtypes
import numpy as np
import pytest

from mla_jax.ops.mosaic import int8_ptx
from mla_jax.ops.mosaic import q8_0_registers as q8r


@pytest.mark.parametrize("n", [16, 64, 512])
def test_row_order_is_one_permutation(n):
  """column() (the compiled path's index arithmetic) agrees with to_rows (the arrays'), which
  to_columns undoes; within each 16 rows, the even columns come first, then the odd ones."""
  rows = np.arange(n)
  columns = int8_ptx.to_rows(rows)
  np.testing.assert_array_equal(int8_ptx.column(rows), columns)
  np.testing.assert_array_equal(np.sort(columns), rows)
  np.testing.assert_array_equal(int8_ptx.to_columns(columns), rows)
  np.testing.assert_array_equal(columns[-16:] - (n - 16), [0, 2, 4, 6, 8, 10, 12, 14,
                                                           1, 3, 5, 7, 9, 11, 13, 15])
  tile = np.arange(n * 3).reshape(n, 3)
  np.testing.assert_array_equal(int8_ptx.to_rows(tile), tile[columns])


def test_gemv_rows_follow_the_order():
  np.testing.assert_array_equal(q8r.COLUMNS, int8_ptx.column(np.arange(q8r.ROWS)))


def _prmt(a, b, sel):
  """PTX prmt.b32 on uint32 values: byte k of the result is byte (sel >> 4k) & 7 of {b, a}."""
  data = (np.uint64(b) << np.uint64(32)) | np.uint64(a)
  out = 0
  for k in range(4):
    out |= int((data >> np.uint64(8 * ((sel >> (4 * k)) & 7))) & np.uint64(0xFF)) << (8 * k)
  return out


def _halves(word, dtype):
  return np.array([word & 0xFFFF, word >> 16], np.uint16).view(dtype).astype(np.float32)


def test_conversions_are_exact_for_every_int8_pair():
  """The byte selection and the magic-number arithmetic of both conversions, emulated: every
  int8 value at each of a word's four bytes comes out as itself, in the right half."""
  values = np.arange(-128, 128)
  for (lo, hi), sel in zip([(0, 2), (1, 3)], int8_ptx.COLUMN_PAIRS):
    for q in values:
      other = (q * 37 + 11) % 256 - 128  # a second, different value in the pair's other byte
      word = np.zeros(4, np.int8)
      word[lo], word[hi] = q, other
      w = int(word.view("<u4")[0])
      s0 = _prmt(w, int8_ptx.BF16_HIGH, sel)
      bf16 = (_halves(s0 & int8_ptx.BF16_KEEP, ml_dtypes.bfloat16)
              - _halves(s0 & int8_ptx.BF16_SIGN, ml_dtypes.bfloat16))
      s0 = _prmt(w ^ int8_ptx.F16_FLIP, int8_ptx.F16_HIGH, sel)
      f16 = _halves(s0, np.float16) - _halves(int8_ptx.F16_BIAS, np.float16)
      np.testing.assert_array_equal(bf16, [q, other])
      np.testing.assert_array_equal(f16, [q, other])
