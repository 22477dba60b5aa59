"""mla_jax/layer_step.py, ops/decode_layer.py and ops/persistent.py: a decode layer's attention
half as one persistent kernel (layer_kernel=True) equals the module's own kernels (the same
weights, layer_kernel=False) on ragged batches with padding, long caches (several pieces of the
cache, C in pieces), a full row, float32 and bfloat16; NaN and Inf past the lengths are never
read; where the kernel cannot take the layer, the module's path runs. Compiled for an H200
(aot), the kernel spills no registers at any batch it takes (ptxas's report, tests/ptxas.py).

On a CPU the phases run interpreted, each as a launch of its own; on a GPU the same tests run
the one launch with its grid-wide barriers.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mla_jax
from mla_jax import layer_step
from mla_jax.stack import fill_caches
from mla_jax.ops import decode_layer, persistent
import ptxas
from helpers import compile_for_h200, rel_err

# Powers of two where the kernel needs them, D and H·V multiples of 128, YaRN and K != V kept.
CFG = dataclasses.replace(mla_jax.MLAConfig.deepseek_v2_lite(), hidden_size=128, num_heads=4,
                          kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                          v_head_dim=32, num_layers=2)
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}
pytestmark = pytest.mark.filterwarnings("ignore:MLAttention.*interpret mode")


def stacks(dtype=jnp.float32, cfg=CFG, **options):
  """The same weights twice: (layer_kernel=True, layer_kernel=False), on the Pallas backend."""
  return [mla_jax.AttentionStack(cfg, mode="absorbed", backend="pallas", dtype=dtype,
                                 param_dtype=dtype, layer_kernel=fused, rngs=nnx.Rngs(0),
                                 **options)
          for fused in (True, False)]


def decode(model, caches, x, positions, steps):
  """`steps` decode steps from x [B,1,D]: each feeds its output back at positions + 1."""
  outs, step = [], jax.jit(model)
  for _ in range(steps):
    x, caches = step(x, positions, caches)
    outs.append(x)
    positions = jnp.where(positions >= 0, positions + 1, positions)
  return jnp.concatenate(outs, axis=1), caches


def filled(model, B, S, lengths, key=1, cache_dtype=None):
  """Caches of S slots holding random entries, row b's first lengths[b] valid."""
  caches = fill_caches(model.init_cache(B, S, cache_dtype), 0, jax.random.key(key))
  return [dataclasses.replace(c, lengths=jnp.asarray(lengths, jnp.int32)) for c in caches]


def compare(fused, plain, caches, x, positions, dtype, steps=3):
  """`steps` decode steps of both stacks from the same caches give the same outputs and caches."""
  (y1, c1), (y2, c2) = (decode(m, caches, x, positions, steps) for m in (fused, plain))
  assert rel_err(y1, y2) < TOL[dtype]
  for a, b in zip(c1, c2):
    assert rel_err(a.c_kv, b.c_kv) < TOL[dtype] and rel_err(a.k_rope, b.k_rope) < TOL[dtype]
    np.testing.assert_array_equal(a.lengths, b.lengths)
    np.testing.assert_array_equal(a.overflow, b.overflow)


@pytest.fixture
def kernel_calls(monkeypatch):
  """How many times the layer kernel was traced, so that a test knows it ran."""
  calls = []
  original = decode_layer.decode_layer
  monkeypatch.setattr(decode_layer, "decode_layer",
                      lambda *a, **k: calls.append(a[4]) or original(*a, **k))
  return calls


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_equals_the_module_kernels_on_a_ragged_batch(dtype, kernel_calls, rng):
  """Rows at different lengths, one of them padding (it writes nothing and keeps x)."""
  fused, plain = stacks(dtype)
  caches = filled(fused, 3, 24, [5, 17, 9])
  x = jnp.asarray(rng.standard_normal((3, 1, CFG.hidden_size)), dtype)
  compare(fused, plain, caches, x, jnp.asarray([[5], [17], [-1]], jnp.int32), dtype)
  assert kernel_calls


def test_long_cache_runs_in_pieces(kernel_calls, rng):
  """A cache of many tiles: the attend phase splits it into pieces and the values phase splits
  C, whose partials the kernel merges."""
  fused, plain = stacks()
  caches = filled(fused, 2, 400, [390, 233])
  x = jnp.asarray(rng.standard_normal((2, 1, CFG.hidden_size)), jnp.float32)
  compare(fused, plain, caches, x, jnp.asarray([[390], [233]], jnp.int32), jnp.float32)
  shape = kernel_calls[0]
  assert shape.pieces > 1 and shape.value_splits > 1, shape


