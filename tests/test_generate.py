"""AttentionStack and decode_loop: the stack is its layers composed, and N decode steps inside
one jit equal N single steps, ragged rows and padding included."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mla_jax
# The module, not the function mla_jax.generate that shadows it on the package.
from mla_jax.generate import _FeedBack, _jitted_loop  # pylint: disable=protected-access
from helpers import rel_err
import hlo

TINY = dataclasses.replace(mla_jax.MLAConfig.deepseek_v2_lite(), hidden_size=64, num_heads=4,
                           kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
                           num_layers=3)
F32_TOL = 2e-5


def _stack(mode, backend="xla", seed=0, **kw):
  return mla_jax.AttentionStack(TINY, mode=mode, backend=backend, rngs=nnx.Rngs(seed), **kw)


def _prompt(rng, B, T, lengths):
  """x [B,T,D] and positions [B,T] with row b's last T - lengths[b] tokens padding."""
  x = jnp.asarray(rng.standard_normal((B, T, TINY.hidden_size)), jnp.float32)
  start = rng.integers(0, 500, B)
  pos = start[:, None] + np.arange(T)[None]
  pos = np.where(np.arange(T)[None] < np.asarray(lengths)[:, None], pos, -1)
  return x, jnp.asarray(pos, jnp.int32)


@pytest.mark.parametrize("mode", ["standard", "absorbed"])
def test_stack_equals_its_layers_composed(mode, rng):
  stack = _stack(mode)
  x, pos = _prompt(rng, 2, 5, [5, 3])
  # Norm weights away from their initial ones, so that a skipped norm would show.
  for norm in stack.input_layernorms:
    norm.weight[...] = jnp.asarray(rng.uniform(0.5, 1.5, TINY.hidden_size), jnp.float32)
  caches = stack.init_cache(2, 8, dtype=jnp.float32)
  y, _ = stack(x, pos, caches)
  h = x
  for norm, layer in zip(stack.input_layernorms, stack.layers):
    attn, _ = layer(norm(h), pos, layer.init_cache(2, 8, dtype=jnp.float32))
    h = h + attn
  h = jnp.where(pos[..., None] >= 0, h, 0)
  assert rel_err(y, h) < F32_TOL


@pytest.mark.parametrize("mode", ["standard", "absorbed"])
def test_decode_loop_equals_single_steps(mode, rng):
  stack = _stack(mode)
  B, T, N = 3, 4, 5
  x, pos = _prompt(rng, B, T, [4, 2, 3])
  prefill = jax.jit(lambda x, p, c: stack(x, p, c))
  y_prompt, caches = prefill(x, pos, stack.init_cache(B, T + N, dtype=jnp.float32))
  # The first decode input: a fresh token per row, the middle row padding from here on.
  x0 = jnp.asarray(rng.standard_normal((B, 1, TINY.hidden_size)), jnp.float32)
  p0 = jnp.asarray([[7], [-1], [9]], jnp.int32)
  copy = lambda tree: jax.tree.map(jnp.copy, tree)

  ys, loop_caches = mla_jax.decode_loop(stack, x0, p0, copy(caches), N)
  step = jax.jit(lambda x, p, c: stack(x, p, c))
  x_t, p_t, c_t, expected = x0, p0, caches, []
  for _ in range(N):
    y, c_t = step(x_t, p_t, c_t)
    expected.append(y[:, 0])
    x_t, p_t = y, jnp.where(p_t >= 0, p_t + 1, p_t)
  assert ys.shape == (B, N, TINY.hidden_size)
  assert rel_err(ys, jnp.stack(expected, axis=1)) < F32_TOL
  assert np.all(np.asarray(ys[1]) == 0)  # padding rows output 0
  for got, want in zip(loop_caches, c_t):
    np.testing.assert_array_equal(got.lengths, want.lengths)
    np.testing.assert_array_equal(got.lengths, [4 + N, 2, 3 + N])


def test_decode_loop_follows_parameter_updates(rng):
  stack = _stack("absorbed")
  x0 = jnp.asarray(rng.standard_normal((1, 1, TINY.hidden_size)), jnp.float32)
  p0 = jnp.zeros((1, 1), jnp.int32)
  before, _ = mla_jax.decode_loop(stack, x0, p0, stack.init_cache(1, 4, dtype=jnp.float32), 2)
  stack.layers[0].o_proj.weight[...] = stack.layers[0].o_proj.weight[...] * 2
  after, _ = mla_jax.decode_loop(stack, x0, p0, stack.init_cache(1, 4, dtype=jnp.float32), 2)
  assert rel_err(after, before) > 1e-3


