"""Fixtures and hooks; what test files share otherwise is in helpers.py."""

import os

import jax
import numpy as np
import pytest

from helpers import GOLDEN_DIR

# float32 means float32 on every backend: GPUs otherwise run float32 matmuls as TF32 (~1e-3),
# which would hide real errors in the float32 parity tests.
jax.config.update("jax_default_matmul_precision", "highest")


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
