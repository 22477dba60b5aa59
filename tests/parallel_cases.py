"""mla_jax.parallel on a 4-device CPU mesh: the cases of tests/test_parallel.py that need more
than one device.

XLA fixes the CPU device count when jax starts, so tests/test_parallel.py runs this file in its
own process with XLA_FLAGS=--xla_force_host_platform_device_count=4 and JAX_PLATFORMS=cpu; the
name is no test_*.py, so the suite's own run does not collect it, and without 4 devices every
case skips. Each case compares against an independent oracle: ops.reference.mla_decode in float32
(helpers.check_decode), and the same kernel on one device.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from mla_jax import ops, parallel
from helpers import check_decode, decode_inputs, decode_tol, rel_err

pytestmark = pytest.mark.skipif(
    jax.device_count() < 4, reason="needs 4 devices: run through tests/test_parallel.py")

AUTO = AxisType.Auto
SM_SCALE = 0.2
C, R = 64, 16
F32_TOL = 2e-5
# A bf16 or int8 cache rounds the probabilities to bfloat16 before the value product
# (ops/xla.py, ops/decode/cpu.py), against each device's maximum here and the whole row's there:
# two roundings of 2^-9 at most, with margin.
ROUNDED_P_TOL = 5e-3


def kv_mesh():
  """The README's mesh: every device on one "kv" axis."""
  return jax.make_mesh((jax.device_count(),), ("kv",), axis_types=(AUTO,))


def batch_kv_mesh():
  return jax.make_mesh((2, 2), ("batch", "kv"), axis_types=(AUTO, AUTO))


def ragged_lengths(rng, S, S_d, B):
  """Empty rows, rows ending inside the first shard, on a shard boundary, just past one, full
  rows, then random lengths: B >= 6 of them, shuffled."""
  fixed = [0, int(rng.integers(1, S_d)), S_d, S_d + 1, S, 0]
  return jnp.asarray(rng.permutation(fixed + list(rng.integers(0, S + 1, B - 6))), jnp.int32)


def sharded_cache(c_kv, k_rope, mesh):
  """The cache laid out as the module lays it out (it would otherwise be resharded)."""
  sharding = parallel.sequence_sharding(mesh)
  return jax.device_put(c_kv, sharding), jax.device_put(k_rope, sharding)


