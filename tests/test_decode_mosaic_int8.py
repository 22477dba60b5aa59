"""The int8-cache Mosaic GPU decode (ops/decode/mosaic_int8.py): the query's two int8 parts and
the kernel's shape rules. tests/test_decode_mosaic.py runs the kernel itself (interpreted in CI,
compiled on a Hopper GPU) against the float32 reference."""

import jax.numpy as jnp
import numpy as np
import pytest

from mla_jax.ops.decode import mosaic_int8 as dmi


def test_query_parts_are_a_15_bit_fixed_point_that_int8_holds(rng):
  """128·high + low is within half a unit of q·16256/max|q| per head (column); both parts fit
  int8, so the kernel's int8 product is exact; a head of zeros gives zeros and a finite scale.
  The kernel runs the same function on its registers."""
  q = rng.standard_normal((512, 16)).astype(np.float32) * rng.uniform(1e-3, 1e3, (1, 16))
  q[:, 5] = 0.0
  q[11, 7] = -np.abs(q[:, 7]).max() * 1.5  # the largest element is negative
  q = np.asarray(jnp.asarray(q, jnp.bfloat16), np.float32)
  high, low, scale = (np.asarray(a) for a in dmi.fixed_point_parts(jnp.asarray(q)))
  for part, bound in ((high, 127), (low, 64)):
    np.testing.assert_array_equal(part, np.round(part))
    assert np.abs(part).max() <= bound
  assert np.all(np.isfinite(scale)) and np.all(scale > 0)
  units = np.abs((128 * high + low) * scale - q) / scale
  assert units.max() <= 0.5 + 1e-3  # rounding, and float32's in the scale
  np.testing.assert_allclose(np.abs(q).max(axis=0)[q.any(axis=0)],
                             (dmi._FIXED * scale)[q.any(axis=0)], rtol=1e-6)
  assert np.all(high[:, 5] == 0) and np.all(low[:, 5] == 0)


@pytest.mark.parametrize("C,parts", [(512, 4), (256, 4), (128, 2), (384, 2), (1024, 4), (64, 1)])
def test_value_parts_hold_whole_wgmma_blocks(C, parts):
  assert dmi.value_parts(C) == parts
  assert (C // parts) % 64 == 0


def test_stages_fit_shared_memory():
  assert dmi.choose_stages(16, 512, 64, 2) == dmi.MAX_STAGES
  assert dmi.choose_stages(32, 512, 64, 2) == 3  # a 32-head query takes 32 + 32 KiB
  assert dmi.choose_stages(16, 2048, 64, 2) == 1


def test_choose_tuning_pads_the_heads():
  """The stages are those of the padded query (16 or 32 heads), the pieces those of mosaic's."""
  assert dmi.choose_tuning(4, 20, 4096, 512, 64, 2, num_sms=132).stages == 3
  tuning = dmi.choose_tuning(4, 16, 4096, 512, 64, 2, num_sms=132)
  assert tuning == dmi.MosaicInt8Tuning(num_splits=32, stages=dmi.MAX_STAGES)
