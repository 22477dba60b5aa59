"""ops/top_k.py: a MoE router's softmax and top k in one kernel, against lax.top_k over
jax.nn.softmax in float64's order; and moe.route on it.

On CPU the kernel runs in interpret mode; with a GPU the same tests run compiled.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mla_jax import moe
from mla_jax.ops import top_k

ON_GPU = jax.default_backend() == "gpu"


def _oracle(logits, k, norm=None):
  """(weights, ids) in float64: the k largest softmax scores, descending, lower id first."""
  x = np.asarray(logits, np.float64)
  if norm is not None:
    sq_sum, dim, eps = norm
    x = x / np.sqrt(np.asarray(sq_sum, np.float64) / dim + eps)
  p = np.exp(x - x.max(axis=1, keepdims=True))
  p /= p.sum(axis=1, keepdims=True)
  ids = np.argsort(-p, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(p, ids, axis=1), ids


@pytest.mark.parametrize("N,E,k", [(1, 64, 6), (3, 16, 3), (2, 8, 8), (5, 32, 1), (1, 256, 8)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matches_the_sorted_softmax(N, E, k, dtype, rng):
  logits = jnp.asarray(rng.standard_normal((N, E)) * 3, dtype)
  weights, ids = top_k.softmax_top_k(logits, k, interpret=not ON_GPU)
  assert weights.shape == ids.shape == (N, k)
  assert weights.dtype == jnp.float32 and ids.dtype == jnp.int32
  want_weights, want_ids = _oracle(logits, k)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(weights, want_weights, rtol=1e-5)


def test_equal_scores_keep_the_lower_id_first():
  """lax.top_k's order among equal scores (here all but one of 8 logits are 0)."""
  logits = jnp.zeros((2, 8), jnp.float32).at[0, 5].set(1.0)
  _, ids = top_k.softmax_top_k(logits, 4, interpret=not ON_GPU)
  np.testing.assert_array_equal(ids, [[5, 0, 1, 2], [0, 1, 2, 3]])


def test_folded_norm_divides_the_logits_by_the_rms(rng):
  """norm=(sq_sum, dim, eps): the logits divided by sqrt(sq_sum / dim + eps) before the
  softmax, which changes the weights (and may change the order of none)."""
  logits = jnp.asarray(rng.standard_normal((3, 16)) * 3, jnp.float32)
  sq_sum = jnp.asarray(rng.uniform(1, 400, (3, 1)), jnp.float32)
  norm = (sq_sum, 100, 1e-6)
  weights, ids = top_k.softmax_top_k(logits, 4, norm=norm, interpret=not ON_GPU)
  want_weights, want_ids = _oracle(logits, 4, norm)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(weights, want_weights, rtol=1e-5)


@pytest.mark.parametrize("shape,k,match", [((1, 48), 6, "power of two"), ((1, 8), 9, "k=9"),
                                           ((8,), 2, "logits"), ((1, 8), 0, "k=0")])
def test_bad_arguments_name_them(shape, k, match):
  with pytest.raises(ValueError, match=match):
    top_k.softmax_top_k(jnp.zeros(shape, jnp.float32), k, interpret=True)
  with pytest.raises(ValueError, match="sq_sum"):
    top_k.softmax_top_k(jnp.zeros((2, 8)), 2, norm=(jnp.ones((2,)), 4, 0.0), interpret=True)


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_route_on_the_kernel_equals_route_on_xla(norm_topk_prob, monkeypatch, rng):
  """moe.route with greedy routing on the kernel (as on a GPU; interpreted here) equals the XLA
  softmax and top k, with the folded norm and the weights' normalisation and scale."""
  logits = jnp.asarray(rng.standard_normal((4, 16)) * 2, jnp.float32)
  sq_sum = jnp.asarray(rng.uniform(1, 100, (4, 1)), jnp.float32)
  kw = dict(top_k=3, norm_topk_prob=norm_topk_prob, routed_scaling_factor=2.5,
            norm=(sq_sum, 32, 1e-6))
  want_weights, want_ids = moe.route(logits, **kw)
  ran = []
  kernel = top_k.softmax_top_k
  monkeypatch.setattr(moe, "_on_router_kernel", lambda logits, k: True)
  monkeypatch.setattr(moe.ops, "softmax_top_k",
                      lambda *a, **k: ran.append(1) or kernel(*a, **{**k, "interpret": True}))
  weights, ids = moe.route(logits, **kw)
  assert ran == [1]
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(weights, want_weights, rtol=1e-5)
