"""MLAttention on fresh random inputs: modes agree, caching is exact, batches may be ragged,
the module jits, differentiates and bridges to Linen, and decode updates the cache in place."""

import dataclasses
import inspect
import warnings

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.nnx import bridge

import mla_jax
from mla_jax import attention, quant, rope
from mla_jax.layers import RMSNorm
from mla_jax.ops import reference
from mla_jax.ops import xla as ops_xla
from mla_jax.ops.decode import cpu as cpu_decode
from helpers import RTOL, rel_err, run_chunks
import hlo

# A small MLA shape with every feature of V2-Lite (YaRN, K != V) and one with q_lora (V3 style).
TINY = dataclasses.replace(mla_jax.MLAConfig.deepseek_v2_lite(), hidden_size=64, num_heads=4,
                           kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
                           num_layers=1)
TINY_QLORA = dataclasses.replace(TINY, q_lora_rank=24)
F32_TOL = 2e-5


def make(cfg=TINY, mode="absorbed", seed=0, **kw):
  return mla_jax.MLAttention(cfg, mode=mode, backend="xla", rngs=nnx.Rngs(seed), **kw)


def inputs(rng, cfg, B, T, start=None):
  x = jnp.asarray(rng.standard_normal((B, T, cfg.hidden_size)), jnp.float32)
  start = rng.integers(0, 9000, B) if start is None else np.asarray(start)
  return x, jnp.asarray(start[:, None] + np.arange(T)[None], jnp.int32)


def reference_layer(attn, x, positions):
  """Independent float32 forward of one layer: one causal pass, decompressed per-head K/V."""
  cfg, p = attn.cfg, nnx.state(attn, nnx.Param)
  dense = lambda layer, h: h @ layer["weight"][...].T

  def rms(h, w):
    return w * h / jnp.sqrt(jnp.mean(h * h, -1, keepdims=True) + cfg.rms_norm_eps)

  B, T, _ = x.shape
  if cfg.q_lora_rank is None:
    q = dense(p["q_proj"], x)
  else:
    q = dense(p["q_b_proj"], rms(dense(p["q_a_proj"], x), p["q_a_layernorm"]["weight"][...]))
  q = q.reshape(B, T, cfg.num_heads, cfg.qk_head_dim)
  kv = dense(p["kv_a_proj_with_mqa"], x)
  c_kv = rms(kv[..., :cfg.kv_lora_rank], p["kv_a_layernorm"]["weight"][...])
  cos, sin = rope.rope_tables(cfg, positions)
  q_rope = rope.apply_rope(q[..., cfg.qk_nope_head_dim:], cos[:, :, None], sin[:, :, None])
  k_rope = rope.apply_rope(kv[..., cfg.kv_lora_rank:], cos, sin)
  k_nope = jnp.einsum("btc,hkc->bthk", c_kv, p["kv_b_proj"]["wk_b"][...])
  v = jnp.einsum("btc,hcv->bthv", c_kv, p["kv_b_proj"]["wv_b"][...])
  k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None], (*k_nope.shape[:3],
                                                                     cfg.qk_rope_head_dim))], -1)
  slots = jnp.broadcast_to(jnp.arange(T), (B, T))
  heads = reference.standard_attention(jnp.concatenate([q[..., :cfg.qk_nope_head_dim], q_rope], -1),
                                       k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), slots,
                                       jnp.full((B,), T), sm_scale=cfg.softmax_scale)
  return dense(p["o_proj"], heads.reshape(B, T, -1))


@pytest.mark.parametrize("cfg", [TINY, TINY_QLORA], ids=["v2lite", "qlora"])
@pytest.mark.parametrize("mode", ["standard", "absorbed"])
def test_full_pass_matches_reference_layer(cfg, mode, rng):
  attn = make(cfg, mode)
  x, pos = inputs(rng, cfg, 3, 10)
  y, _ = attn(x, pos, attn.init_cache(3, 16, jnp.float32))
  assert rel_err(y, reference_layer(attn, x, pos)) < F32_TOL


def test_standard_equals_absorbed(rng):
  standard, absorbed = make(mode="standard"), make(mode="absorbed")
  x, pos = inputs(rng, TINY, 2, 12)
  y_std, _ = run_chunks(standard, x, pos, [7, 1, 1, 3], 20)
  y_abs, _ = run_chunks(absorbed, x, pos, [7, 1, 1, 3], 20)
  assert rel_err(y_abs, y_std) < F32_TOL


