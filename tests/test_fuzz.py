"""Property tests (hypothesis) of ops.mla_decode in every implementation and of
ops.merge_partials, against a float64 numpy oracle that reads only each row's valid slots.

Drawn: batch 0..5, heads 1..40 and 128, cache lengths 0..5000, the C/R pairs 512/64 and 128/32,
float32, bfloat16 and int8 caches, row lengths at 0, 1, S, tile and shard edges ±1 and in
between, logits up to ±1e4, and the slots past each row's length filled with NaN, ±Inf or stale
values. A size of 0 must raise a ValueError that names it.

The CI profile (the default) draws a few hundred cases in all; HYPOTHESIS_PROFILE=long draws
many more (run by hand; its result goes into docs/results). The Pallas kernels run in interpret
mode on a CPU, where each new shape compiles: their draws come from fewer shapes.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mla_jax import ops, quant
from mla_jax.ops import decode

ON_GPU = jax.default_backend() == "gpu"
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=False,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=500, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

EDGES = (1, 63, 64, 65, 127, 128, 129, 255, 256, 257, 511, 512, 513)  # tiles (64) and shards
CR = ((128, 32), (512, 64))
FILLS = ("nan", "inf", "-inf", "stale")
# Implementations and the shapes they are drawn from (interpret mode compiles per shape).
SIZES = {
    "reference": dict(H=(1, 3, 16, 40, 128), S=(0, 1, 70, 600, 5000)),
    "xla": dict(H=(1, 3, 16, 40, 128), S=(0, 1, 70, 600, 5000)),
    "cpu": dict(H=(1, 16, 40, 128), S=(0, 1, 70, 600, 5000)),
    "pallas": dict(H=(1, 16, 40), S=(70, 600)),
}


@st.composite
def decode_case(draw, impl):
  sizes = SIZES[impl]
  B = draw(st.integers(0, 5))
  H = draw(st.sampled_from(sizes["H"]))
  S = draw(st.sampled_from(sizes["S"]))
  C, R = draw(st.sampled_from(CR))
  fmt = draw(st.sampled_from(("float32", "bfloat16", "int8")))
  lengths = draw(st.lists(st.one_of(st.sampled_from((0, S, *(e for e in EDGES if e < S))),
                                    st.integers(0, S)), min_size=B, max_size=B))
  logit = draw(st.sampled_from((1.0, 30.0, 1e4)))
  fill = draw(st.sampled_from(FILLS))
  seed = draw(st.integers(0, 2**31 - 1))
  return B, H, S, C, R, fmt, lengths, logit, fill, seed


def make_inputs(B, H, S, C, R, fmt, lengths, logit, fill, seed):
  """Queries scaled so that scores reach about ±logit; the cache poisoned past each length."""
  rng = np.random.default_rng(seed)
  dtype = jnp.bfloat16 if fmt == "int8" else jnp.dtype(fmt)
  scale = logit / np.sqrt(C + R)
  q_latent = jnp.asarray(rng.standard_normal((B, H, C)) * scale, dtype)
  q_rope = jnp.asarray(rng.standard_normal((B, H, R)) * scale, dtype)
  c_kv = rng.standard_normal((B, S, C)).astype(np.float32)
  k_rope = rng.standard_normal((B, S, R)).astype(np.float32)
  stale = np.arange(S)[None, :] >= np.asarray(lengths, np.int64).reshape(B, 1)
  value = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "stale": 1e4}[fill]
  k_rope[stale] = value
  if fmt == "int8":
    cache = quant.quantize_rows(jnp.asarray(c_kv))
    values, scales = np.asarray(cache.values), np.asarray(cache.scales).copy()
    scales[stale] = value
    c_kv = quant.Int8Rows(jnp.asarray(values), jnp.asarray(scales))
  else:
    c_kv[stale] = value
    c_kv = jnp.asarray(c_kv, dtype)
  return q_latent, q_rope, c_kv, jnp.asarray(k_rope, dtype), jnp.asarray(lengths, jnp.int32)


def oracle(q_latent, q_rope, c_kv, k_rope, lengths, sm_scale):
  """float64 softmax over each row's first lengths[b] slots (out 0, lse -inf when empty), and
  the largest |score| seen."""
  if isinstance(c_kv, quant.Int8Rows):
    with np.errstate(invalid="ignore"):  # 0·NaN in stale slots, never read below
      c = np.asarray(c_kv.values, np.float64) * np.asarray(c_kv.scales, np.float64)[..., None]
  else:
    c = np.asarray(c_kv, np.float64)
  q, qr, kr = (np.asarray(a, np.float64) for a in (q_latent, q_rope, k_rope))
  out = np.zeros(q.shape)
  lse = np.full(q.shape[:2], -np.inf)
  largest = 0.0
  for b, n in enumerate(np.asarray(lengths)):
    if n == 0:
      continue
    s = (q[b] @ c[b, :n].T + qr[b] @ kr[b, :n].T) * sm_scale
    largest = max(largest, float(np.abs(s).max()))
    m = s.max(-1, keepdims=True)
    p = np.exp(s - m)
    out[b] = p @ c[b, :n] / p.sum(-1, keepdims=True)
    lse[b] = m[:, 0] + np.log(p.sum(-1))
  return out, lse, largest


def run(impl, *args, sm_scale):
  options = {"interpret": not ON_GPU} if impl == "pallas" else {}
  return decode.mla_decode(*args, sm_scale=sm_scale, impl=impl, **options)


def check(impl, case):
  B, H, S, C, R, fmt, lengths, logit, fill, seed = case
  args = make_inputs(*case)
  sm_scale = 1.0  # the queries carry the logit scale
  if B == 0 or S == 0:
    with pytest.raises(ValueError, match="q_latent" if B == 0 else "c_kv"):
      run(impl, *args, sm_scale=sm_scale)
    return
  out, lse = run(impl, *args, sm_scale=sm_scale)
  want_out, want_lse, largest = oracle(*args, sm_scale)
  out, lse = np.asarray(out, np.float64), np.asarray(lse, np.float64)
  assert np.all(np.isfinite(out)), "non-finite output"
  empty = np.asarray(lengths) == 0
  assert np.all(out[empty] == 0) and np.all(np.isneginf(lse[empty]))
  # The inputs are rounded to their dtype before the oracle reads them, so what is left is the
  # kernels' own rounding. A score s carries an absolute error, which p inherits relatively and
  # lse absolutely: float32 accumulation gives ~|s|·2^-24·sqrt(C+R); the int8 paths also round
  # the dequantized cache or the query to 16 bits, ~|s|·2^-8 (so at logits of 1e4 only
  # finiteness and the empty rows are checked there). bf16 probabilities add 2^-8.
  unit = 2.0 ** -24 if fmt == "float32" or impl == "reference" else 2.0 ** -8
  sixteen_bit_scores = fmt == "int8" and impl != "reference"
  score_unit = 2.0 ** -8 if sixteen_bit_scores else 2.0 ** -24 * np.sqrt(C + R)
  tol = 8 * unit + 4 * largest * score_unit
  for b in np.flatnonzero(~empty):
    err = np.linalg.norm(out[b] - want_out[b]) / max(np.linalg.norm(want_out[b]), 1e-30)
    assert err <= tol, f"row {b} (length {lengths[b]}): {err:.2e} > {tol:.2e}"
    np.testing.assert_allclose(lse[b], want_lse[b], rtol=tol, atol=tol)


@pytest.mark.parametrize("impl", ["reference", "xla", "cpu", "pallas"])
def test_decode_matches_the_float64_oracle(impl):
  @given(decode_case(impl))
  @settings(max_examples=settings.default.max_examples // (3 if impl == "pallas" else 1))
  def prop(case):
    check(impl, case)

  prop()


@st.composite
def partition(draw):
  S = draw(st.integers(1, 300))
  cuts = sorted(draw(st.lists(st.integers(0, S), max_size=6)))
  bounds = [0, *cuts, S]
  lengths = draw(st.lists(st.integers(0, S), min_size=1, max_size=4))
  return S, bounds, lengths, draw(st.integers(0, 2**31 - 1))


@given(partition())
def test_merge_of_any_partition_equals_the_whole(case):
  """Pieces of any sizes, empty ones and ones past every row's length included."""
  S, bounds, lengths, seed = case
  rng = np.random.default_rng(seed)
  B, H, C, R = len(lengths), 3, 32, 8
  q, qr = (jnp.asarray(rng.standard_normal((B, H, n)), jnp.float32) for n in (C, R))
  c, kr = (jnp.asarray(rng.standard_normal((B, S, n)), jnp.float32) for n in (C, R))
  lengths = np.asarray(lengths)
  outs, lses = [], []
  for lo, hi in zip(bounds, bounds[1:]):  # each piece's partial, by the oracle itself
    o, lse, _ = oracle(q, qr, c[:, lo:hi], kr[:, lo:hi], np.clip(lengths - lo, 0, hi - lo), 0.2)
    outs.append(o)
    lses.append(lse)
  out, lse = ops.merge_partials(jnp.asarray(np.stack(outs), jnp.float32),
                                jnp.asarray(np.stack(lses), jnp.float32))
  want_out, want_lse, _ = oracle(q, qr, c, kr, lengths, 0.2)
  assert np.all(np.isfinite(np.asarray(out)))
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5)
