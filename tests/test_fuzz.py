"""Property tests (hypothesis) of ops.mla_decode in every implementation and of
ops.merge_partials, against a float64 numpy oracle that reads only each row's valid slots.

Drawn: batch 0..5, heads 1..40 and 128, cache lengths 0..5000, the C/R pairs 512/64 and 128/32,
float32, bfloat16 and int8 caches, row lengths at 0, 1, S, tile and shard edges ±1 and in
between, logits up to ±1e4, and the slots past each row's length filled with NaN, ±Inf or stale
values. A size of 0 must raise a ValueError that names it. The inputs, the oracle and the
tolerance are experiments/kernel_sweep.py's, whose seeded sweep runs every GPU kernel path
compiled (configs/kernel_sweep_gpu.py).

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

from experiments.kernel_sweep import (EDGES, FILLS, decode_errors, decode_oracle,
                                      decode_tolerance, make_decode_inputs)
from mla_jax import ops
from mla_jax.ops import decode

ON_GPU = jax.default_backend() == "gpu"
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=False,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=500, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

CR = ((128, 32), (512, 64))
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


def run(impl, *args, sm_scale):
  options = {"interpret": not ON_GPU} if impl == "pallas" else {}
  return decode.mla_decode(*args, sm_scale=sm_scale, impl=impl, **options)


def check(impl, case):
  B, H, S, C, R, fmt, lengths, logit, fill, seed = case
  args = make_decode_inputs(*case)
  sm_scale = 1.0  # the queries carry the logit scale
  if B == 0 or S == 0:
    with pytest.raises(ValueError, match="q_latent" if B == 0 else "c_kv"):
      run(impl, *args, sm_scale=sm_scale)
    return
  out, lse = run(impl, *args, sm_scale=sm_scale)
  want_out, want_lse, largest = decode_oracle(*args, sm_scale)
  tol = decode_tolerance(impl, fmt, largest, C, R)
  assert decode_errors(out, lse, want_out, want_lse, lengths, tol) == []


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
    o, lse, _ = decode_oracle(q, qr, c[:, lo:hi], kr[:, lo:hi],
                              np.clip(lengths - lo, 0, hi - lo), 0.2)
    outs.append(o)
    lses.append(lse)
  out, lse = ops.merge_partials(jnp.asarray(np.stack(outs), jnp.float32),
                                jnp.asarray(np.stack(lses), jnp.float32))
  want_out, want_lse, _ = decode_oracle(q, qr, c, kr, lengths, 0.2)
  assert np.all(np.isfinite(np.asarray(out)))
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5)