@pytest.mark.parametrize("mode", ["standard", "absorbed"])
def test_incremental_and_chunked_prefill_equal_full(mode, rng):
  attn = make(mode=mode)
  x, pos = inputs(rng, TINY, 2, 13)
  full, _ = run_chunks(attn, x, pos, [13], 16)
  decode, _ = run_chunks(attn, x, pos, [5] + [1] * 8, 16)
  chunked, _ = run_chunks(attn, x, pos, [4, 6, 1, 2], 16)
  assert rel_err(decode, full) < F32_TOL
  assert rel_err(chunked, full) < F32_TOL


@pytest.mark.parametrize("mode", ["standard", "absorbed"])
def test_ragged_batch_equals_each_row_alone(mode, rng):
  """Rows with different prompt lengths (right-padded with position -1) then decode together."""
  attn = make(mode=mode)
  call = mla_jax.jit_step(attn)
  lengths = np.array([3, 9, 6])
  x, pos = inputs(rng, TINY, 3, 9)
  padded_pos = jnp.where(jnp.arange(9)[None] < lengths[:, None], pos, -1)
  cache = attn.init_cache(3, 16, jnp.float32)
  y_prefill, cache = call(x, padded_pos, cache)
  np.testing.assert_array_equal(cache.lengths, lengths)
  x_dec, _ = inputs(rng, TINY, 3, 1)
  y_dec, cache = call(x_dec, pos[:, :1] + lengths[:, None], cache)
  np.testing.assert_array_equal(y_prefill[0, 3:], 0.0)
  for b, n in enumerate(lengths):
    row_cache = attn.init_cache(1, 16, jnp.float32)
    y_row, row_cache = call(x[b:b + 1, :n], pos[b:b + 1, :n], row_cache)
    y_row_dec, _ = call(x_dec[b:b + 1], pos[b:b + 1, :1] + n, row_cache)
    assert rel_err(y_prefill[b, :n], y_row[0]) < F32_TOL
    assert rel_err(y_dec[b], y_row_dec[0]) < F32_TOL


@pytest.mark.parametrize("mode,backend", [("standard", "xla"), ("absorbed", "xla"),
                                          ("absorbed", "pallas")])
def test_padding_anywhere_equals_each_row_alone(mode, backend, rng):
  """Left padding (transformers' batched generation), padding in the middle and right padding
  in one batch: each row's real tokens are cached in order, its outputs equal the row alone, and
  the padding's outputs are 0; a decode step afterwards agrees too."""
  cfg = TINY if backend == "xla" else dataclasses.replace(  # shapes the Pallas GEMV takes
      TINY, qk_nope_head_dim=32, kv_lora_rank=64, qk_rope_head_dim=16, v_head_dim=32)
  attn = mla_jax.MLAttention(cfg, mode=mode, backend=backend, rngs=nnx.Rngs(0))
  call = mla_jax.jit_step(attn)
  real = np.array([[0, 0, 0, 1, 1, 1, 1, 1],   # left-padded
                   [1, 1, 0, 0, 1, 1, 0, 1],   # padding in between
                   [1, 1, 1, 1, 1, 0, 0, 0]],  # right-padded
                  bool)
  x, _ = inputs(rng, cfg, 3, 8)
  start = rng.integers(0, 500, 3)
  pos = np.where(real, start[:, None] + np.cumsum(real, axis=1) - 1, -1)
  cache = attn.init_cache(3, 12, jnp.float32)
  y, cache = call(x, jnp.asarray(pos, jnp.int32), cache)
  np.testing.assert_array_equal(cache.lengths, real.sum(axis=1))
  np.testing.assert_array_equal(np.asarray(y)[~real], 0.0)
  x_dec, _ = inputs(rng, cfg, 3, 1)
  n = real.sum(axis=1)
  y_dec, _ = call(x_dec, jnp.asarray(start + n, jnp.int32)[:, None], cache)
  for b in range(3):
    idx = np.flatnonzero(real[b])
    row_cache = attn.init_cache(1, 12, jnp.float32)
    y_row, row_cache = call(x[b:b + 1, idx], jnp.asarray(pos[b:b + 1, idx], jnp.int32), row_cache)
    y_row_dec, _ = call(x_dec[b:b + 1], jnp.asarray([[start[b] + n[b]]], jnp.int32), row_cache)
    assert rel_err(y[b, idx], y_row[0]) < F32_TOL
    assert rel_err(y_dec[b], y_row_dec[0]) < F32_TOL


@pytest.mark.parametrize("cfg", [TINY, TINY_QLORA], ids=["q_proj", "q_lora"])
@pytest.mark.parametrize("mode,backend", [("absorbed", "xla"), ("standard", "xla"),
                                          ("absorbed", "pallas")])
