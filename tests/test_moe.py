"""MoE: routing and both expert paths against a per-token loop over experts in float64 numpy."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mla_jax
from mla_jax import moe

# 8 experts in 4 groups of 2; top 3 of the best 2 groups when group-limited.
CFG = dataclasses.replace(mla_jax.ModelConfig.deepseek_v2_lite(), hidden_size=32, num_heads=2,
                          kv_lora_rank=32, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                          num_layers=2, vocab_size=64, intermediate_size=48,
                          moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=2,
                          num_experts_per_tok=3, n_group=4, topk_group=2)
F32_TOL = 2e-5


def _silu(x):
  return x / (1 + np.exp(-x))


def _mlp(x, gate, up, down):
  """One gated SiLU MLP on one token x [D]; weights [out, in]."""
  return down @ (_silu(gate @ x) * (up @ x))


def reference_moe(x, p, cfg):
  """transformers' DeepseekV2Moe, token by token: x [N,D] float64, p the MoE's parameters."""
  E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
  out = np.zeros_like(x)
  for n, token in enumerate(x):
    logits = p["gate"] @ token
    scores = np.exp(logits - logits.max())
    scores /= scores.sum()
    candidates = scores.copy()
    if cfg.topk_method == "group_limited_greedy":
      group_best = scores.reshape(cfg.n_group, -1).max(axis=1)
      best_groups = np.argsort(-group_best)[:cfg.topk_group]
      in_best = np.isin(np.arange(E) // (E // cfg.n_group), best_groups)
      candidates = np.where(in_best, scores, 0.0)
    chosen = np.argsort(-candidates)[:k]
    weights = scores[chosen]
    if cfg.norm_topk_prob:
      weights = weights / weights.sum()
    weights = weights * cfg.routed_scaling_factor
    for w, e in zip(weights, chosen):
      out[n] += w * _mlp(token, p["experts.gate_proj"][e], p["experts.up_proj"][e],
                         p["experts.down_proj"][e])
    if cfg.n_shared_experts:
      out[n] += _mlp(token, p["shared.gate_proj"], p["shared.up_proj"], p["shared.down_proj"])
  return out


def _params(layer):
  f64 = lambda v: np.asarray(v[...], np.float64)
  p = {"gate": f64(layer.gate.weight)}
  for proj in ("gate_proj", "up_proj", "down_proj"):
    p["experts." + proj] = f64(getattr(layer.experts, proj))
    if layer.cfg.n_shared_experts:
      p["shared." + proj] = f64(getattr(layer.shared_experts, proj).weight)
  return p


def _rel(x, ref):
  return np.linalg.norm(np.asarray(x, np.float64) - ref) / np.linalg.norm(ref)


@pytest.mark.parametrize("impl", ["gather", "grouped"])
@pytest.mark.parametrize("topk_method,norm_topk_prob,scale,shared", [
    ("greedy", False, 1.0, 2), ("greedy", True, 1.0, 0),
    ("group_limited_greedy", False, 2.5, 2), ("group_limited_greedy", True, 16.0, 1)])
def test_moe_matches_per_token_loop(impl, topk_method, norm_topk_prob, scale, shared, rng):
  cfg = dataclasses.replace(CFG, topk_method=topk_method, norm_topk_prob=norm_topk_prob,
                            routed_scaling_factor=scale, n_shared_experts=shared)
  layer = mla_jax.MoE(cfg, impl=impl, rngs=nnx.Rngs(int(rng.integers(2**31))))
  x = rng.standard_normal((3, 7, cfg.hidden_size))
  y = layer(jnp.asarray(x, jnp.float32))
  assert y.shape == x.shape and y.dtype == jnp.float32
  ref = reference_moe(x.reshape(-1, cfg.hidden_size), _params(layer), cfg)
  assert _rel(y.reshape(-1, cfg.hidden_size), ref) < F32_TOL


@pytest.mark.parametrize("impl", ["gather", "grouped"])
def test_moe_reads_x_through_its_input_norm(impl, rng):
  """MoE(x, input_norm=norm) is MoE(norm(x)): folded into the gather path's products (router,
  experts, shared experts), applied first on the grouped path."""
  layer = mla_jax.MoE(CFG, impl=impl, rngs=nnx.Rngs(int(rng.integers(2**31))))
  norm = mla_jax.layers.RMSNorm(CFG.hidden_size, 1e-6)
  norm.weight[...] = jnp.asarray(rng.uniform(0.5, 2.0, CFG.hidden_size), jnp.float32)
  x = rng.standard_normal((5, 1, CFG.hidden_size)) * 3.0
  y = layer(jnp.asarray(x, jnp.float32), input_norm=norm)
  g = np.asarray(norm.weight[...], np.float64)
  x_norm = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6) * g
  ref = reference_moe(x_norm.reshape(-1, CFG.hidden_size), _params(layer), CFG)
  assert _rel(y.reshape(-1, CFG.hidden_size), ref) < F32_TOL


@pytest.mark.parametrize("intermediate,split", [(32, True), (24, False)])
def test_gather_runs_the_shared_mlp_beside_the_experts(intermediate, split, rng, monkeypatch):
  """Experts.gather(..., shared=mlp) is gather + mlp(x), scaled or not. With the MLP's
  intermediate size a multiple of the experts' (16), its gate and up rows run as 2 more
  experts' and the MLP itself is not called; with 24 it is called."""
  seed = lambda: nnx.Rngs(int(rng.integers(2**31)))
  experts = moe.Experts(8, 32, 16, rngs=seed())
  mlp = mla_jax.layers.MLP(32, intermediate, rngs=seed())
  x = jnp.asarray(rng.standard_normal((3, 32)), jnp.float32)
  ids = jnp.asarray([[0, 7], [3, 3], [6, 1]], jnp.int32)
  weights = jnp.asarray(rng.random((3, 2)), jnp.float32)
  scale = jnp.asarray(rng.uniform(0.5, 2.0, (3, 1)), jnp.float32)
  want = [experts.gather(x, ids, weights, scale=s) + mlp(x, scale=s) for s in (None, scale)]
  calls = []
  call = mla_jax.layers.MLP.__call__
  monkeypatch.setattr(mla_jax.layers.MLP, "__call__",
                      lambda self, *a, **kw: calls.append(1) or call(self, *a, **kw))
  got = [experts.gather(x, ids, weights, scale=s, shared=mlp) for s in (None, scale)]
  assert len(calls) == (0 if split else 2)
  for g, w in zip(got, want):
    assert _rel(g, np.asarray(w, np.float64)) < F32_TOL