@pytest.mark.parametrize("combine", ["psum", "gather"])
@pytest.mark.parametrize("impl", ["xla", "cpu"])
@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "int8"])
def test_sharded_decode_matches_reference(fmt, impl, combine, rng):
  B, H, S = 8, 4, 64
  mesh = kv_mesh()
  q_latent, q_rope, c_kv, k_rope = decode_inputs(rng, B, H, S, fmt, C=C, R=R)
  lengths = ragged_lengths(rng, S, S // 4, B)
  args = (q_latent, q_rope, *sharded_cache(c_kv, k_rope, mesh), lengths)
  out, lse = parallel.mla_decode_sharded(*args, sm_scale=SM_SCALE, mesh=mesh, impl=impl,
                                         combine=combine)
  check_decode(out, lse, q_latent, q_rope, c_kv, k_rope, lengths, SM_SCALE, decode_tol(fmt))
  # The same kernel on one device: only the merge differs.
  single, single_lse = ops.mla_decode(q_latent, q_rope, c_kv, k_rope, lengths,
                                      sm_scale=SM_SCALE, impl=impl)
  nonempty = np.asarray(lengths) > 0
  tol = F32_TOL if fmt == "float32" else ROUNDED_P_TOL
  assert rel_err(out[nonempty], single[nonempty]) <= tol
  np.testing.assert_allclose(lse[nonempty], single_lse[nonempty], rtol=F32_TOL, atol=F32_TOL)


def test_sharded_decode_runs_the_pallas_kernel_per_device(rng):
  """impl="pallas" (interpreted here) inside shard_map: the kernel's own split-KV merge, then
  the devices'."""
  B, H, S = 6, 4, 64
  mesh = kv_mesh()
  q_latent, q_rope, c_kv, k_rope = decode_inputs(rng, B, H, S, "float32", C=C, R=R)
  lengths = ragged_lengths(rng, S, S // 4, B)
  out, lse = parallel.mla_decode_sharded(q_latent, q_rope, c_kv, k_rope, lengths,
                                         sm_scale=SM_SCALE, mesh=mesh, impl="pallas",
                                         interpret=True)
  check_decode(out, lse, q_latent, q_rope, c_kv, k_rope, lengths, SM_SCALE, F32_TOL)


def test_sharded_decode_under_jit_with_traced_lengths(rng):
  B, H, S = 6, 4, 32
  mesh = kv_mesh()
  q_latent, q_rope, c_kv, k_rope = decode_inputs(rng, B, H, S, "float32", C=C, R=R)
  lengths = ragged_lengths(rng, S, S // 4, B)
  decode = jax.jit(lambda *a: parallel.mla_decode_sharded(*a, sm_scale=SM_SCALE, mesh=mesh,
                                                          impl="xla"))
  out, lse = decode(q_latent, q_rope, *sharded_cache(c_kv, k_rope, mesh), lengths)
  check_decode(out, lse, q_latent, q_rope, c_kv, k_rope, lengths, SM_SCALE, F32_TOL)


@pytest.mark.parametrize("fmt", ["float32", "int8"])
def test_batch_by_kv_mesh_shards_both(fmt, rng):
  """On a 2×2 mesh B splits over "batch" and S over "kv"; out and lse stay split over B."""
  B, H, S = 6, 4, 32
  mesh = batch_kv_mesh()
  q_latent, q_rope, c_kv, k_rope = decode_inputs(rng, B, H, S, fmt, C=C, R=R)
  lengths = ragged_lengths(rng, S, S // 2, B)
  out, lse = parallel.mla_decode_sharded(q_latent, q_rope, *sharded_cache(c_kv, k_rope, mesh),
                                         lengths, sm_scale=SM_SCALE, mesh=mesh, impl="cpu")
  check_decode(out, lse, q_latent, q_rope, c_kv, k_rope, lengths, SM_SCALE, decode_tol(fmt))
  assert out.sharding.spec == P("batch") and lse.sharding.spec == P("batch")


def test_bad_meshes_and_sizes_raise_value_error(rng):
  q_latent, q_rope, c_kv, k_rope = decode_inputs(rng, 2, 4, 30, "float32", C=C, R=R)
  lengths = jnp.array([3, 30], jnp.int32)
  decode = lambda *args, **kw: parallel.mla_decode_sharded(*args, lengths, sm_scale=SM_SCALE,
                                                           **kw)
  with pytest.raises(ValueError, match=r"S=30 .* size 4 of mesh axis 'kv'"):
    decode(q_latent, q_rope, c_kv, k_rope, mesh=kv_mesh())
  with pytest.raises(ValueError, match=r"B=6 .* size 4 of mesh axis 'batch'"):
    parallel.mla_decode_sharded(*decode_inputs(rng, 6, 4, 32, "float32", C=C, R=R),
                                jnp.zeros(6, jnp.int32), sm_scale=SM_SCALE,
                                mesh=jax.make_mesh((4, 1), ("batch", "kv"), axis_types=(AUTO,) * 2))
  q_latent, q_rope, c_kv, k_rope = decode_inputs(rng, 2, 4, 32, "float32", C=C, R=R)
  with pytest.raises(ValueError, match=r"axis='kv'.*\('x', 'y'\)"):
    decode(q_latent, q_rope, c_kv, k_rope,
           mesh=jax.make_mesh((2, 2), ("x", "y"), axis_types=(AUTO, AUTO)))
  with pytest.raises(ValueError, match="Explicit"):
    decode(q_latent, q_rope, c_kv, k_rope, mesh=jax.make_mesh((4,), ("kv",)))
  with pytest.raises(ValueError, match=r"lengths\[1\]=33"):
    parallel.mla_decode_sharded(q_latent, q_rope, c_kv, k_rope, jnp.array([3, 33], jnp.int32),
                                sm_scale=SM_SCALE, mesh=kv_mesh())