def test_input_norm_equals_calling_on_the_normalised_input(cfg, mode, backend, rng):
  """layer(x, input_norm=norm) is layer(norm(x)): a prefill, then a decode step, where the Pallas
  absorbed step folds the norm into the projections and its latent kernel."""
  layer = mla_jax.MLAttention(cfg, mode=mode, backend=backend, rngs=nnx.Rngs(0))
  norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
  norm.weight[...] = jnp.asarray(rng.uniform(0.5, 1.5, cfg.hidden_size), jnp.float32)
  x, positions = inputs(rng, cfg, 2, 6)
  x = 4 * x  # far from unit rms: a norm that is not applied shows
  outs = []
  for fold in (True, False):
    cache = layer.init_cache(2, 8)
    for t in (slice(0, 5), slice(5, 6)):
      kwargs = dict(input_norm=norm) if fold else {}
      y, cache = layer(x[:, t] if fold else norm(x[:, t]), positions[:, t], cache, **kwargs)
    outs.append(y)
  assert rel_err(outs[0], outs[1]) < 2e-5


@pytest.mark.parametrize("mode", ["standard", "absorbed"])
def test_jit_matches_eager(mode, rng):
  """A prefill, then a decode step, called op by op and jitted (as run_chunks calls it)."""
  attn = make(mode=mode)
  x, pos = inputs(rng, TINY, 2, 7)
  cache = attn.init_cache(2, 8, jnp.float32)
  prefill, cache = attn(x[:, :6], pos[:, :6], cache)
  step, cache = attn(x[:, 6:], pos[:, 6:], cache)
  y_jit, cache_jit = run_chunks(attn, x, pos, [6, 1], 8)
  assert rel_err(y_jit, jnp.concatenate([prefill, step], axis=1)) < F32_TOL
  np.testing.assert_array_equal(cache_jit.lengths, cache.lengths)


@pytest.mark.parametrize("mode", ["standard", "absorbed"])
def test_prefill_gradients_match_reference(mode, rng):
  attn = make(mode=mode)
  x, pos = inputs(rng, TINY, 2, 7)
  cotangent = jnp.asarray(rng.standard_normal((2, 7, TINY.hidden_size)), jnp.float32)

  def module_loss(m, x):
    y, _ = m(x, pos, m.init_cache(2, 8, jnp.float32))
    return jnp.sum(y * cotangent)

  def reference_loss(m, x):
    return jnp.sum(reference_layer(m, x, pos) * cotangent)

  got = nnx.grad(module_loss, argnums=(0, 1))(attn, x)
  want = nnx.grad(reference_loss, argnums=(0, 1))(attn, x)
  assert rel_err(got[1], want[1]) < 1e-4
  for (path, g), (_, w) in zip(nnx.to_flat_state(got[0]), nnx.to_flat_state(want[0])):
    assert rel_err(g[...], w[...]) < 1e-4, path


def test_drops_into_linen_through_bridge(rng):
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, positions, cache):
      attn = bridge.to_linen(mla_jax.MLAttention, TINY, mode="absorbed", backend="xla")
      y, cache = attn(x, positions, cache)
      return x + y, cache

  x, pos = inputs(rng, TINY, 2, 5)
  cache = mla_jax.init_cache(TINY, 2, 8, mode="absorbed", dtype=jnp.float32)
  block = Block()
  variables = block.init(jax.random.key(1), x, pos, cache)
  out, _ = block.apply(variables, x, pos, cache)
  # The same parameters in a plain NNX module must give the same layer output.
  attn = make()
  for path, value in traverse_util.flatten_dict(variables["params"]["ToLinen_0"]).items():
    param = attn
    for name in path:
      param = getattr(param, name)
    param[...] = value
  assert rel_err(out - x, reference_layer(attn, x, pos)) < F32_TOL


@pytest.mark.parametrize("mode", ["standard", "absorbed"])
def test_decode_updates_cache_in_place(mode, rng):
  attn = make(mode=mode)
  step = mla_jax.jit_step(attn)
  x, pos = inputs(rng, TINY, 2, 1)
  cache = attn.init_cache(2, 64, jnp.float32)
  _, cache = step(x, pos, cache)  # compile
  buffers = [leaf.unsafe_buffer_pointer() for leaf in jax.tree.leaves(cache)]
  for t in range(1, 6):
    _, cache = step(x, pos + t, cache)
  assert [leaf.unsafe_buffer_pointer() for leaf in jax.tree.leaves(cache)] == buffers
  np.testing.assert_array_equal(cache.lengths, [6, 6])