def test_grouped_experts_through_the_kernel_match_per_token_loop(rng, monkeypatch):
  """The grouped path as it runs on a GPU, its three products on ops.grouped_matmul's Pallas
  kernel (interpreted here): 21 tokens, 63 rows over 8 experts."""
  grouped_matmul = mla_jax.ops.grouped_matmul
  calls = []

  def kernel(*args, **kwargs):
    calls.append(kwargs.get("out_dtype"))
    return grouped_matmul(*args, impl="pallas", interpret=jax.default_backend() != "gpu",
                          **kwargs)

  monkeypatch.setattr(mla_jax.ops, "grouped_matmul", kernel)
  layer = mla_jax.MoE(CFG, impl="grouped", rngs=nnx.Rngs(int(rng.integers(2**31))))
  x = rng.standard_normal((3, 7, CFG.hidden_size))
  y = layer(jnp.asarray(x, jnp.float32))
  assert calls == [None, None, jnp.float32]  # gate_proj, up_proj, then down_proj in float32
  ref = reference_moe(x.reshape(-1, CFG.hidden_size), _params(layer), CFG)
  assert _rel(y.reshape(-1, CFG.hidden_size), ref) < F32_TOL


def test_auto_gathers_few_tokens_and_groups_many(rng):
  """N·k <= E: only the chosen experts' weights are gathered (no grouped matmul); more tokens
  than that run the grouped matmul."""
  layer = mla_jax.MoE(CFG, rngs=nnx.Rngs(0))
  jaxpr = lambda n: str(jax.make_jaxpr(layer)(jnp.zeros((n, 1, CFG.hidden_size))))
  few, many = jaxpr(2), jaxpr(3)  # 2·3 <= 8 < 3·3
  assert "ragged_dot" not in few and "gather" in few
  assert "ragged_dot" in many or "mla_grouped_matmul" in many  # the kernel on a GPU
  x = jnp.asarray(rng.standard_normal((2, 1, CFG.hidden_size)), jnp.float32)
  grouped = mla_jax.MoE(CFG, impl="grouped", rngs=nnx.Rngs(0))
  assert _rel(layer(x), np.asarray(grouped(x), np.float64)) < F32_TOL


def test_route_weights_and_ids(rng):
  logits = jnp.asarray(rng.standard_normal((5, 8)), jnp.float32)
  weights, ids = moe.route(logits, top_k=3, norm_topk_prob=True, routed_scaling_factor=2.0)
  assert ids.dtype == jnp.int32 and weights.dtype == jnp.float32
  np.testing.assert_allclose(np.sum(weights, axis=1), 2.0, rtol=1e-6)
  best = np.argsort(-np.asarray(logits), axis=1)[:, :3]
  np.testing.assert_array_equal(np.sort(ids, axis=1), np.sort(best, axis=1))


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="impl"):
    mla_jax.MoE(CFG, impl="dense", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="n_group"):
    dataclasses.replace(CFG, topk_method="group_limited_greedy", n_group=3)
  with pytest.raises(ValueError, match="num_experts_per_tok"):
    dataclasses.replace(CFG, num_experts_per_tok=9)
  with pytest.raises(ValueError, match="topk_method"):
    dataclasses.replace(CFG, topk_method="noaux_tc")


@pytest.mark.parametrize("fmt", ["q8_0", "iq4_nl"])
def test_quantized_experts_on_the_fused_gemv_equal_xla(fmt, rng):
  """Experts.gathered_gemv, a GPU's decode path for quantized experts (two GEMV launches: gate
  and up in one, down; interpreted here), equals gather on XLA over the same quantized weights,
  repeated experts included."""
  experts = moe.Experts(8, 64, 32, rngs=nnx.Rngs(int(rng.integers(2**31))))
  experts.set_weight_format(fmt)
  x = jnp.asarray(rng.standard_normal((3, 64)), jnp.float32)
  ids = jnp.asarray([[0, 7, 3], [3, 3, 5], [6, 1, 0]], jnp.int32)
  weights = jnp.asarray(rng.random((3, 3)), jnp.float32)
  want = experts.gather(x, ids, weights)
  got = experts.gathered_gemv(x, ids, weights, interpret=True)
  assert got.shape == want.shape == (3, 64)
  scale = jnp.asarray(rng.uniform(0.5, 2.0, (3, 1)), jnp.float32)
  scaled = experts.gathered_gemv(x, ids, weights, scale=scale, interpret=True)
  want_scaled = experts.gather(x, ids, weights, scale=scale)
  assert _rel(scaled, np.asarray(want_scaled, np.float64)) < F32_TOL
  launches = jax.make_jaxpr(lambda x: experts.gathered_gemv(x, ids, weights, interpret=True))(x)
  assert str(launches).count("pallas_call") == 2
  assert _rel(got, np.asarray(want, np.float64)) < F32_TOL
