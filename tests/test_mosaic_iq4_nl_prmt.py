"""IQ4_NL decoding by byte permutes (ops/mosaic/iq4_nl_prmt.py).

On the CPU: the permute sequence, run on every byte value with prmt emulated, gives the table
entries of both nibbles, and the emulated prmt follows PTX's definition. On a Hopper GPU, the
kernel test runs the same sequence as PTX, compiled by Mosaic GPU, into the GEMV's wgmma
operands (ops/mosaic/iq4_nl_registers.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from mla_jax import quant
from mla_jax.ops import device
from mla_jax.ops.mosaic import int8_ptx, iq4_nl_prmt, iq4_nl_registers
from mla_jax.ops.mosaic.common import interpret_params, smem

ON_GPU = jax.default_backend() == "gpu"
TABLE = np.asarray(quant.IQ4_NL_VALUES, np.float32)
DTYPES = [jnp.bfloat16, jnp.float16]


def _every_byte(rows=64, cols=64):
  """A [rows, cols] uint8 tile holding every byte value, in a shuffled order."""
  values = np.random.default_rng(0).permutation(np.arange(rows * cols) % 256)
  return values.reshape(rows, cols).astype(np.uint8)


def _check(lo, hi, packed, dtype):
  assert lo.dtype == hi.dtype == dtype and lo.shape == hi.shape == packed.shape
  np.testing.assert_array_equal(np.asarray(lo, np.float32), TABLE[packed & 15])
  np.testing.assert_array_equal(np.asarray(hi, np.float32), TABLE[packed >> 4])


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_byte_interpreted(dtype):
  packed = _every_byte()
  _check(*iq4_nl_prmt.decode(jnp.asarray(packed), dtype), packed, dtype)


def test_every_byte_triton_words_interpreted():
  """decode_triton's word per byte (both nibbles' bfloat16 values), read back as float32."""
  packed = _every_byte()
  lo, hi = iq4_nl_prmt.decode_triton(jnp.asarray(packed), interpret=True)
  _check(lo.astype(jnp.bfloat16), hi.astype(jnp.bfloat16), packed, jnp.bfloat16)
  assert lo.dtype == hi.dtype == jnp.float32


def test_table_words_encode_the_table():
  for dtype in DTYPES:
    low, high = iq4_nl_prmt.table_words(dtype)
    lo_bytes = np.asarray(low, "<u4").view(np.uint8).astype(np.uint16)
    hi_bytes = np.asarray(high, "<u4").view(np.uint8).astype(np.uint16)
    encoded = (lo_bytes | hi_bytes << 8).view(jnp.dtype(dtype))
    np.testing.assert_array_equal(encoded.astype(np.float32), TABLE)


def test_emulated_prmt_follows_ptx():
  """PTX ISA, prmt (default mode): byte k of the result is byte c[4k+2:4k] of {b, a}."""
  prmt = iq4_nl_prmt._JnpOps().prmt
  a, b = 0x03020100, 0x07060504
  for sel in (0x3210, 0x7654, 0x0123, 0x4567, 0x6240, 0x7351, 0x1111, 0x5050):
    expected = sum(((sel >> (4 * k)) & 7) << (8 * k) for k in range(4))
    assert int(prmt(a, b, sel)) == expected, hex(sel)


@pytest.mark.skipif(ON_GPU and not device.is_hopper(), reason="Mosaic GPU: Hopper")
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_byte_as_wgmma_operands(dtype):
  """iq4_nl_registers.a_operands inside a Mosaic GPU kernel, on a [32, 64] tile of packed bytes
  as the GEMV stages it (every byte value, 8 times): the four [64, 16] operands (each block's
  low and high halves) hold the transposed table values, rows in int8_ptx's fragment order.
  The PTX (ldmatrix, byte permutes) on a Hopper GPU, the array path interpreted on a CPU."""
  packed = _every_byte(rows=iq4_nl_registers.TILE_ROWS)

  def kernel(packed_ref, out_ref, packed_smem, staging, out_smem, bar):
    plgpu.copy_gmem_to_smem(packed_ref, packed_smem, bar)
    plgpu.barrier_wait(bar)
    operands = iq4_nl_registers.a_operands(packed_smem, dtype, staging if not ON_GPU else None)
    for k, operand in enumerate(operands):
      out_smem.at[k][...] = operand[...] if not ON_GPU else operand
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem, out_ref)
    plgpu.wait_smem_to_gmem(0)

  shape = (4, iq4_nl_registers.ROWS, iq4_nl_registers.HALF)
  out = plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct(shape, dtype),
      scratch_types=[smem(packed.shape, jnp.uint8, swizzle=64), smem(shape, dtype, swizzle=32),
                     plgpu.SMEM(shape, dtype), plgpu.Barrier(num_arrivals=1)],
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
      interpret=interpret_params(not ON_GPU),
  )(jnp.asarray(packed))
  half = iq4_nl_registers.HALF
  for block in range(2):
    rows = packed[block * half:(block + 1) * half]  # [16, 64]: the block's byte rows
    for nibbles, values in enumerate((TABLE[rows & 15], TABLE[rows >> 4])):
      np.testing.assert_array_equal(np.asarray(out[2 * block + nibbles], np.float32),
                                    int8_ptx.to_rows(values.T))