def test_jit_step_follows_parameter_updates(rng):
  """jit_step reads the module's Variables at every call: in-place writes show (a dtype change
  recompiles); a replaced submodule does not, as its docstring says (build a new step)."""
  attn = make()
  step = mla_jax.jit_step(attn)
  x, pos = inputs(rng, TINY, 2, 3)

  def jitted_and_eager():
    jitted, _ = step(x, pos, attn.init_cache(2, 4, jnp.float32))
    eager, _ = attn(x, pos, attn.init_cache(2, 4, jnp.float32))
    assert rel_err(jitted, eager) < F32_TOL
    return jitted

  before = jitted_and_eager()
  attn.o_proj.weight[...] = 2 * attn.o_proj.weight[...]
  assert rel_err(jitted_and_eager(), 2 * before) < F32_TOL
  nnx.update(attn, nnx.state(make(seed=1), nnx.Param))
  assert rel_err(jitted_and_eager(), before) > 0.1
  attn.kv_b_proj.set_weight_format("bf16")
  assert attn.kv_b_proj.wk_b[...].dtype == jnp.bfloat16
  followed = jitted_and_eager()

  attn.o_proj = nnx.Linear(TINY.num_heads * TINY.v_head_dim, TINY.hidden_size, use_bias=False,
                           rngs=nnx.Rngs(2))
  stale, _ = step(x, pos, attn.init_cache(2, 4, jnp.float32))
  np.testing.assert_array_equal(stale, followed)
  fresh, _ = mla_jax.jit_step(attn)(x, pos, attn.init_cache(2, 4, jnp.float32))
  eager, _ = attn(x, pos, attn.init_cache(2, 4, jnp.float32))
  assert rel_err(fresh, eager) < F32_TOL and rel_err(fresh, stale) > 0.1


def compiled_decode_step(rng, mode, batch, max_len, cache_dtype=jnp.float32, attn=None):
  """(the compiled decode step with the cache donated, the cache it was compiled for)."""
  attn = attn or make(mode=mode)
  graphdef, state = nnx.split(attn)
  x, pos = inputs(rng, TINY, batch, 1)
  step = jax.jit(lambda s, x, p, c: nnx.merge(graphdef, s)(x, p, c), donate_argnums=(3,))
  cache = attn.init_cache(batch, max_len, cache_dtype)
  return step.lower(state, x, pos, cache).compile(), cache


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("mode,cache_dtype", [("standard", jnp.float32), ("absorbed", jnp.float32),
                                              ("absorbed", jnp.int8)])
def test_decode_step_copies_no_cache(mode, cache_dtype, batch, rng):
  """The compiled step aliases the donated cache to its output, and each cache array it returns
  is a dynamic-update-slice or scatter of the cache parameter itself: XLA writes such an update
  into the donated buffer, so no step copies the cache (tests/hlo.py reads the HLO)."""
  compiled, cache = compiled_decode_step(rng, mode, batch, 2048, cache_dtype)
  assert compiled.memory_analysis().alias_size_in_bytes >= sum(
      leaf.nbytes for leaf in jax.tree.leaves(cache))
  shapes = [hlo.shape_of(leaf) for leaf in jax.tree.leaves(cache) if 2048 in leaf.shape]
  writes = hlo.in_place_writes(compiled.as_text(), shapes)
  assert set(writes.values()) == {"in place"}, writes


def test_absorbed_decode_step_has_no_cache_sized_temporaries(rng):
  """No array as large as a cache array is written per absorbed step besides the cache itself,
  on the platform's own decode path (backend="auto": the CPU shard path, or the Pallas kernels).

  The XLA baseline is not held to this: it zeroes the slots past each row's length before its
  value product, a select XLA CPU writes out (ops/xla.py). Nor is standard mode: on the H200,
  XLA writes its [B,H,S,V] float32 p·V product at some lengths (B=1, S=4096 here). Storing V
  transposed removes that but made the decode 28-46% slower at S=16448, so the layout stays
  (docs/experiments.md).
  """
  cfg = dataclasses.replace(TINY, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                            v_head_dim=32)  # powers of two, as the GPU kernels need
  attn = mla_jax.MLAttention(cfg, backend="auto", rngs=nnx.Rngs(0))
  # The CPU path's temporaries are a step's rows (W·(C+R) values; a cache shorter than a step is
  # one shard, whose rows past the lengths it zeroes in a copy, as the einsum does), so the cache
  # is 8 steps and 32 slots: its smallest array, k_rope (S·R), is larger than a step of c_kv.
  S = 8 * cpu_decode.default_rows_per_step(64, 16) + 32
  compiled, cache = compiled_decode_step(rng, "absorbed", 1, S, attn=attn)
  smallest = min(leaf.nbytes for leaf in jax.tree.leaves(cache) if S in leaf.shape)
  assert hlo.large_temporaries(compiled.as_text(), smallest) == []


