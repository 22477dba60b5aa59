"""Whatever sits in the cache past a row's length (NaN, Inf, stale tokens, an int8 row with a NaN
scale) never reaches ops.mla_decode's output or lse, in every implementation and at every
boundary: lengths inside a tile, at a tile or shard edge ±1, 0 and S (FlashMLA's tests fill those
slots with NaN). The result must equal the decode of the same cache with those slots zeroed.

On CPU the Pallas kernels run in interpret mode; with a GPU the same tests run compiled.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import decode_inputs, decode_tol, rel_err
from mla_jax import ops, quant
from mla_jax.ops import decode, device
from mla_jax.ops.decode import cpu

ON_GPU = jax.default_backend() == "gpu"
H, S, SM_SCALE = 16, 256, 0.09
# Inside the first tile, tile (64-row) edges ±1, empty, full, and a ragged middle.
LENGTHS = (5, 63, 64, 65, 0, S, 129, 200)
FILLS = ("nan", "inf", "-inf")

IMPLS = [
    pytest.param("reference", None, id="reference"),
    pytest.param("xla", None, id="xla"),
    pytest.param("cpu", None, id="cpu"),
    pytest.param("pallas", "triton", id="triton"),
    pytest.param("pallas", "mosaic", id="mosaic"),
]


def poisoned(c_kv, k_rope, lengths, fill):
  """The cache with every slot at or past its row's length set to `fill` (for an int8 cache:
  values 127 and scale fill), and the same cache with those slots zeroed."""
  stale = np.arange(S)[None, :] >= np.asarray(lengths)[:, None]  # [B, S]
  value = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}[fill]

  def put(x, v):
    return jnp.where(stale.reshape(stale.shape + (1,) * (x.ndim - 2)), jnp.asarray(v, x.dtype), x)

  if isinstance(c_kv, quant.Int8Rows):
    dirty = quant.Int8Rows(put(c_kv.values, 127), put(c_kv.scales, value))
    clean = quant.Int8Rows(put(c_kv.values, 0), put(c_kv.scales, 0.0))
  else:
    dirty, clean = put(c_kv, value), put(c_kv, 0.0)
  return (dirty, put(k_rope, value)), (clean, put(k_rope, 0.0))


def run(impl, lowering, *args):
  options = {}
  if impl == "pallas":
    options = dict(lowering=lowering, interpret=not ON_GPU)
  if impl == "cpu":  # shards of 64 rows, 2 a step: the lengths above cross shards and steps
    options = dict(tuning=cpu.ShardTuning(shard_size=64, shards_per_step=2))
  return decode.mla_decode(*args, sm_scale=SM_SCALE, impl=impl, **options)


@pytest.mark.parametrize("fill", FILLS)
@pytest.mark.parametrize("fmt", ["bfloat16", "int8"])
@pytest.mark.parametrize("impl,lowering", IMPLS)
# Mosaic's interpret mode computes the score product of a ragged tile with numpy, whose Inf rows
# give NaN scores (and numpy's warning); the kernel masks those scores before the softmax.
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
@pytest.mark.parametrize("heads", [H, 64], ids=["few_heads", "many_heads"])
def test_stale_slots_never_reach_the_result(impl, lowering, fmt, fill, heads, rng):
  """H=16 runs the few-heads Mosaic kernels (float and int8 caches), H=64 the many-heads one
  (float caches only); interpreted without a GPU."""
  if heads != H and (lowering != "mosaic" or fmt == "int8"):
    pytest.skip("many heads: the Mosaic many-heads kernel, float caches")
  if lowering == "mosaic" and ON_GPU and not device.is_hopper():
    pytest.skip("wgmma: Hopper")
  q_latent, q_rope, c_kv, k_rope = decode_inputs(rng, len(LENGTHS), heads, S, fmt)
  lengths = jnp.asarray(LENGTHS, jnp.int32)
  (c_dirty, kr_dirty), (c_clean, kr_clean) = poisoned(c_kv, k_rope, LENGTHS, fill)
  out, lse = run(impl, lowering, q_latent, q_rope, c_dirty, kr_dirty, lengths)
  want_out, want_lse = run(impl, lowering, q_latent, q_rope, c_clean, kr_clean, lengths)
  assert np.all(np.isfinite(np.asarray(out, np.float32))), "stale slots reached the output"
  empty = np.asarray(lengths) == 0
  assert np.all(np.isneginf(np.asarray(lse)[empty]))
  assert np.all(np.isfinite(np.asarray(lse)[~empty]))
  tol = decode_tol(fmt)
  for b in range(len(LENGTHS)):
    assert rel_err(out[b], want_out[b]) <= tol, f"row {b} (length {LENGTHS[b]})"
  np.testing.assert_allclose(lse[~empty], want_lse[~empty], rtol=tol, atol=tol)


@pytest.mark.parametrize("fill", FILLS)
def test_stale_slots_never_reach_the_reference_prefill(fill, rng):
  """The float32 oracle of prefill ignores them too (the module's XLA prefill reads only the
  module's own caches, which hold finite values: ops/xla.py)."""
  q_latent, q_rope, c_kv, k_rope = decode_inputs(rng, 3, 4, S, "float32", C=64, R=16)
  kv_lengths = np.asarray([10, 64, 100])
  q_slots = jnp.asarray(kv_lengths[:, None] - 1 - np.arange(3)[None, ::-1], jnp.int32)  # T=3
  q = jnp.broadcast_to(q_latent[:, None], (3, 3, 4, 64))
  q_r = jnp.broadcast_to(q_rope[:, None], (3, 3, 4, 16))
  (c_dirty, kr_dirty), (c_clean, kr_clean) = poisoned(c_kv, k_rope, kv_lengths, fill)
  for attention in (ops.reference.latent_attention,):
    dirty = attention(q, q_r, c_dirty, kr_dirty, q_slots, jnp.asarray(kv_lengths),
                      sm_scale=SM_SCALE)
    clean = attention(q, q_r, c_clean, kr_clean, q_slots, jnp.asarray(kv_lengths),
                      sm_scale=SM_SCALE)
    np.testing.assert_allclose(dirty, clean, rtol=1e-6, atol=1e-6)
