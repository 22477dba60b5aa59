"""ops/gemv_gpu.py: the fused all-heads batched GEMV against the float32 oracle.

On CPU the kernel runs in interpret mode (small K, N); with a GPU the same tests run compiled,
plus the V2-Lite/V3 product shapes (marked gpu).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import RTOL, rel_err
from mla_jax import ops, quant
from mla_jax.ops import gemv_gpu, reference

ON_GPU = jax.default_backend() == "gpu"
FORMATS = ("bf16", "q8_0", "iq4_nl")
R = 64  # the rope columns that follow q_nope in the query: x is read as a strided view
CONFIGS = {
    "dot": gemv_gpu.GemvConfig(dot=True, block_n=32),
    "fma": gemv_gpu.GemvConfig(dot=False, block_n=32),
    "dot_unrolled": gemv_gpu.GemvConfig(dot=True, block_n=16, unroll=True),
    "fma_unrolled": gemv_gpu.GemvConfig(dot=False, block_n=64, unroll=True),
    "dot_k2": gemv_gpu.GemvConfig(dot=True, block_n=32, block_k=2),
    "int8": gemv_gpu.GemvConfig(dot=True, int8=True, block_n=16),
}


def _weights(rng, H, K, N, fmt):
  w = jnp.asarray(rng.standard_normal((H, K, N)) * K ** -0.5, jnp.float32)
  return w.astype(jnp.bfloat16) if fmt == "bf16" else quant.quantize(w, fmt)


def _gemv(x, w, config=None):
  """Poisons the allocator with NaN first on GPU (interpret mode starts outputs at NaN)."""
  if ON_GPU:
    jnp.full((x.shape[0], x.shape[1], w.shape[2]), jnp.nan, x.dtype).block_until_ready()
  return gemv_gpu.batched_gemv(x, w, interpret=not ON_GPU, config=config)


def _check(rng, B, H, K, N, fmt, config=None, dtype=jnp.bfloat16):
  q = jnp.asarray(rng.standard_normal((B, H, K + R)), dtype)  # x = q[..., :K], read in place
  w = _weights(rng, H, K, N, fmt)
  y = _gemv(q, w, config)
  assert y.shape == (B, H, N) and y.dtype == dtype
  x = q[..., :K]
  if config is not None and config.int8:
    x = quant.quantize_q8_1(x).dequantize()
  tol = 1e-4 if config is not None and config.int8 and dtype == jnp.float32 else RTOL[dtype]
  assert rel_err(y, _oracle(x, w)) <= tol


def _oracle(x, w):
  """reference.batched_gemv in true float32 (XLA:GPU's default f32 dot is TF32)."""
  with jax.default_matmul_precision("float32"):
    return reference.batched_gemv(x, w)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("H", [1, 16, 128])
@pytest.mark.parametrize("B", [1, 3, 64])
def test_matches_reference_strided_x(B, H, fmt, rng):
  _check(rng, B, H, 64, 32, fmt)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("fmt", ["q8_0", "iq4_nl"])
@pytest.mark.parametrize("B", [1, 5, 17])
def test_kernel_variants_float32(B, fmt, name, rng):
  if name == "int8" and fmt == "iq4_nl":
    pytest.skip("int8 dots are q8_0 only")
  _check(rng, B, 4, 96, 64, fmt, CONFIGS[name], dtype=jnp.float32)


@pytest.mark.parametrize("name", ["dot", "fma"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
def test_dense_weight_dtypes(dtype, name, rng):
  q = jnp.asarray(rng.standard_normal((3, 2, 64 + R)), dtype)
  w = jnp.asarray(rng.standard_normal((2, 64, 32)), dtype)
  y = _gemv(q, w, CONFIGS[name])
  assert rel_err(y, _oracle(q[..., :64], w)) <= RTOL[dtype]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_integer_decoding_is_exact(jit):
  """The magic-number decoders, also under jit: XLA:CPU reassociates float adds, and an
  unguarded `(v + MAGIC) - MAGIC` would be folded away there."""
  # pylint: disable=protected-access
  lookup, to_f32 = gemv_gpu._iq4_nl_values, gemv_gpu._int_to_f32
  if jit:
    lookup, to_f32 = jax.jit(lookup), jax.jit(to_f32)
  np.testing.assert_array_equal(np.asarray(lookup(jnp.arange(16, dtype=jnp.uint8))),
                                np.asarray(quant.IQ4_NL_VALUES, np.float32))
  ints = jnp.arange(-128, 128, dtype=jnp.int32).astype(jnp.int8)
  np.testing.assert_array_equal(np.asarray(to_f32(ints)), np.arange(-128, 128, dtype=np.float32))


def test_ops_dispatch_uses_the_kernel(rng):
  x = jnp.asarray(rng.standard_normal((2, 3, 64)), jnp.bfloat16)
  w = _weights(rng, 3, 64, 32, "q8_0")
  y = ops.batched_gemv(x, w, impl="pallas", interpret=not ON_GPU)
  assert rel_err(y, _oracle(x, w)) <= RTOL[jnp.bfloat16]


@pytest.mark.gpu
def test_one_kernel_in_the_lowered_program(rng):
  x = jnp.asarray(rng.standard_normal((2, 4, 64 + R)), jnp.bfloat16)
  w = _weights(rng, 4, 64, 32, "iq4_nl")
  text = jax.jit(lambda x, w: gemv_gpu.batched_gemv(x, w, interpret=not ON_GPU)).lower(
      x, w).as_text()
  assert text.count("custom_call") == 1 and "mla_batched_gemv" in text


def test_bad_arguments_raise(rng):
  x = jnp.asarray(rng.standard_normal((2, 4, 64)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((4, 64, 32)), jnp.float32)
  with pytest.raises(ValueError, match="x.shape"):
    gemv_gpu.batched_gemv(x[0], w, interpret=True)
  with pytest.raises(ValueError, match="w.shape"):
    gemv_gpu.batched_gemv(x, w[:3], interpret=True)
  with pytest.raises(ValueError, match="w.shape"):
    gemv_gpu.batched_gemv(x[..., :32], w, interpret=True)
  with pytest.raises(ValueError, match="w.shape"):
    gemv_gpu.batched_gemv(x, w[..., :24], interpret=True)
  with pytest.raises(ValueError, match="int8"):
    gemv_gpu.batched_gemv(x, w, interpret=True, config=gemv_gpu.GemvConfig(int8=True))
  with pytest.raises(ValueError, match="int8"):
    gemv_gpu.batched_gemv(x, quant.quantize(w, "iq4_nl"), interpret=True,
                          config=gemv_gpu.GemvConfig(int8=True))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("H", [16, 128])
@pytest.mark.parametrize("B", [1, 8, 64])
@pytest.mark.parametrize("K,N", [(128, 512), (512, 128)])
def test_product_shapes_on_gpu(K, N, B, H, fmt, rng):
  _check(rng, B, H, K, N, fmt)
  if fmt == "q8_0":
    _check(rng, B, H, K, N, fmt, gemv_gpu.GemvConfig(int8=True), dtype=jnp.float32)