@pytest.mark.parametrize("cache_dtype", [jnp.bfloat16, jnp.float16])
def test_standard_decode_reads_a_cache_of_another_dtype_without_a_converted_copy(rng,
                                                                                cache_dtype):
  """A float32 module with a 16-bit standard cache: the decode step converts the cache block by
  block (ops/xla.py's PREFILL_BLOCK slots), never into a cache-sized copy, and matches the
  float32-cache step within the 16-bit rounding of the cached entries."""
  attn = make(mode="standard")
  S = 16 * ops_xla.PREFILL_BLOCK  # a float32 block of k smaller than the 16-bit v cache
  compiled, cache = compiled_decode_step(rng, "standard", 1, S, cache_dtype, attn=attn)
  smallest = min(leaf.nbytes for leaf in jax.tree.leaves(cache) if S in leaf.shape)
  assert hlo.large_temporaries(compiled.as_text(), smallest) == []
  x, pos = inputs(rng, TINY, 2, 9)
  y16, _ = run_chunks(attn, x, pos, [6, 1, 1, 1], 12, cache_dtype)
  y32, _ = run_chunks(attn, x, pos, [6, 1, 1, 1], 12, jnp.float32)
  assert rel_err(y16[:, 6:], y32[:, 6:]) <= RTOL[cache_dtype]


def test_hlo_checks_see_copies_and_temporaries():
  """The HLO readings used above tell an in-place update from a copied one, and see a
  cache-sized temporary, also one written inside a loop or a conditional branch."""
  cache, x = jnp.zeros((2, 64, 8)), jnp.ones((2, 8))
  update = lambda c, x: c.at[:, 3].set(x)
  masked = lambda c, x: jnp.where(jnp.arange(64)[None, :, None] == 3, x[:, None], c)
  for f, donate, expected in [(update, (0,), True), (update, (), False), (masked, (0,), False)]:
    text = jax.jit(f, donate_argnums=donate).lower(cache, x).compile().as_text()
    assert (hlo.in_place_writes(text, ["f32[2,64,8]"])["f32[2,64,8]"] == "in place") == expected
  # A full sort of the cache is a cache-sized temporary; the in-place update alone is none.
  for f, expected in [(update, False), (lambda c, x: (update(c, x), jnp.sort(c, 1)[:, 0]), True)]:
    text = jax.jit(f, donate_argnums=(0,)).lower(cache, x).compile().as_text()
    assert bool(hlo.large_temporaries(text, cache.nbytes)) == expected
  sorted_row = lambda c: jnp.sort(c, 1)[:, 0]
  in_loop = lambda c, x: jax.lax.fori_loop(0, 3, lambda i, y: y + sorted_row(c + i), x)
  in_branch = lambda c, x: jax.lax.cond(x[0, 0] > 0, lambda: sorted_row(c), lambda: x)
  for f in (in_loop, in_branch):
    text = jax.jit(f).lower(cache, x).compile().as_text()
    assert hlo.large_temporaries(text, cache.nbytes), text
  # A custom call's output aliased to its operand (a Pallas kernel's in-place cache write) is
  # none; its other outputs are.
  call = ("ENTRY %main (p: f32[2,64,8]) -> f32[2,64,8] {\n"
          "  %p = f32[2,64,8]{2,1,0} parameter(0)\n"
          "  %k = (f32[2,64,8]{2,1,0}, f32[2,64,8]{2,1,0}) custom-call(%p), "
          "custom_call_target=\"kernel\", output_to_operand_aliasing={{0}: (0, {})}\n"
          "  ROOT %out = f32[2,64,8]{2,1,0} get-tuple-element(%k), index=0\n}")
  assert hlo.large_temporaries(call, cache.nbytes) == ["k custom-call f32[2,64,8]"]
  assert len(hlo.large_temporaries(call.replace("output_to_operand_aliasing={{0}: (0, {})}",
                                                "api_version=API_VERSION_TYPED_FFI"),
                                   cache.nbytes)) == 2


def test_int8_cache_close_to_float(rng):
  attn = make()
  x, pos = inputs(rng, TINY, 2, 9)
  y_f32, _ = run_chunks(attn, x, pos, [6, 1, 1, 1], 12)
  y_int8, cache = run_chunks(attn, x, pos, [6, 1, 1, 1], 12, cache_dtype=jnp.int8)
  assert isinstance(cache.c_kv, mla_jax.quant.Int8Rows)
  assert rel_err(y_int8, y_f32) < 2e-2


