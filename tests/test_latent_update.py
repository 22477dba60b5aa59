"""ops/latent_update.py: the absorbed decode step's latent kernel against float32 oracles written
here from the module's definitions (RMSNorm, rope, int8 rows), on fresh random inputs.

On CPU the kernels run in interpret mode (small sizes); with a GPU the same tests run compiled,
plus V2-Lite's and V3's head counts (marked gpu).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import RTOL, lower_for_h200, rel_err
from mla_jax import quant
from mla_jax.ops import latent_update as latent

ON_GPU = jax.default_backend() == "gpu"
EPS = 1e-6


def rms_norm(x, w):
  x = np.asarray(x, np.float64)
  return np.asarray(w, np.float64) * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + EPS)


def rope_pairs(x, pos, inv_freq, scale):
  """Interleaved-pair rotation of x [..., R] at positions pos [...] in float64."""
  x = np.asarray(x, np.float64)
  angle = np.asarray(pos, np.float64)[..., None] * np.asarray(inv_freq, np.float64)
  cos, sin = np.cos(angle) * scale, np.sin(angle) * scale
  even, odd = x[..., 0::2], x[..., 1::2]
  out = np.empty_like(x)
  out[..., 0::2], out[..., 1::2] = even * cos - odd * sin, even * sin + odd * cos
  return out


def _latent_inputs(rng, B, H, K, C, R, S, dtype, int8):
  q = jnp.asarray(rng.standard_normal((B, H * (K + R))), dtype)
  kv = jnp.asarray(rng.standard_normal((B, C + R)), dtype)
  g = jnp.asarray(rng.standard_normal(C), jnp.float32)
  wk = jnp.asarray(rng.standard_normal((H, K, C)) / np.sqrt(K), dtype)
  inv_freq = jnp.asarray(1.0 / 10000 ** (np.arange(0, R, 2) / R), jnp.float32)
  if int8:
    c = quant.Int8Rows(jnp.asarray(rng.integers(-127, 128, (B, S, C)), jnp.int8),
                       jnp.asarray(rng.random((B, S)), jnp.float32))
    k_rope = jnp.asarray(rng.standard_normal((B, S, R)), jnp.bfloat16)
  else:
    c = jnp.asarray(rng.standard_normal((B, S, C)), dtype)
    k_rope = jnp.asarray(rng.standard_normal((B, S, R)), dtype)
  return q, kv, g, wk, inv_freq, c, k_rope


@pytest.mark.parametrize("int8", [False, True], ids=["float_cache", "int8_cache"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("absorb,block_c", [(True, 16), (True, 64), (False, 32)],
                         ids=["row_per_program", "one_program_writes", "no_absorb"])
def test_latent_update_matches_reference(absorb, block_c, dtype, int8, rng):
  """block_c 16: each of head 0's four programs writes one row; 32: two rows each; 64: one
  program writes all four."""
  B, H, K, C, R, S = 4, 3, 16, 64, 8, 12
  q, kv, g, wk, inv_freq, c, k_rope = _latent_inputs(rng, B, H, K, C, R, S, dtype, int8)
  positions = jnp.asarray(rng.integers(0, 5000, B), jnp.int32).at[3].set(-1)
  # row 0 writes slot 3; row 1 is full (sets its flag), row 2 fills its last slot, row 3 is
  # padding; rows 2 and 3 have overflowed before and keep their flags
  lengths = jnp.asarray([3, S, S - 1, 5], jnp.int32)
  overflow = jnp.asarray([0, 0, 1, 1], jnp.int32)
  slots = [3, -1, S - 1, -1]
  values, scales = (c.values, c.scales) if int8 else (c, None)
  q_latent, q_rope, values2, scales2, k_rope2, lengths2, overflow2 = latent.latent_update(
      q, kv, positions, g, inv_freq, wk if absorb else None, values, scales, k_rope, lengths,
      overflow, num_heads=H, rope_scale=1.25, eps=EPS, dtype=dtype,
      tuning=latent.LatentTuning(block_c=block_c), interpret=not ON_GPU)
  np.testing.assert_array_equal(lengths2, [4, S, S, 5])
  np.testing.assert_array_equal(overflow2, [0, 1, 1, 1])
  tol = RTOL[dtype]
  qh = np.asarray(q, np.float64).reshape(B, H, K + R)
  if absorb:
    assert q_latent.shape == (B, H, C) and q_latent.dtype == dtype
    assert rel_err(q_latent, np.einsum("bhk,hkc->bhc", qh[..., :K], np.asarray(wk, np.float64))) <= tol
  else:
    assert q_latent is None
  assert rel_err(q_rope, rope_pairs(qh[..., K:], np.asarray(positions)[:, None], inv_freq,
                                    1.25)) <= tol
  c_new = rms_norm(np.asarray(kv)[:, :C], g)
  k_new = rope_pairs(np.asarray(kv, np.float64)[:, C:], positions, inv_freq, 1.25)
  written = np.zeros((B, S), bool)
  for b, s in enumerate(slots):
    if s < 0:
      continue
    written[b, s] = True
    if int8:
      row = np.asarray(quant.Int8Rows(values2[b, s], scales2[b, s]).dequantize(), np.float64)
      # int8 rounding: within half a step of the row, after the row's rounding to dtype
      step = np.max(np.abs(c_new[b])) / 127
      assert np.all(np.abs(row - c_new[b]) <= 0.5 * step * (1 + RTOL[dtype])
                    + RTOL[dtype] * np.abs(c_new[b]))
      assert np.max(np.abs(values2[b, s])) == 127
    else:
      assert rel_err(values2[b, s], c_new[b]) <= tol
    assert rel_err(k_rope2[b, s], k_new[b]) <= RTOL[jnp.bfloat16 if int8 else dtype]
  untouched = ~written
  np.testing.assert_array_equal(np.asarray(values2)[untouched], np.asarray(values)[untouched])
  np.testing.assert_array_equal(np.asarray(k_rope2)[untouched], np.asarray(k_rope)[untouched])
  if int8:
    np.testing.assert_array_equal(np.asarray(scales2)[untouched], np.asarray(scales)[untouched])


@pytest.mark.parametrize("fmt", ["q8_0", "iq4_nl"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_latent_update_decodes_a_quantized_wk_b(fmt, dtype, rng):
  """A q8_0 or iq4_nl wk_b [H, K, C] (blocks of 32 rows along K) is decoded block by block in
  the kernel: q_latent equals q_nope times the dequantized weight (a float64 oracle), with the
  input norm's scale applied to q first, and the cache row is written as without it."""
  B, H, K, C, R, S = 2, 3, 64, 64, 8, 8
  q, kv, g, wk, inv_freq, c, k_rope = _latent_inputs(rng, B, H, K, C, R, S, dtype, False)
  wk_q = quant.quantize(wk.astype(jnp.float32), fmt)
  positions = jnp.asarray([7, 2], jnp.int32)
  ss = jnp.asarray(rng.random(B) * 50 + 1, jnp.float32)
  q_latent, _, c2, _, _, lengths, _ = latent.latent_update(
      q, kv, positions, g, inv_freq, wk_q, c, None, k_rope, jnp.asarray([0, 3], jnp.int32),
      jnp.zeros(B, jnp.int32), num_heads=H, rope_scale=1.0, eps=EPS, dtype=dtype,
      tuning=latent.LatentTuning(block_c=32), interpret=not ON_GPU, input_ss=ss,
      input_dim=16, input_eps=EPS)
  np.testing.assert_array_equal(lengths, [1, 4])
  inv_rms = 1 / np.sqrt(np.asarray(ss, np.float64) / 16 + EPS)
  q_nope = np.asarray(q, np.float64).reshape(B, H, K + R)[..., :K] * inv_rms[:, None, None]
  oracle = np.einsum("bhk,hkc->bhc", q_nope, np.asarray(wk_q.dequantize(), np.float64))
  assert q_latent.shape == (B, H, C) and q_latent.dtype == dtype
  assert rel_err(q_latent, oracle) <= RTOL[dtype]
  kv_scaled = np.asarray(kv, np.float64)[:, :C] * inv_rms[:, None]
  assert rel_err(c2[1, 3], rms_norm(kv_scaled[1], g)) <= RTOL[dtype]


