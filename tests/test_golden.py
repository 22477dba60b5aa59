"""Parity with Hugging Face transformers' DeepseekV2 (golden vectors in tests/data)."""

import jax.numpy as jnp
import numpy as np
import pytest

import mla_jax
from helpers import GOLDEN_DIR, rel_err, run_chunks

PREFILL = 11  # cases.json: prefill 11 tokens, then 5 decode steps

# Measured parity (float32, CPU): ~3e-7 relative in every case; the required bound is 1e-5.
PARITY = 1e-5


def _load(mode):
  return mla_jax.load_hf_attention(GOLDEN_DIR, 0, mode=mode, dtype=jnp.float32)


@pytest.mark.parametrize("mode", ["standard", "absorbed"])
def test_full_sequence_matches_transformers(mode, golden):
  attn = _load(mode)
  x, pos = jnp.asarray(golden["attn_x"]), jnp.asarray(golden["attn_positions"], jnp.int32)
  y, _ = attn(x, pos, attn.init_cache(x.shape[0], x.shape[1], jnp.float32))
  assert rel_err(y, golden["attn_out_full"]) <= PARITY


@pytest.mark.parametrize("mode", ["standard", "absorbed"])
def test_prefill_then_decode_matches_transformers(mode, golden):
  attn = _load(mode)
  x, pos = jnp.asarray(golden["attn_x"]), jnp.asarray(golden["attn_positions"], jnp.int32)
  y, _ = run_chunks(attn, x, pos, [PREFILL] + [1] * (x.shape[1] - PREFILL))
  assert rel_err(y, golden["attn_out_incremental"]) <= PARITY


def test_latent_cache_matches_transformers_cache(golden):
  attn = _load("absorbed")
  x, pos = jnp.asarray(golden["attn_x"]), jnp.asarray(golden["attn_positions"], jnp.int32)
  _, cache = attn(x, pos, attn.init_cache(x.shape[0], x.shape[1], jnp.float32))
  assert rel_err(cache.c_kv, golden["cache_c_kv"]) <= PARITY
  assert rel_err(cache.k_rope, golden["cache_k_rope"]) <= PARITY
  np.testing.assert_array_equal(cache.lengths, [x.shape[1]] * x.shape[0])