def test_cache_overflow_is_detected(rng):
  attn = make()
  x, pos = inputs(rng, TINY, 2, 5)
  with pytest.raises(ValueError, match="overflow"):
    attn(x, pos, attn.init_cache(2, 4, jnp.float32))
  # Under jit the flag is returned; valid entries are never overwritten.
  step = nnx.jit(lambda m, x, p, c: m(x, p, c))
  _, cache = step(attn, x[:, :3], pos[:, :3], attn.init_cache(2, 4, jnp.float32))
  kept = np.asarray(cache.c_kv[:, :3])
  _, cache = step(attn, x[:, 3:], pos[:, 3:], cache)
  np.testing.assert_array_equal(cache.overflow, [True, True])
  np.testing.assert_array_equal(cache.lengths, [4, 4])
  np.testing.assert_array_equal(cache.c_kv[:, :3], kept)
  with pytest.raises(ValueError, match="overflow"):
    cache.check()


@pytest.mark.parametrize("bad", ["x_width", "x_empty", "positions_shape", "positions_dtype",
                                 "cache_kind", "cache_batch"])
def test_bad_inputs_raise_value_error(bad, rng):
  attn = make()
  x, pos = inputs(rng, TINY, 2, 3)
  cache = attn.init_cache(2, 8, jnp.float32)
  args = {
      "x_width": (x[..., :-1], pos, cache),
      "x_empty": (x[:, :0], pos[:, :0], cache),  # T=0: no token
      "positions_shape": (x, pos[:, :2], cache),
      "positions_dtype": (x, pos.astype(jnp.float32), cache),
      "cache_kind": (x, pos, make(mode="standard").init_cache(2, 8, jnp.float32)),
      "cache_batch": (x, pos, attn.init_cache(3, 8, jnp.float32)),
  }[bad]
  with pytest.raises(ValueError):
    attn(*args)


def test_bad_construction_raises_value_error():
  with pytest.raises(ValueError, match="mode"):
    mla_jax.MLAttention(TINY, mode="latent", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="backend"):
    mla_jax.MLAttention(TINY, mode="absorbed", backend="tpu", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="int8"):
    make(mode="standard").init_cache(1, 8, jnp.int8)
  with pytest.raises(TypeError):  # mode and backend are keyword-only
    mla_jax.MLAttention(TINY, "absorbed", rngs=nnx.Rngs(0))


def test_decode_lowering_reaches_the_split_kv_kernel(monkeypatch, rng):
  """decode_lowering picks the split-KV kernel of a pallas decode step; a kernel that cannot take
  the step's arguments says why (the Mosaic kernel needs bfloat16), and a bad value is refused
  when the module is built."""
  decode_lowering = "triton"
  seen = []
  decode = mla_jax.ops.decode.mla_decode
  monkeypatch.setattr(mla_jax.ops.decode, "mla_decode",
                      lambda *a, **k: seen.append(k.get("lowering")) or decode(*a, **k))
  x, positions = inputs(rng, TINY, 2, 1)
  layer = mla_jax.MLAttention(TINY, backend="pallas", decode_lowering=decode_lowering,
                              rngs=nnx.Rngs(0))
  layer(x, positions, layer.init_cache(2, 8))
  assert seen == [decode_lowering]
  mosaic = mla_jax.MLAttention(TINY, backend="pallas", decode_lowering="mosaic", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="lowering='mosaic'.*bfloat16"):
    mosaic(x, positions, mosaic.init_cache(2, 8))
  with pytest.raises(ValueError, match="decode_lowering='cuda'"):
    mla_jax.MLAttention(TINY, backend="pallas", decode_lowering="cuda", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="backend='pallas'"):
    mla_jax.MLAttention(TINY, backend="xla", decode_lowering="triton", rngs=nnx.Rngs(0))


def test_signature_shows_the_constructor_arguments():
  params = inspect.signature(mla_jax.MLAttention).parameters
  assert list(params)[:3] == ["cfg", "mode", "backend"]
  assert params["mode"].kind == params["backend"].kind == inspect.Parameter.KEYWORD_ONLY
  assert params["mode"].default == "absorbed" and params["backend"].default == "auto"
  assert list(inspect.signature(make()).parameters) == ["x", "positions", "cache",  # __call__
                                                       "input_norm"]
  load_params = inspect.signature(mla_jax.load_hf_attention).parameters
  assert all(load_params[name].kind == inspect.Parameter.KEYWORD_ONLY
             for name in ("mode", "dtype", "backend", "weight_format", "gemv_lowering"))


