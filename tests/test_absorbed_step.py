"""mla_jax/absorbed_step.py: the absorbed decode step on the Pallas backend equals the module's
XLA path (the same weights, backend="xla") on ragged batches with padding, after a prefill, with
q_lora, int8 caches and quantized weights; a decode loop equals single steps; the cache is
updated in place.

On CPU the kernels run in interpret mode; with a GPU the same tests run compiled, plus a count of
the kernels the compiled V2-Lite step launches (marked gpu).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mla_jax
from mla_jax import absorbed_step, layers
from mla_jax.ops import latent_update
from helpers import rel_err

# Powers of two where the Triton kernels need them (V2-Lite's are), YaRN and K != V kept.
CFG = dataclasses.replace(mla_jax.MLAConfig.deepseek_v2_lite(), hidden_size=64, num_heads=4,
                          kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                          v_head_dim=32, num_layers=2)
CFG_QLORA = dataclasses.replace(CFG, q_lora_rank=32)
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def stack(cfg, backend, dtype=jnp.float32, weight_format=None):
  return mla_jax.AttentionStack(cfg, mode="absorbed", backend=backend, dtype=dtype,
                                param_dtype=dtype, weight_format=weight_format,
                                rngs=nnx.Rngs(0))


def prefill(model, rng_seed, cache_dtype):
  """A ragged prefill (left padding, right padding, a full row) -> (caches, the first decode
  step's x [B,1,D] and positions [B,1], one row padding)."""
  rng = np.random.default_rng(rng_seed)
  dtype = model.layers[0].dtype
  caches = model.init_cache(3, 16, cache_dtype)
  x = jnp.asarray(rng.standard_normal((3, 5, CFG.hidden_size)), dtype)
  positions = jnp.asarray([[0, 1, 2, 3, 4], [-1, -1, 0, 1, 2], [0, 1, 2, 3, -1]], jnp.int32)
  _, caches = model(x, positions, caches)
  x = jnp.asarray(rng.standard_normal((3, 1, CFG.hidden_size)), dtype)
  return caches, x, jnp.asarray([[5], [3], [-1]], jnp.int32)


def one_row_prefill(model, cache_dtype):
  """A one-row batch's 3-token prefill -> (caches, the first decode step's x [1,1,D] and
  positions [1,1])."""
  x = jnp.asarray(np.random.default_rng(5).standard_normal((1, 4, CFG.hidden_size)), jnp.float32)
  _, caches = model(x[:, :3], jnp.arange(3, dtype=jnp.int32)[None],
                    model.init_cache(1, 16, cache_dtype))
  return caches, x[:, 3:], jnp.asarray([[3]], jnp.int32)


def prefill_then_decode(model, rng_seed, cache_dtype, steps=3):
  """prefill, then `steps` single decode steps: (decode outputs [B, steps, D], caches)."""
  return decode(model, *prefill(model, rng_seed, cache_dtype), steps)


def decode(model, caches, x, positions, steps):
  """`steps` single decode steps from x [B,1,D] at positions [B,1], each output the next input:
  (decode outputs [B, steps, D], caches)."""
  ys = []
  for _ in range(steps):
    y, caches = model(x, positions, caches)
    ys.append(y)
    x, positions = y, jnp.where(positions >= 0, positions + 1, positions)
  return jnp.concatenate(ys, axis=1), caches


@pytest.mark.parametrize("cache_dtype", [jnp.float32, jnp.int8], ids=["f32_cache", "int8_cache"])
@pytest.mark.parametrize("cfg", [CFG, CFG_QLORA], ids=["v2lite", "qlora"])
def test_equals_the_xla_path(cfg, cache_dtype):
  fused, xla = stack(cfg, "pallas"), stack(cfg, "xla")
  assert absorbed_step.supported(fused.layers[0], jnp.zeros((3, 1, cfg.hidden_size)))
  y, caches = prefill_then_decode(fused, 0, cache_dtype)
  y_ref, caches_ref = prefill_then_decode(xla, 0, cache_dtype)
  assert rel_err(y, y_ref) < TOL[jnp.float32]
  np.testing.assert_array_equal(y[2], 0)  # the padding row
  for cache, ref in zip(caches, caches_ref):
    np.testing.assert_array_equal(cache.lengths, [8, 6, 4])
    np.testing.assert_array_equal(cache.lengths, ref.lengths)
    for leaf, leaf_ref in zip(jax.tree.leaves(cache), jax.tree.leaves(ref)):
      assert rel_err(leaf.astype(jnp.float32), leaf_ref.astype(jnp.float32)) < TOL[jnp.float32]


@pytest.mark.parametrize("weight_format", ["q8_0", "iq4_nl"])
def test_equals_the_xla_path_with_quantized_weights(weight_format):
  fused = stack(CFG, "pallas", weight_format=weight_format)
  xla = stack(CFG, "xla", weight_format=weight_format)
  y, _ = prefill_then_decode(fused, 1, jnp.float32)
  y_ref, _ = prefill_then_decode(xla, 1, jnp.float32)
  assert rel_err(y, y_ref) < TOL[jnp.float32]


@pytest.mark.parametrize("cache_dtype", [jnp.float32, jnp.int8], ids=["f32_cache", "int8_cache"])
@pytest.mark.parametrize("batch", ["one_row", "ragged"])
def test_decode_reads_both_projections_from_one_product(batch, cache_dtype, monkeypatch):
  """Decode rows on a GPU: q_proj and kv_a_proj_with_mqa run as one product, whose [q | kv]
  output the latent kernel reads in place (layers.joint_product, latent_update with kv=None).
  Here the GPU condition is dropped and the kernels interpreted: the decode steps of a one-row
  batch and of a ragged one (padding, stack's folded input norm) equal the XLA path's."""
  monkeypatch.setattr(layers, "on_joint_product", lambda x, weights: len(weights) > 1 and
                      math.prod(x.shape[:-1]) <= layers.GEMV_MAX_ROWS)
  joint_kv = []
  update = latent_update.latent_update
  monkeypatch.setattr(latent_update, "latent_update",
                      lambda q, kv, *a, **k: joint_kv.append(kv is None) or update(q, kv, *a, **k))
  start = (lambda model: one_row_prefill(model, cache_dtype) if batch == "one_row"
           else prefill(model, 6, cache_dtype))
  run = lambda model: decode(model, *start(model), steps=3)[0]
  y = run(stack(CFG, "pallas"))
  assert joint_kv and all(joint_kv)  # every latent kernel read the joint buffer
  assert rel_err(y, run(stack(CFG, "xla"))) < TOL[jnp.float32]


def test_bfloat16_equals_the_xla_path():
  y, _ = prefill_then_decode(stack(CFG, "pallas", jnp.bfloat16), 2, jnp.bfloat16)
  y_ref, _ = prefill_then_decode(stack(CFG, "xla", jnp.bfloat16), 2, jnp.bfloat16)
  assert rel_err(y, y_ref) < TOL[jnp.bfloat16]


def test_decode_loop_equals_single_steps():
  model = stack(CFG, "pallas")
  ys_steps, caches_steps = prefill_then_decode(model, 3, jnp.float32, steps=4)
  caches, x, positions = prefill(model, 3, jnp.float32)
  ys, caches = mla_jax.decode_loop(model, x, positions, caches, 4)
  assert rel_err(ys, ys_steps) < TOL[jnp.float32]
  for cache, ref in zip(caches, caches_steps):
    np.testing.assert_array_equal(cache.lengths, ref.lengths)


def test_full_row_sets_overflow_and_keeps_its_entries():
  layer = mla_jax.MLAttention(CFG, backend="pallas", rngs=nnx.Rngs(0))
  cache = layer.init_cache(2, 4, jnp.float32)
  x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 4, CFG.hidden_size)), jnp.float32)
  _, cache = layer(x, jnp.asarray([[0, 1, 2, 3], [0, 1, -1, -1]], jnp.int32), cache)
  before = cache
  step = jax.jit(lambda x, p, c: layer(x, p, c))
  _, cache = step(x[:, :1], jnp.asarray([[4], [2]], jnp.int32), cache)
  np.testing.assert_array_equal(cache.lengths, [4, 3])
  np.testing.assert_array_equal(cache.overflow, [True, False])
  np.testing.assert_array_equal(cache.c_kv[0], before.c_kv[0])  # the full row is untouched
  with pytest.raises(ValueError, match="overflow in rows \\[0\\]"):
    cache.check()