def test_stale_slots_past_the_lengths_are_never_read(kernel_calls, rng):
  """NaN and Inf in the slots past each row's length (FlashMLA's test convention) leave the
  output as it is with zeros there."""
  fused, _ = stacks()
  lengths = [5, 11]
  clean = filled(fused, 2, 40, lengths)
  past = np.arange(40)[None, :, None] >= np.asarray(lengths)[:, None, None]
  poison = lambda a: jnp.where(past, jnp.asarray([np.nan, np.inf])[np.arange(a.shape[-1]) % 2],
                               a)
  stale = [dataclasses.replace(c, c_kv=poison(c.c_kv), k_rope=poison(c.k_rope)) for c in clean]
  x = jnp.asarray(rng.standard_normal((2, 1, CFG.hidden_size)), jnp.float32)
  positions = jnp.asarray([lengths], jnp.int32).T
  y_clean, _ = jax.jit(fused)(x, positions, clean)
  y_stale, _ = jax.jit(fused)(x, positions, stale)
  assert np.all(np.isfinite(y_stale))
  np.testing.assert_array_equal(y_stale, y_clean)
  assert kernel_calls


def test_full_row_sets_overflow_and_keeps_its_entries(kernel_calls, rng):
  fused, plain = stacks()
  caches = filled(fused, 2, 16, [16, 4])
  x = jnp.asarray(rng.standard_normal((2, 1, CFG.hidden_size)), jnp.float32)
  positions = jnp.asarray([[16], [4]], jnp.int32)
  with pytest.raises(ValueError, match="overflow"):
    fused(x, positions, caches)
  y, after = jax.jit(fused)(x, positions, caches)
  y_plain, _ = jax.jit(plain)(x, positions, caches)
  assert rel_err(y, y_plain) < TOL[jnp.float32]
  for before, c in zip(caches, after):
    np.testing.assert_array_equal(c.overflow, [1, 0])
    np.testing.assert_array_equal(c.lengths, [16, 5])
    np.testing.assert_array_equal(c.c_kv[0], before.c_kv[0])
  assert kernel_calls


@pytest.mark.parametrize("case", ["q_lora", "q8_0", "int8_cache", "f32_params_bf16_compute",
                                  "odd_sizes"])
def test_falls_back_where_the_kernel_cannot(case, kernel_calls, rng):
  """Layers the kernel does not take run the module's path, with the same results."""
  cfg, dtype, options, cache_dtype = CFG, jnp.float32, {}, None
  if case == "q_lora":
    cfg = dataclasses.replace(CFG, q_lora_rank=32)
  elif case == "q8_0":
    options = dict(weight_format="q8_0")
  elif case == "int8_cache":
    cache_dtype = jnp.int8
  elif case == "odd_sizes":
    cfg = dataclasses.replace(CFG, hidden_size=96)
  fused, plain = stacks(dtype, cfg, **options)
  if case == "f32_params_bf16_compute":
    fused, plain = (mla_jax.AttentionStack(cfg, backend="pallas", dtype=jnp.bfloat16,
                                           layer_kernel=flag, rngs=nnx.Rngs(0))
                    for flag in (True, False))
    dtype = jnp.bfloat16
  caches = filled(fused, 2, 16, [3, 7], cache_dtype=cache_dtype)
  x = jnp.asarray(rng.standard_normal((2, 1, cfg.hidden_size)), dtype)
  positions = jnp.asarray([[3], [7]], jnp.int32)
  y1, _ = jax.jit(fused)(x, positions, caches)
  y2, _ = jax.jit(plain)(x, positions, caches)
  np.testing.assert_array_equal(y1, y2)
  assert not kernel_calls


def test_supported_needs_one_token_a_row_and_the_norm():
  fused, _ = stacks()
  layer, norm = fused.layers[0], fused.input_layernorms[0]
  cache = layer.init_cache(1, 16)
  one, two = jnp.zeros((1, 1, CFG.hidden_size)), jnp.zeros((1, 2, CFG.hidden_size))
  assert layer_step.supported(layer, one, cache, norm)
  assert not layer_step.supported(layer, two, cache, norm)
  assert not layer_step.supported(layer, one, cache, None)


def test_unsupported_names_the_sizes():
  assert "B=9" in decode_layer.unsupported(9, 128, 4, 32, 16, 64, 32)
  assert "D=96" in decode_layer.unsupported(1, 96, 4, 32, 16, 64, 32)
  assert decode_layer.unsupported(1, 128, 4, 32, 16, 64, 32) is None