@pytest.mark.parametrize("scale_q", [True, False], ids=["q_and_kv", "kv_only"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_latent_update_completes_the_input_norm(scale_q, dtype, rng):
  """Given Σx² of the layer's input x, the kernel multiplies kv (and q if scale_q) by each row's
  1/rms(x) before using them."""
  B, H, K, C, R, S, D = 3, 2, 16, 64, 8, 6, 96
  q, kv, g, wk, inv_freq, c, k_rope = _latent_inputs(rng, B, H, K, C, R, S, dtype, False)
  x = jnp.asarray(3 * rng.standard_normal((B, D)), dtype)
  positions = jnp.asarray([7, -1, 4000], jnp.int32)
  q_latent, q_rope, values, _, k_rope2, lengths, _ = latent.latent_update(
      q, kv, positions, g, inv_freq, wk, c, None, k_rope, jnp.asarray([0, 2, 5], jnp.int32),
      jnp.zeros(B, jnp.int32), num_heads=H, rope_scale=1.0, eps=EPS, dtype=dtype,
      tuning=latent.LatentTuning(block_c=32), interpret=not ON_GPU,
      input_ss=jnp.sum(x.astype(jnp.float32) ** 2, axis=-1), input_dim=D, input_eps=EPS,
      scale_q=scale_q)
  np.testing.assert_array_equal(lengths, [1, 2, 6])
  x64 = np.asarray(x, np.float64)
  inv_rms = 1 / np.sqrt(np.mean(x64 * x64, -1, keepdims=True) + EPS)
  qh = (np.asarray(q, np.float64) * (inv_rms if scale_q else 1)).reshape(B, H, K + R)
  kv64 = np.asarray(kv, np.float64) * inv_rms
  tol = RTOL[dtype]
  assert rel_err(q_latent, np.einsum("bhk,hkc->bhc", qh[..., :K], np.asarray(wk, np.float64))) <= tol
  assert rel_err(q_rope, rope_pairs(qh[..., K:], np.asarray(positions)[:, None], inv_freq,
                                    1.0)) <= tol
  for b, s in ((0, 0), (2, 5)):
    assert rel_err(values[b, s], rms_norm(kv64[b, :C], g)) <= tol
    assert rel_err(k_rope2[b, s], rope_pairs(kv64[b, C:], positions[b], inv_freq, 1.0)) <= tol


def test_latent_int8_row_equals_quantize_rows(rng):
  """The kernel's int8 row is quant.quantize_rows of the normalised row, bit for bit."""
  B, H, K, C, R, S = 2, 2, 16, 64, 8, 4
  q, kv, g, wk, inv_freq, c, k_rope = _latent_inputs(rng, B, H, K, C, R, S, jnp.float32, True)
  slots = [1, 2]
  _, _, values, scales, *_ = latent.latent_update(
      q, kv, jnp.zeros(B, jnp.int32), g, inv_freq, wk, c.values, c.scales, k_rope,
      jnp.asarray(slots, jnp.int32), jnp.zeros(B, jnp.int32), num_heads=H, rope_scale=1.0, eps=EPS, dtype=jnp.float32,
      tuning=latent.LatentTuning(block_c=32), interpret=not ON_GPU)
  xf = kv[:, :C].astype(jnp.float32)
  normed = g * (xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + EPS))
  expected = quant.quantize_rows(normed)
  for b, s in enumerate(slots):
    np.testing.assert_array_equal(values[b, s], expected.values[b])
    np.testing.assert_allclose(scales[b, s], expected.scales[b], rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("int8", [False, True], ids=["bf16_cache", "int8_cache"])
@pytest.mark.parametrize("B,H", [(1, 16), (8, 16), (1, 128)])
def test_latent_update_model_shapes(B, H, int8, rng):
  K, C, R, S = 128, 512, 64, 4096
  q, kv, g, wk, inv_freq, c, k_rope = _latent_inputs(rng, B, H, K, C, R, S, jnp.bfloat16, int8)
  slots = rng.integers(0, S, B)
  values, scales = (c.values, c.scales) if int8 else (c, None)
  q_latent, _, values2, *_ = latent.latent_update(
      q, kv, jnp.asarray(rng.integers(0, 9000, B), jnp.int32), g, inv_freq, wk, values, scales,
      k_rope, jnp.asarray(slots, jnp.int32), jnp.zeros(B, jnp.int32), num_heads=H, rope_scale=1.0, eps=EPS, dtype=jnp.bfloat16,
      tuning=latent.choose_tuning(C))
  qh = np.asarray(q, np.float64).reshape(B, H, K + R)
  assert rel_err(q_latent, np.einsum("bhk,hkc->bhc", qh[..., :K], np.asarray(wk, np.float64))) \
      <= RTOL[jnp.bfloat16]
  if not int8:
    for b, s in enumerate(slots):
      assert rel_err(values2[b, s], rms_norm(np.asarray(kv)[b, :C], g)) <= RTOL[jnp.bfloat16]


@pytest.mark.parametrize("int8", [False, True], ids=["float_cache", "int8_cache"])
@pytest.mark.parametrize("norm_input", [False, True], ids=["plain", "input_norm"])
def test_latent_update_reads_q_and_kv_side_by_side(norm_input, int8, rng):
  """kv=None and q = [q | kv] (layers.joint_product's one buffer) give what q and kv apart
  give, bit for bit: the kernel reads the same values at kv's offset."""
  B, H, K, C, R, S = 3, 2, 16, 64, 8, 6
  q, kv, g, wk, inv_freq, c, k_rope = _latent_inputs(rng, B, H, K, C, R, S, jnp.bfloat16, int8)
  values, scales = (c.values, c.scales) if int8 else (c, None)
  args = (jnp.asarray([0, 2, -1], jnp.int32), g, inv_freq, wk, values, scales, k_rope,
          jnp.asarray([1, S, 4], jnp.int32), jnp.zeros(B, jnp.int32))
  options = dict(num_heads=H, rope_scale=1.0, eps=EPS, dtype=jnp.bfloat16,
                 tuning=latent.LatentTuning(block_c=16), interpret=not ON_GPU)
  if norm_input:
    options.update(input_ss=jnp.asarray(rng.random(B) * 64, jnp.float32), input_dim=32,
                   input_eps=EPS)
  apart = latent.latent_update(q, kv, *args, **options)
  joint = latent.latent_update(jnp.concatenate([q, kv], axis=1), None, *args, **options)
  for x, y in zip(apart, joint):
    if x is not None:
      np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
  with pytest.raises(ValueError, match=r"kv None and q \[B, H·\(K\+R\) \+ C\+R\]"):
    latent.latent_update(jnp.concatenate([q, kv[:, :-1]], axis=1), None, *args, **options)


def test_latent_unsupported_sizes_raise(rng):
  q, kv, g, wk, inv_freq, c, k_rope = _latent_inputs(rng, 1, 2, 12, 64, 8, 4, jnp.float32, False)
  with pytest.raises(ValueError, match="K=12"):
    latent.latent_update(q, kv, jnp.zeros(1, jnp.int32), g, inv_freq, None, c, None, k_rope,
                         jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32), num_heads=2, rope_scale=1.0, eps=EPS,
                         dtype=jnp.float32, tuning=latent.LatentTuning(block_c=16),
                         interpret=True)


@pytest.mark.parametrize("int8", [False, True], ids=["bf16_cache", "int8_cache"])
@pytest.mark.parametrize("B,H", [(1, 16), (64, 128)])
def test_latent_update_lowers_for_cuda(B, H, int8):
  """V2-Lite's and V3's shapes lower through Pallas' Triton lowering for an H200."""
  K, C, R, S = 128, 512, 64, 16384
  spec = jax.ShapeDtypeStruct
  cache = ([spec((B, S, C), jnp.int8), spec((B, S), jnp.float32)] if int8
           else [spec((B, S, C), jnp.bfloat16), None])
  args = [spec((B, H * (K + R)), jnp.bfloat16), spec((B, C + R), jnp.bfloat16),
          spec((B,), jnp.int32), spec((C,), jnp.bfloat16), spec((R // 2,), jnp.float32),
          spec((H, K, C), jnp.bfloat16), *cache, spec((B, S, R), jnp.bfloat16),
          spec((B,), jnp.int32), spec((B,), jnp.int32)]
  text = lower_for_h200(lambda *a: latent.latent_update(
      *a, num_heads=H, rope_scale=1.0, eps=EPS, dtype=jnp.bfloat16,
      tuning=latent.choose_tuning(C)), *args)
  assert "mla_latent_update" in text
