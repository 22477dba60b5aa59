"""The int8-cache Mosaic GPU decode (ops/decode_mgpu_int8.py): the query's two int8 parts and the
kernel's shape rules. tests/test_decode_mgpu.py runs the kernel itself (interpreted in CI,
compiled on a Hopper GPU) against the float32 reference."""

import jax.numpy as jnp
import numpy as np
import pytest

from mla_jax.ops import decode_mgpu_int8 as dmi


def test_split_q_is_a_15_bit_fixed_point_in_two_int8_parts(rng):
  """128·high + low rounds q·16256/max|q| per head; both parts fit int8, so the kernel's int8
  product is exact; a head of zeros gives zeros and a finite scale."""
  q = rng.standard_normal((3, 16, 512)).astype(np.float32) * rng.uniform(1e-3, 1e3, (3, 16, 1))
  q[1, 5] = 0.0
  q[2, 7, 11] = -np.abs(q[2, 7]).max() * 1.5  # the largest element is negative
  parts, scale = dmi.split_q(jnp.asarray(q, jnp.bfloat16))
  assert parts.dtype == jnp.int8 and parts.shape == (3, 32, 512) and scale.shape == (3, 16)
  high, low = np.asarray(parts[:, :16], np.int32), np.asarray(parts[:, 16:], np.int32)
  assert high.min() >= -127 and high.max() <= 127 and low.min() >= -64 and low.max() <= 63
  q_bf16 = np.asarray(jnp.asarray(q, jnp.bfloat16), np.float32)
  scale = np.asarray(scale)
  assert np.all(np.isfinite(scale)) and np.all(scale > 0)
  fixed = 128 * high + low
  nonzero = np.abs(q_bf16).max(axis=-1) > 0
  np.testing.assert_array_equal(np.abs(fixed).max(axis=-1)[nonzero], dmi._FIXED)
  units = np.abs(fixed * scale[..., None] - q_bf16) / scale[..., None]
  assert units.max() <= 0.5 + 1e-3  # rounding, and float32's in the scale
  assert np.all(fixed[1, 5] == 0)


@pytest.mark.parametrize("C,parts", [(512, 4), (256, 4), (128, 2), (384, 2), (1024, 4), (64, 1)])
def test_value_parts_hold_whole_wgmma_blocks(C, parts):
  assert dmi.value_parts(C) == parts
  assert (C // parts) % 64 == 0


def test_stages_fit_shared_memory():
  assert dmi.choose_stages(16, 512, 64, 2) == dmi.MAX_STAGES
  assert dmi.choose_stages(32, 512, 64, 2) == dmi.MAX_STAGES
  assert dmi.choose_stages(16, 2048, 64, 2) == 1
