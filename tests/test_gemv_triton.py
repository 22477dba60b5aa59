"""ops/gemv/triton.py: the fused all-heads batched GEMV against the float32 oracle.

On CPU the kernel runs in interpret mode (small K, N); with a GPU the same tests run compiled,
plus the V2-Lite/V3 product shapes (marked gpu).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import R, RTOL, gemv_oracle, gemv_weights, rel_err
from mla_jax import ops, quant
from mla_jax.ops import gemv
from mla_jax.ops.gemv import triton

ON_GPU = jax.default_backend() == "gpu"
FORMATS = ("bf16", "q8_0", "iq4_nl")
TUNINGS = {
    "dot": triton.TritonGemvTuning(dot=True, block_n=32),
    "fma": triton.TritonGemvTuning(dot=False, block_n=32),
    "dot_unrolled": triton.TritonGemvTuning(dot=True, block_n=16, unroll=True),
    "fma_unrolled": triton.TritonGemvTuning(dot=False, block_n=64, unroll=True),
    "dot_k2": triton.TritonGemvTuning(dot=True, block_n=32, block_k=2),
    "int8": triton.TritonGemvTuning(dot=True, int8=True, block_n=16),
    "dot_split3": triton.TritonGemvTuning(dot=True, block_n=32, split_k=3),
    "fma_split3_k2": triton.TritonGemvTuning(dot=False, block_n=32, block_k=2, split_k=3),
    "fma_prmt": triton.TritonGemvTuning(dot=False, block_n=32, lookup="prmt"),
    "dot_prmt": triton.TritonGemvTuning(dot=True, block_n=32, lookup="prmt"),
    "fma_split3_prmt": triton.TritonGemvTuning(dot=False, block_n=64, split_k=3, lookup="prmt"),
}


def _gemv(x, w, tuning=None):
  """Poisons the allocator with NaN first on GPU (interpret mode starts outputs at NaN)."""
  if ON_GPU:
    jnp.full((x.shape[0], x.shape[1], w.shape[2]), jnp.nan, x.dtype).block_until_ready()
  return gemv.batched_gemv(x, w, impl="pallas", lowering="triton", tuning=tuning,
                           interpret=not ON_GPU)


def _check(rng, B, H, K, N, fmt, tuning=None, dtype=jnp.bfloat16):
  q = jnp.asarray(rng.standard_normal((B, H, K + R)), dtype)  # x = q[..., :K], read in place
  w = gemv_weights(rng, H, K, N, fmt)
  y = _gemv(q, w, tuning)
  assert y.shape == (B, H, N) and y.dtype == dtype
  x = q[..., :K]
  if tuning is not None and tuning.int8:
    x = quant.quantize_q8_1(x).dequantize()
  tol = 1e-4 if tuning is not None and tuning.int8 and dtype == jnp.float32 else RTOL[dtype]
  assert rel_err(y, gemv_oracle(x, w)) <= tol


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("H", [1, 16, 128])
@pytest.mark.parametrize("B", [1, 3, 64])
def test_matches_reference_strided_x(B, H, fmt, rng):
  _check(rng, B, H, 64, 32, fmt)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("N,block_n", [(96, 64), (576, 128), (160, 32)])
def test_columns_not_a_power_of_two(N, block_n, fmt, rng):
  """N a multiple of 32 but no power of two (a projection's 3072 or 576 columns, at small
  scale): the column blocks shrink to a power of two that divides N (96: 32, 576: 64)."""
  _check(rng, 2, 1, 64, N, fmt, triton.TritonGemvTuning(block_n=block_n))


@pytest.mark.parametrize("fmt", ["q8_0", "iq4_nl"])
def test_one_row_long_contraction_splits_k(fmt, rng):
  """A quantized Linear's product (H=1, B=1, K >= 1024) splits K by default; K=1056 has 33
  blocks, so the pieces are 11 (the largest count <= 16 that divides 33), and the float32
  partial sums match the oracle."""
  tuning = triton.choose_tuning(1, 1, 1056, 64, fmt)
  assert tuning.split_k == 16 and not tuning.dot
  assert tuning.lookup == ("prmt" if fmt == "iq4_nl" else "poly")
  _check(rng, 1, 1, 1056, 64, fmt, None, dtype=jnp.float32)
  x = jax.ShapeDtypeStruct((1, 1, 1056), jnp.float32)
  w = jax.eval_shape(lambda: gemv_weights(rng, 1, 1056, 64, fmt))
  partials = jax.make_jaxpr(lambda x, w: gemv.batched_gemv(
      x, w, impl="pallas", lowering="triton", interpret=not ON_GPU))(x, w)
  assert "f32[11,1,1,64]" in str(partials)
  assert triton.choose_tuning(1, 1, 512, 64, fmt).split_k == 1  # a short contraction
  assert triton.choose_tuning(1, 1, 2048, 102400, fmt).split_k == 1  # enough column blocks


def test_split_weights_share_one_partial_sum(rng):
  """Split over pieces of K, the weights of one launch (96 and 32 columns) write their partial
  sums into one float32 array side by side, [3, B, H, 96 + 32], which one reduction adds."""
  x = jax.ShapeDtypeStruct((1, 1, 96), jnp.bfloat16)
  ws = jax.eval_shape(lambda: (gemv_weights(rng, 1, 96, 96, "q8_0"),
                               gemv_weights(rng, 1, 96, 32, "q8_0")))
  jaxpr = str(jax.make_jaxpr(lambda x, ws: gemv.batched_gemv(
      x, ws, impl="pallas", lowering="triton", tuning=TUNINGS["fma_split3_k2"],
      interpret=not ON_GPU))(x, ws))
  assert "f32[3,1,1,128]" in jaxpr and "f32[3,1,1,96]" not in jaxpr


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", ["dot", "fma"])
def test_head_ids_gather_the_weight_heads(name, fmt, rng):
  """head_ids: x head h meets w[head_ids[h]] of E=7 weight heads, repeats and all (a MoE
  layer's chosen experts): the kernel against the oracle on the gathered weights."""
  B, H, E, K, N = 2, 5, 7, 64, 96
  x = jnp.asarray(rng.standard_normal((B, H, K)), jnp.bfloat16)
  w = gemv_weights(rng, E, K, N, fmt)
  ids = jnp.asarray(rng.integers(0, E, H), jnp.int32).at[1].set(6).at[2].set(6)
  y = gemv.batched_gemv(x, w, impl="pallas", lowering="triton", tuning=TUNINGS[name],
                        interpret=not ON_GPU, head_ids=ids)
  chosen = jax.tree.map(lambda a: a[np.asarray(ids)], w)
  assert y.shape == (B, H, N)
  assert rel_err(y, gemv_oracle(x, chosen)) <= RTOL[jnp.bfloat16]
  xla = gemv.batched_gemv(x, w, impl="xla", head_ids=ids)
  assert rel_err(xla, gemv_oracle(x, chosen)) <= RTOL[jnp.bfloat16]
  with pytest.raises(ValueError, match="head_ids.shape"):
    gemv.batched_gemv(x, w, impl="xla", head_ids=ids[:3])
  outside = ids.at[0].set(-3).at[4].set(E + 5)  # clamped to experts 0 and E - 1
  y = gemv.batched_gemv(x, w, impl="pallas", lowering="triton", tuning=TUNINGS[name],
                        interpret=not ON_GPU, head_ids=outside)
  clamped = jax.tree.map(lambda a: a[np.clip(np.asarray(outside), 0, E - 1)], w)
  assert rel_err(y, gemv_oracle(x, clamped)) <= RTOL[jnp.bfloat16]
  row = x[:, 2:3]  # [B, 1, K]: one row that every head multiplies (a token's experts)
  every = jnp.broadcast_to(row, x.shape)
  for impl, kw in (("pallas", dict(lowering="triton", tuning=TUNINGS[name],
                                   interpret=not ON_GPU)), ("xla", {})):
    y = gemv.batched_gemv(row, w, impl=impl, head_ids=ids, **kw)
    assert y.shape == (B, H, N)
    assert rel_err(y, gemv_oracle(every, chosen)) <= RTOL[jnp.bfloat16]
  with pytest.raises(ValueError, match="head_ids.shape"):
    gemv.batched_gemv(x[:, :2], w, impl="xla", head_ids=ids)


@pytest.mark.parametrize("gathered", [False, True], ids=["heads", "gathered"])
@pytest.mark.parametrize("name", ["dot", "fma", "fma_split3_k2"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_several_weights_share_one_launch(fmt, name, gathered, rng):
  """A tuple of weights (here 96 and 32 columns, as a gate and a narrower product of the same
  x) gives the tuple of their products from one pallas_call, each equal to its own oracle; the
  XLA path gives the same tuple."""
  B, H, E, K = 2, 3, 5, 96
  x = jnp.asarray(rng.standard_normal((B, H, K)), jnp.float32)
  ws = (gemv_weights(rng, E if gathered else H, K, 96, fmt),
        gemv_weights(rng, E if gathered else H, K, 32, fmt))
  ids = jnp.asarray([4, 0, 4], jnp.int32) if gathered else None
  run = lambda x, ws, impl="pallas": gemv.batched_gemv(
      x, ws, impl=impl, interpret=not ON_GPU and impl == "pallas", head_ids=ids,
      **({"lowering": "triton", "tuning": TUNINGS[name]} if impl == "pallas" else {}))
  ys = run(x, ws)
  chosen = [jax.tree.map(lambda a: a[np.asarray(ids)], w) for w in ws] if gathered else ws
  for y, w in zip(ys, chosen, strict=True):
    assert y.shape == (B, H, w.shape[2])
    assert rel_err(y, gemv_oracle(x, w)) <= RTOL[jnp.float32]
  for y, y_xla in zip(ys, run(x, ws, impl="xla"), strict=True):
    assert rel_err(y, y_xla) <= RTOL[jnp.float32]
  assert str(jax.make_jaxpr(run)(x, ws)).count("pallas_call") == 1


def test_weights_of_one_launch_must_match(rng):
  x = jnp.asarray(rng.standard_normal((1, 2, 64)), jnp.bfloat16)
  w = gemv_weights(rng, 2, 64, 32, "q8_0")
  for other in (gemv_weights(rng, 2, 64, 32, "iq4_nl"), gemv_weights(rng, 2, 64, 32, "bf16")):
    with pytest.raises(ValueError, match=r"w\[1\]"):
      gemv.batched_gemv(x, (w, other), impl="pallas", lowering="triton", interpret=not ON_GPU)
  with pytest.raises(ValueError, match="w.shape"):
    gemv.batched_gemv(x, (w, gemv_weights(rng, 3, 64, 32, "q8_0")), impl="pallas",
                      interpret=not ON_GPU)


@pytest.mark.parametrize("name", sorted(TUNINGS))
@pytest.mark.parametrize("fmt", ["q8_0", "iq4_nl"])
@pytest.mark.parametrize("B", [1, 5, 17])
def test_kernel_variants_float32(B, fmt, name, rng):
  if name == "int8" and fmt == "iq4_nl":
    pytest.skip("int8 dots are q8_0 only")
  _check(rng, B, 4, 96, 64, fmt, TUNINGS[name], dtype=jnp.float32)


@pytest.mark.parametrize("name", ["dot", "fma"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
def test_dense_weight_dtypes(dtype, name, rng):
  q = jnp.asarray(rng.standard_normal((3, 2, 64 + R)), dtype)
  w = jnp.asarray(rng.standard_normal((2, 64, 32)), dtype)
  y = _gemv(q, w, TUNINGS[name])
  assert rel_err(y, gemv_oracle(q[..., :64], w)) <= RTOL[dtype]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("dot", [False, True], ids=["fma", "dot"])
def test_iq4_nl_lookups_agree(dot, dtype, rng):
  """IQ4_NL's table by byte permutes (lookup="prmt") gives the polynomial's values exactly, so
  the two kernels' products are equal bit for bit, and both match the oracle."""
  q = jnp.asarray(rng.standard_normal((3, 2, 96 + R)), dtype)
  w = gemv_weights(rng, 2, 96, 64, "iq4_nl")
  ys = [_gemv(q, w, triton.TritonGemvTuning(dot=dot, block_n=32, lookup=lookup))
        for lookup in triton.LOOKUPS]
  np.testing.assert_array_equal(np.asarray(ys[0], np.float32), np.asarray(ys[1], np.float32))
  assert rel_err(ys[1], gemv_oracle(q[..., :96], w)) <= RTOL[dtype]
  with pytest.raises(ValueError, match="lookup"):
    triton.TritonGemvTuning(lookup="table")


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_integer_decoding_is_exact(jit):
  """The magic-number decoders, also under jit: XLA:CPU reassociates float adds, and an
  unguarded `(v + MAGIC) - MAGIC` would be folded away there."""
  # pylint: disable=protected-access
  lookup, to_f32 = triton.iq4_nl_values, triton._int_to_f32
  if jit:
    lookup, to_f32 = jax.jit(lookup), jax.jit(to_f32)
  np.testing.assert_array_equal(np.asarray(lookup(jnp.arange(16, dtype=jnp.uint8))),
                                np.asarray(quant.IQ4_NL_VALUES, np.float32))
  ints = jnp.arange(-128, 128, dtype=jnp.int32).astype(jnp.int8)
  np.testing.assert_array_equal(np.asarray(to_f32(ints)), np.arange(-128, 128, dtype=np.float32))


def test_ops_dispatch_uses_the_kernel(rng):
  x = jnp.asarray(rng.standard_normal((2, 3, 64)), jnp.bfloat16)
  w = gemv_weights(rng, 3, 64, 32, "q8_0")
  y = ops.batched_gemv(x, w, impl="pallas", interpret=not ON_GPU)
  assert rel_err(y, gemv_oracle(x, w)) <= RTOL[jnp.bfloat16]


@pytest.mark.gpu
def test_one_kernel_in_the_lowered_program(rng):
  x = jnp.asarray(rng.standard_normal((2, 4, 64 + R)), jnp.bfloat16)
  w = gemv_weights(rng, 4, 64, 32, "iq4_nl")
  text = jax.jit(lambda x, w: gemv.batched_gemv(x, w, impl="pallas", interpret=not ON_GPU)).lower(
      x, w).as_text()
  assert text.count("custom_call") == 1 and "mla_batched_gemv" in text


def test_bad_arguments_raise(rng):
  x = jnp.asarray(rng.standard_normal((2, 4, 64)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((4, 64, 32)), jnp.float32)
  run = lambda x, w, **k: gemv.batched_gemv(x, w, impl="pallas", interpret=True, **k)
  with pytest.raises(ValueError, match="x.shape"):
    run(x[0], w)
  with pytest.raises(ValueError, match="w.shape"):
    run(x, w[:3])
  with pytest.raises(ValueError, match="w.shape"):
    run(x[..., :32], w)
  with pytest.raises(ValueError, match="w.shape"):
    run(x, w[..., :24])
  with pytest.raises(ValueError, match="int8"):
    run(x, w, tuning=triton.TritonGemvTuning(int8=True))
  with pytest.raises(ValueError, match="int8"):
    run(x, quant.quantize(w, "iq4_nl"), tuning=triton.TritonGemvTuning(int8=True))
  with pytest.raises(ValueError, match="int8"):
    triton.TritonGemvTuning(int8=True, dot=False)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("H", [16, 128])
@pytest.mark.parametrize("B", [1, 8, 64])
@pytest.mark.parametrize("K,N", [(128, 512), (512, 128)])
def test_product_shapes_on_gpu(K, N, B, H, fmt, rng):
  _check(rng, B, H, K, N, fmt)
  if fmt == "q8_0":
    _check(rng, B, H, K, N, fmt, triton.TritonGemvTuning(int8=True), dtype=jnp.float32)
