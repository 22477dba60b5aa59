"""Shared test fixtures: tolerances, random inputs and the golden checkpoint."""

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

GOLDEN_DIR = pathlib.Path(__file__).parent / "data" / "deepseek_v2_tiny"

# float32 means float32 on every backend: GPUs otherwise run float32 matmuls as TF32 (~1e-3),
# which would hide real errors in the float32 parity tests.
jax.config.update("jax_default_matmul_precision", "highest")

# ‖out − ref‖ / ‖ref‖ bounds per compute dtype (METHOD.md's ranges for each precision).
RTOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2, jnp.float16: 5e-3}


def rel_err(x, ref) -> float:
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  assert np.all(np.isfinite(x)), "output has NaN/inf"
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def run_chunks(attn, x, positions, chunks, max_len=None, cache_dtype=jnp.float32):
  """Feeds x [B,T,D] to the module in consecutive chunks of the given sizes (e.g. a prefill of
  n tokens then single-token decode steps: [n, 1, 1, ...]); returns (outputs [B,T,D], cache)."""
  cache = attn.init_cache(x.shape[0], max_len or x.shape[1], cache_dtype)
  ys, t = [], 0
  for n in chunks:
    y, cache = attn(x[:, t:t + n], positions[:, t:t + n], cache)
    ys.append(y)
    t += n
  return jnp.concatenate(ys, axis=1), cache


def pytest_collection_modifyitems(config, items):
  has_gpu = jax.default_backend() == "gpu"
  run_slow = os.environ.get("MLA_JAX_SLOW") == "1"
  for item in items:
    if "gpu" in item.keywords and not has_gpu:
      item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
    if "slow" in item.keywords and not run_slow:
      item.add_marker(pytest.mark.skip(reason="slow; set MLA_JAX_SLOW=1"))


@pytest.fixture
def rng(request):
  """A fresh numpy Generator per test, seeded from OS entropy; the seed is printed on failure."""
  seed = np.random.SeedSequence().entropy % (2**32)
  print(f"rng seed {seed}")
  return np.random.default_rng(seed)


@pytest.fixture(scope="session")
def golden():
  return np.load(GOLDEN_DIR / "cases.npz")