@pytest.mark.parametrize("cache_dtype", [jnp.float32, jnp.int8], ids=["f32_cache", "int8_cache"])
def test_decode_updates_cache_in_place(cache_dtype):
  layer = mla_jax.MLAttention(CFG, backend="pallas", rngs=nnx.Rngs(0))
  step = mla_jax.jit_step(layer)
  x = jnp.ones((2, 1, CFG.hidden_size))
  positions = jnp.zeros((2, 1), jnp.int32)
  _, cache = step(x, positions, layer.init_cache(2, 64, cache_dtype))  # compile
  buffers = [leaf.unsafe_buffer_pointer() for leaf in jax.tree.leaves(cache)]
  for t in range(1, 4):
    _, cache = step(x, positions + t, cache)
  assert [leaf.unsafe_buffer_pointer() for leaf in jax.tree.leaves(cache)] == buffers
  np.testing.assert_array_equal(cache.lengths, [4, 4])


@pytest.mark.parametrize("cache_dtype", [jnp.bfloat16, jnp.int8], ids=["bf16_cache", "int8_cache"])
def test_compiled_step_aliases_the_whole_cache(cache_dtype):
  """The compiled step with the cache donated writes its outputs into the cache's buffers, all of
  them (the latent kernel's outputs are aliased to its cache operands)."""
  layer = mla_jax.MLAttention(CFG, backend="pallas", dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(layer)
  step = jax.jit(lambda s, x, p, c: nnx.merge(graphdef, s)(x, p, c), donate_argnums=(3,))
  cache = layer.init_cache(2, 2048, cache_dtype)
  compiled = step.lower(state, jnp.zeros((2, 1, CFG.hidden_size), jnp.bfloat16),
                        jnp.zeros((2, 1), jnp.int32), cache).compile()
  assert compiled.memory_analysis().alias_size_in_bytes >= sum(
      leaf.nbytes for leaf in jax.tree.leaves(cache))