@pytest.mark.parametrize("mode,dtype", [("absorbed", jnp.float32), ("absorbed", jnp.bfloat16),
                                        ("absorbed", jnp.int8), ("standard", jnp.float32),
                                        ("standard", jnp.bfloat16)])
def test_init_cache_from_config_equals_the_modules(mode, dtype):
  B, S, cfg = 3, 10, TINY_QLORA
  cache = mla_jax.init_cache(cfg, B, S, mode=mode, dtype=dtype)
  want = make(cfg, mode).init_cache(B, S, dtype)
  assert type(cache) is type(want)
  assert jax.tree.structure(cache) == jax.tree.structure(want)
  for got, expected in zip(jax.tree.leaves(cache), jax.tree.leaves(want)):
    assert got.shape == expected.shape and got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)
  assert (cache.batch_size, cache.max_len) == (B, S)
  np.testing.assert_array_equal(cache.lengths, np.zeros(B, np.int32))
  H, K, R, C, V = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank, \
      cfg.v_head_dim
  if mode == "absorbed":
    assert isinstance(cache, mla_jax.LatentCache)
    assert cache.c_kv.shape == (B, S, C) and cache.k_rope.shape == (B, S, R)
    assert isinstance(cache.c_kv, mla_jax.quant.Int8Rows) == (dtype == jnp.int8)
  else:
    assert isinstance(cache, mla_jax.KVCache)
    assert cache.k.shape == (B, H, S, K + R) and cache.v.shape == (B, H, S, V)
    assert cache.k.dtype == dtype


def test_init_cache_default_dtype_is_bfloat16():
  assert mla_jax.init_cache(TINY, 1, 4).c_kv.dtype == jnp.bfloat16
  assert mla_jax.init_cache(TINY, 1, 4, mode="standard").v.dtype == jnp.bfloat16


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_a_modules_cache_defaults_to_its_dtype(dtype):
  for mode in ("absorbed", "standard"):
    attn = make(mode=mode, dtype=dtype)
    assert jax.tree.leaves(attn.init_cache(1, 4))[0].dtype == dtype
  stack = mla_jax.AttentionStack(TINY, dtype=dtype, backend="xla", rngs=nnx.Rngs(0))
  assert stack.init_cache(1, 4)[0].c_kv.dtype == dtype


@pytest.mark.parametrize("kwargs,name", [
    (dict(batch_size=0), "batch_size"), (dict(max_len=-3), "max_len"),
    (dict(batch_size=2.5), "batch_size"), (dict(mode="latent"), "mode"),
    (dict(dtype=jnp.int32), "dtype"), (dict(dtype="no-such-dtype"), "dtype"),
    (dict(dtype=None), "dtype"), (dict(mode="standard", dtype=jnp.int8), "dtype=int8")])
def test_init_cache_bad_arguments_are_named(kwargs, name):
  args = dict(batch_size=2, max_len=8, mode="absorbed", dtype=jnp.float32) | kwargs
  with pytest.raises(ValueError, match=name):
    mla_jax.init_cache(TINY, args["batch_size"], args["max_len"], mode=args["mode"],
                       dtype=args["dtype"])


def test_bfloat16_modes_agree_with_float32(rng):
  """bf16 params, compute and cache (the benchmark setting) stay within bf16 error of f32."""
  x, pos = inputs(rng, TINY, 2, 7)
  reference_module = make()
  want, _ = run_chunks(reference_module, x, pos, [5, 1, 1], 8)
  params = nnx.state(reference_module, nnx.Param)
  for mode in ["standard", "absorbed"]:
    attn = make(mode=mode, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    nnx.update(attn, jax.tree.map(lambda a: a.astype(jnp.bfloat16), params))
    cache = attn.init_cache(2, 8)
    step = mla_jax.jit_step(attn)
    ys = []
    for t0, n in [(0, 5), (5, 1), (6, 1)]:
      y, cache = step(x[:, t0:t0 + n], pos[:, t0:t0 + n], cache)
      ys.append(y)
    assert rel_err(jnp.concatenate(ys, 1), want) < 3e-2, mode


@pytest.mark.parametrize("mode", ["standard", "absorbed"])
def test_prefill_work_follows_the_filled_length_not_max_len(mode):
  """Prefill attends block by block up to the longest row (ops/xla.py _blockwise): the compiled
  prefill's arithmetic is the same for a cache of 2048 slots and one of 16384 (XLA's cost
  analysis counts a loop body once, and the blocks are 1024 slots either way), where attending
  over the whole cache would make it grow 8x."""
  cfg = dataclasses.replace(TINY, hidden_size=128)
  attn = make(cfg, mode=mode)
  graphdef, state = nnx.split(attn)
  step = jax.jit(lambda s, x, p, c: nnx.merge(graphdef, s)(x, p, c), donate_argnums=(3,))

  def flops(max_len):
    cost = step.lower(state, jnp.ones((1, 64, cfg.hidden_size)), jnp.zeros((1, 64), jnp.int32),
                      attn.init_cache(1, max_len, jnp.float32)).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]

  assert flops(16384) <= 1.01 * flops(2048)