def test_decode_loop_bad_inputs_are_named():
  stack = _stack("absorbed")
  caches = stack.init_cache(1, 4, dtype=jnp.float32)
  x = jnp.zeros((1, 2, TINY.hidden_size))
  with pytest.raises(ValueError, match="x.shape"):
    mla_jax.decode_loop(stack, x, jnp.zeros((1, 2), jnp.int32), caches, 2)
  with pytest.raises(ValueError, match="num_steps"):
    mla_jax.decode_loop(stack, x[:, :1], jnp.zeros((1, 1), jnp.int32), caches, 0)
  with pytest.raises(ValueError, match="len\\(caches\\)"):
    stack(x, jnp.zeros((1, 2), jnp.int32), caches[:1])


@pytest.mark.parametrize("from_shapes", [False, True], ids=["arrays", "shapes"])
@pytest.mark.parametrize("cache_dtype", [jnp.bfloat16, jnp.int8])
def test_fill_caches_sets_lengths_and_random_contents(cache_dtype, from_shapes):
  stack = _stack("absorbed")
  empty = lambda: stack.init_cache(2, 16, dtype=cache_dtype)
  caches = mla_jax.stack.fill_caches(jax.eval_shape(empty) if from_shapes else empty(), 11,
                                     jax.random.key(0))
  for cache, want in zip(caches, empty()):
    assert jax.tree.structure(cache) == jax.tree.structure(want)
    for leaf, want_leaf in zip(jax.tree.leaves(cache), jax.tree.leaves(want)):
      assert isinstance(leaf, jax.Array)
      assert (leaf.shape, leaf.dtype) == (want_leaf.shape, want_leaf.dtype)
    np.testing.assert_array_equal(cache.lengths, [11, 11])
    assert not np.any(cache.overflow)
    c_kv = mla_jax.quant.dequantize(cache.c_kv)
    assert float(jnp.std(c_kv)) > 0.5 and float(jnp.std(cache.k_rope.astype(jnp.float32))) > 0.5


def _cache_arrays(caches, max_len):
  return [leaf for leaf in jax.tree.leaves(caches) if max_len in leaf.shape]


@pytest.mark.parametrize("mode,cache_dtype", [("standard", jnp.float32), ("absorbed", jnp.float32),
                                              ("absorbed", jnp.int8)])
def test_stack_decode_step_writes_every_cache_in_place(mode, cache_dtype, rng):
  """The compiled stack step aliases every layer's donated cache to its output, and each cache
  array it returns is an in-place update of that layer's cache parameter (tests/hlo.py)."""
  stack = _stack(mode)
  graphdef, state = nnx.split(stack)
  x = jnp.asarray(rng.standard_normal((2, 1, TINY.hidden_size)), jnp.float32)
  pos = jnp.asarray([[5], [9]], jnp.int32)
  caches = stack.init_cache(2, 1024, dtype=cache_dtype)
  step = jax.jit(lambda s, x, p, c: nnx.merge(graphdef, s)(x, p, c), donate_argnums=(3,))
  compiled = step.lower(state, x, pos, caches).compile()
  arrays = _cache_arrays(caches, 1024)
  assert len(arrays) >= 2 * TINY.num_layers
  assert compiled.memory_analysis().alias_size_in_bytes >= sum(a.nbytes for a in arrays)
  writes = hlo.all_writes(compiled.as_text(), sorted({hlo.shape_of(a) for a in arrays}))
  described = [w for ws in writes.values() for w in ws]
  assert len(described) == len(arrays) and set(described) == {"in place"}, writes


def test_decode_loop_donates_every_cache(rng):
  """The loop's compiled call aliases all the caches it carries to its outputs: no step of the
  loop leaves the caches in a fresh buffer."""
  stack = _stack("absorbed")
  graphdef, state = nnx.split(stack)
  x = jnp.asarray(rng.standard_normal((1, 1, TINY.hidden_size)), jnp.float32)
  caches = stack.init_cache(1, 1024, dtype=jnp.float32)
  compiled = _jitted_loop(graphdef, 3, _FeedBack()).lower(
      state, x, jnp.zeros((1, 1), jnp.int32), caches).compile()
  assert compiled.memory_analysis().alias_size_in_bytes >= sum(
      a.nbytes for a in _cache_arrays(caches, 1024))