@pytest.mark.aot
@pytest.mark.parametrize("B", [1, 2, 4, decode_layer.MAX_BATCH])
def test_compiled_kernel_spills_no_registers(B):
  """ptxas for the H200 keeps the kernel at V2-Lite's sizes in registers at every batch it
  takes: the projections' accumulators do not grow past them with B (one [rows, block] float32
  tile a row spilled 80 bytes at B=4 and 2352 at B=8)."""
  cfg = mla_jax.MLAConfig.deepseek_v2_lite()
  D, H, C, R = cfg.hidden_size, cfg.num_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
  K, V, S = cfg.qk_nope_head_dim, cfg.v_head_dim, 16384
  shape = decode_layer.plan(B, D, H, K, R, C, V, S, programs=132, dtype="bfloat16",
                            input_eps=1e-6, kv_eps=1e-6, rope_scale=1.0, sm_scale=0.1)
  spec = lambda *dims, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(dims, dtype)
  weights = dict(input_norm=spec(D), q_proj=spec(H * (K + R), D), kv_a_proj=spec(C + R, D),
                 kv_norm=spec(C), inv_freq=spec(R // 2, dtype=jnp.float32),
                 wk_b=spec(H, K, C), wv_b=spec(H, C, V), o_proj=spec(D, H * V))
  cache = dict(c_kv=spec(B, S, C), k_rope=spec(B, S, R), lengths=spec(B, dtype=jnp.int32),
               overflow=spec(B, dtype=jnp.int32))
  layer = lambda x, p, w, c: decode_layer.decode_layer(x, p, w, c, shape)
  usage = ptxas.usage(lambda options: compile_for_h200(
      layer, spec(B, D), spec(B, dtype=jnp.int32), weights, cache, donate_argnums=(3,),
      compiler_options=options))["mla_decode_layer"]
  assert usage.spill_store_bytes == 0 and usage.spill_load_bytes == 0, usage


def test_decode_loop_equals_single_steps(rng):
  fused, _ = stacks()
  caches = filled(fused, 2, 16, [3, 7])
  x = jnp.asarray(rng.standard_normal((2, 1, CFG.hidden_size)), jnp.float32)
  positions = jnp.asarray([[3], [7]], jnp.int32)
  want, want_caches = decode(fused, caches, x, positions, 3)
  got, got_caches = mla_jax.decode_loop(fused, x, positions, caches, 3)
  assert rel_err(got, want) < 1e-6
  for a, b in zip(got_caches, want_caches):
    np.testing.assert_array_equal(a.lengths, b.lengths)


def _phases_reading_neighbours(n):
  """Phase 1: unit u writes 2·x[u] to out[u]; phase 2: unit u copies out[(u + 1) % n] to
  out2[u], a row another unit wrote in the phase before."""
  def double(u, ins, outs, fetched):
    outs[0][u, :] = ins[0][u, :] * 2.0

  def neighbour(u, ins, outs, fetched):
    outs[1][u, :] = outs[0][jax.lax.rem(u + 1, n), :]

  return [persistent.Phase("double", n, double), persistent.Phase("neighbour", n, neighbour)]


@pytest.mark.parametrize("programs", [4, 16])
def test_phases_see_what_earlier_phases_wrote(programs, rng):
  """Each unit of the second phase reads a row that another unit wrote in the first: with
  fewer programs than units each program runs several, in order."""
  n = 16
  x = jnp.asarray(rng.standard_normal((n, 16)), jnp.float32)
  out = jax.ShapeDtypeStruct((n, 16), jnp.float32)
  _, got = persistent.persistent_call(
      _phases_reading_neighbours(n), [x], [out, out], aliases={}, programs=programs,
      name="neighbours", interpret=jax.default_backend() != "gpu")
  np.testing.assert_array_equal(got, np.roll(2 * np.asarray(x), -1, axis=0))


def test_more_programs_than_sms_is_refused(monkeypatch):
  """A barrier over more programs than the GPU holds at once would never open."""
  monkeypatch.setattr(persistent.device, "num_sms", lambda: 8)
  x = jnp.zeros((16, 16), jnp.float32)
  out = jax.ShapeDtypeStruct((16, 16), jnp.float32)
  with pytest.raises(ValueError, match="programs=9"):
    persistent.persistent_call(_phases_reading_neighbours(16), [x], [out, out], aliases={},
                               programs=9, name="neighbours")