@pytest.mark.parametrize("block", [100, 1024, 4096])
def test_blockwise_prefill_equals_the_reference(block, rng):
  """Blocks of any size (the last one sliding back to end at S, and a cache shorter than one
  block) give what one softmax over the whole cache gives, with gradients; rows of different
  lengths, one ending inside the first block."""
  B, T, H, C, R, S = 2, 5, 3, 32, 8, 2500
  draw = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  q_latent, q_rope, c_kv, k_rope = draw(B, T, H, C), draw(B, T, H, R), draw(B, S, C), draw(B, S, R)
  kv_lengths = jnp.asarray([2200, 7])
  q_slots = kv_lengths[:, None] - T + jnp.arange(T)[None]
  for args in [(q_latent, q_rope, c_kv, k_rope), (q_latent, q_rope, quant.quantize_rows(c_kv),
                                                  k_rope.astype(jnp.bfloat16))]:
    out = ops_xla.latent_attention(*args, q_slots, kv_lengths, sm_scale=0.2, block=block)
    want = reference.latent_attention(*args, q_slots, kv_lengths, sm_scale=0.2)
    assert rel_err(out, want) < F32_TOL
  grad = jax.grad(lambda q: ops_xla.latent_attention(q, q_rope, c_kv, k_rope, q_slots, kv_lengths,
                                                     sm_scale=0.2, block=block).sum())
  want_grad = jax.grad(lambda q: reference.latent_attention(q, q_rope, c_kv, k_rope, q_slots,
                                                            kv_lengths, sm_scale=0.2).sum())
  assert rel_err(grad(q_latent), want_grad(q_latent)) < F32_TOL
  q, k, v = draw(B, T, H, 24), draw(B, H, S, 24), draw(B, H, S, 16)
  out = ops_xla.standard_attention(q, k, v, q_slots, kv_lengths, sm_scale=0.2, block=block)
  want = reference.standard_attention(q, k, v, q_slots, kv_lengths, sm_scale=0.2)
  assert rel_err(out, want) < F32_TOL


def test_pallas_without_a_gpu_warns_once():
  if jax.default_backend() == "gpu":
    pytest.skip("the kernels run compiled here")
  attention._warn_interpreted.cache_clear()
  with pytest.warns(UserWarning, match="interpret mode"):
    mla_jax.MLAttention(TINY, backend="pallas", rngs=nnx.Rngs(0))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    mla_jax.MLAttention(TINY, backend="pallas", rngs=nnx.Rngs(0))  # no second warning


def test_init_cache_warns_when_max_len_keeps_decode_off_the_mosaic_kernels(monkeypatch):
  """On a Hopper GPU (faked: only the plan is asked), a cache whose max_len is not a multiple of
  8 would send decode to the Triton kernel where the Mosaic one takes a rounded one: a warning
  names the rounded length. None for 16 slots, an explicit lowering, or an f32 module."""
  monkeypatch.setattr(attention.device, "is_gpu", lambda: True)
  monkeypatch.setattr(attention.device, "is_hopper", lambda: True)
  cfg = dataclasses.replace(TINY, kv_lora_rank=128, qk_rope_head_dim=64)  # Mosaic's, int8 too
  make = lambda **kw: mla_jax.MLAttention(cfg, backend="pallas", rngs=nnx.Rngs(0), **kw)
  attn = make(dtype=jnp.bfloat16)
  with pytest.warns(UserWarning, match=r"max_len=13 .*round_slots\(13\) = 16"):
    attn.init_cache(1, 13)
  with pytest.warns(UserWarning, match="max_len=13"):
    attn.init_cache(1, 13, dtype=jnp.int8)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    attn.init_cache(1, 16)
    make(dtype=jnp.bfloat16, decode_lowering="triton").init_cache(1, 13)
    make(dtype=jnp.float32).init_cache(1, 13)
