"""mla_jax.parallel on a 4-device CPU mesh: the cases of tests/test_parallel.py that need more
than one device.

XLA fixes the CPU device count when jax starts, so tests/test_parallel.py runs this file in its
own process with XLA_FLAGS=--xla_force_host_platform_device_count=4 and JAX_PLATFORMS=cpu; the
name is no test_*.py, so the suite's own run does not collect it, and with any other device
count every case skips. Each case compares against an independent oracle: for the decode,
ops.reference.mla_decode in float32 (helpers.check_decode) and the same kernel on one device; for
the module, the same module without a mesh.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

import mla_jax
from mla_jax import ops, parallel, quant
from helpers import check_decode, decode_inputs, decode_tol, rel_err, run_chunks
import hlo

pytestmark = pytest.mark.skipif(
    jax.device_count() != 4, reason="needs 4 devices: run through tests/test_parallel.py")

AUTO = AxisType.Auto
SM_SCALE = 0.2
C, R = 64, 16
F32_TOL = 2e-5
# A bf16 or int8 cache rounds the probabilities to bfloat16 before the value product
# (ops/xla.py, ops/decode/cpu.py), against each device's maximum here and the whole row's there:
# two roundings of 2^-9 at most, with margin.
ROUNDED_P_TOL = 5e-3
TINY = dataclasses.replace(mla_jax.MLAConfig.deepseek_v2_lite(), hidden_size=64, num_heads=4,
                           kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
                           num_layers=2)


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
  for array in (out, lse):  # every device merged the same result
    copies = [np.asarray(shard.data) for shard in array.addressable_shards]
    assert len(copies) == 4 and all(np.array_equal(c, copies[0]) for c in copies)
  # The same kernel on one device: only the merge differs.
  single, single_lse = ops.mla_decode(q_latent, q_rope, c_kv, k_rope, lengths,
                                      sm_scale=SM_SCALE, impl=impl)
  nonempty = np.asarray(lengths) > 0
  tol = F32_TOL if fmt == "float32" else ROUNDED_P_TOL
  assert rel_err(out[nonempty], single[nonempty]) <= tol
  np.testing.assert_allclose(lse[nonempty], single_lse[nonempty], rtol=F32_TOL, atol=F32_TOL)


@pytest.mark.parametrize("impl", ["xla", "cpu"])
@pytest.mark.parametrize("fmt", ["float32", "int8"])
def test_stale_slots_never_reach_the_result(fmt, impl, rng):
  """NaN in every slot past a row's length (an int8 row: its scale), whole devices' slots
  included: the result is that of the cache with those slots zeroed, with either merge."""
  B, H, S = 6, 4, 64
  mesh = kv_mesh()
  q_latent, q_rope, c_kv, k_rope = decode_inputs(rng, B, H, S, fmt, C=C, R=R)
  lengths = ragged_lengths(rng, S, S // 4, B)
  stale = np.arange(S)[None, :] >= np.asarray(lengths)[:, None]  # [B,S]

  def fill(x, value):
    where = stale.reshape(stale.shape + (1,) * (x.ndim - 2))
    return jnp.where(where, jnp.asarray(value, x.dtype), x)

  if fmt == "int8":
    dirty, clean = (quant.Int8Rows(fill(c_kv.values, 127), fill(c_kv.scales, np.nan)),
                    quant.Int8Rows(fill(c_kv.values, 0), fill(c_kv.scales, 0.0)))
  else:
    dirty, clean = fill(c_kv, np.nan), fill(c_kv, 0.0)
  for combine in parallel.MERGES:
    decode = lambda c, k: parallel.mla_decode_sharded(q_latent, q_rope, c, k, lengths,
                                                      sm_scale=SM_SCALE, mesh=mesh, impl=impl,
                                                      combine=combine)
    out, lse = decode(dirty, fill(k_rope, np.nan))
    want, want_lse = decode(clean, fill(k_rope, 0.0))
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(lse, want_lse)


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
  with pytest.raises(ValueError, match="max_len"):  # init_cache checks its sizes first
    mla_jax.init_cache(TINY, 2, 0, mode="absorbed", mesh=kv_mesh())
  with pytest.raises(ValueError, match=r"S=30 .* size 4"):
    mla_jax.init_cache(TINY, 2, 30, mode="absorbed", mesh=kv_mesh())


def module_inputs(rng, B, T):
  """x [B,T,D] and positions with padding: a row with a gap, a left-padded row, a row that is all
  padding until the end."""
  x = jnp.asarray(rng.standard_normal((B, T, TINY.hidden_size)), jnp.float32)
  positions = np.tile(np.arange(T) + rng.integers(0, 5000, (B, 1)), 1)
  positions[0, 3:5] = -1
  positions[1, :4] = -1
  positions[2, :T - 3] = -1
  return x, jnp.asarray(positions, jnp.int32)


def cache_spec(cache):
  values = cache.c_kv.values if isinstance(cache.c_kv, quant.Int8Rows) else cache.c_kv
  return values.sharding.spec, cache.k_rope.sharding.spec, cache.lengths.sharding.spec


@pytest.mark.parametrize("backend", ["xla", "cpu"])
@pytest.mark.parametrize("cache_dtype", [jnp.float32, jnp.bfloat16, jnp.int8])
def test_module_on_mesh_equals_module_without(cache_dtype, backend, rng):
  """Prefill (XLA partitions the scatter into the sharded cache), then decode steps through
  mla_decode_sharded: outputs and cache as without a mesh; the cache stays sharded along S."""
  B, T, S = 4, 12, 16
  x, positions = module_inputs(rng, B, T)
  (y, cache), (y_mesh, cache_mesh) = [
      run_chunks(mla_jax.MLAttention(TINY, backend=backend, mesh=mesh, rngs=nnx.Rngs(0)), x,
                 positions, [8, 1, 1, 1, 1], S, cache_dtype)
      for mesh in (None, kv_mesh())]
  assert rel_err(y_mesh, y) <= (F32_TOL if cache_dtype == jnp.float32 else ROUNDED_P_TOL)
  for a, b in zip(jax.tree.leaves(cache_mesh), jax.tree.leaves(cache)):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  assert cache_spec(cache_mesh) == (P(None, "kv"), P(None, "kv"), P())


def test_module_on_batch_by_kv_mesh(rng):
  B, T, S = 4, 10, 16
  x, positions = module_inputs(rng, B, T)
  outs = []
  for mesh in (None, batch_kv_mesh()):
    attn = mla_jax.MLAttention(TINY, backend="xla", mesh=mesh, rngs=nnx.Rngs(0))
    y, cache = run_chunks(attn, x, positions, [7, 1, 1, 1], S, jnp.float32)
    outs.append(y)
  assert rel_err(outs[1], outs[0]) <= F32_TOL
  assert cache_spec(cache)[:2] == (P("batch", "kv"), P("batch", "kv"))


def test_jitted_decode_step_writes_in_place_and_merges_only(rng):
  """mla_jax.jit_step on the mesh: each device's cache shard is updated in place, and the only
  collectives are the merge's, on [B,H,...] partials, never the cache."""
  B, S = 2, 64
  mesh = kv_mesh()
  attn = mla_jax.MLAttention(TINY, backend="cpu", mesh=mesh, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(attn)
  step = jax.jit(lambda s, x, p, c: nnx.merge(graphdef, s)(x, p, c), donate_argnums=(3,))
  x = jnp.asarray(rng.standard_normal((B, 1, TINY.hidden_size)), jnp.float32)
  cache = attn.init_cache(B, S, jnp.float32)
  text = step.lower(state, x, jnp.zeros((B, 1), jnp.int32), cache).compile().as_text()
  local = [f"f32[{B},{S // 4},{n}]" for n in (TINY.kv_lora_rank, TINY.qk_rope_head_dim)]
  assert set(hlo.in_place_writes(text, local).values()) == {"in place"}
  collectives = [line for line in text.splitlines()
                 if any(f" {op}(" in line for op in ("all-gather", "all-reduce", "all-to-all",
                                                     "collective-permute", "reduce-scatter"))]
  H, Cl = TINY.num_heads, TINY.kv_lora_rank
  assert collectives and all(f"f32[{B},{H}]" in line or f"f32[{B},{H},{Cl}]" in line
                             for line in collectives), collectives


def test_stack_decode_loop_on_mesh_equals_without(rng):
  """AttentionStack passes the mesh to every layer; decode_loop runs on the sharded caches.
  float32 caches: the mesh changes the float32 summation order of the first layer's output
  (~1e-7), and a bfloat16 cache of the second layer can round a value it feeds to the other
  side of a bfloat16 step (seed 321409533: one k_rope entry, one ulp, a 3.3e-5 output error)."""
  B, T, S = 2, 6, 16
  x = jnp.asarray(rng.standard_normal((B, T, TINY.hidden_size)), jnp.float32)
  positions = jnp.asarray(np.arange(T)[None] + rng.integers(0, 5000, (B, 1)), jnp.int32)
  results = []
  for mesh in (None, kv_mesh()):
    stack = mla_jax.AttentionStack(TINY, backend="cpu", mesh=mesh, rngs=nnx.Rngs(0))
    y, caches = stack(x, positions, stack.init_cache(B, S, jnp.float32))
    ys, caches = mla_jax.decode_loop(stack, y[:, -1:], positions[:, -1:] + 1, caches, 4)
    results.append((y, ys))
  (y0, ys0), (y1, ys1) = results
  assert rel_err(y1, y0) <= F32_TOL and rel_err(ys1, ys0) <= F32_TOL
  assert cache_spec(caches[0])[:2] == (P(None, "kv"), P(None, "kv"))
