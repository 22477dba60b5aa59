"""MoE: DeepSeekMoE's routed and shared experts, as transformers' DeepseekV2Moe computes them.

Router (DeepSeek-V2 paper §2.2): scores s = softmax(x·W_gateᵀ) over the E routed experts, in
float32. Each token keeps its top k = num_experts_per_tok scores: over all experts
(topk_method="greedy"), or over the topk_group groups of E/n_group experts whose best score is
highest ("group_limited_greedy", the paper's device-limited routing, §2.2.2). The kept scores,
normalised to sum 1 when norm_topk_prob, times routed_scaling_factor, weight the experts' outputs:
y = Σ_j w_j · expert_{i_j}(x) + shared_experts(x).

norm_topk_prob follows DeepSeek's own modeling code (V3's, and vLLM's for V2): normalise, then
scale. transformers' DeepseekV2Moe ignores the field; every released DeepSeek-V2 config sets it
false, where the two agree.

Experts are stacked, [E, out, in] per projection (layers.Linear's layout for each expert):
gate_proj and up_proj [E, I, D], down_proj [E, D, I]. Two ways to run them:
- "gather" (decode, few tokens): index the stacked weights with each token's k expert ids and
  run k GEMVs a token. It reads N·k expert matrices, not all E, where they lie (Experts.gather says
  how it keeps XLA GPU from copying them first). The shared experts' gate and up rows join
  theirs, and a decoder layer's post-attention RMSNorm folds into the products, so that a
  V2-Lite MoE layer's decode step launches 2 kernels fewer (docs/model_decode.md).
- "grouped" (prefill): sort the N·k (token, expert) pairs by expert and run one grouped matmul
  per projection (ops.grouped_matmul: the rows of group e meet expert e's weight; on a GPU a
  Pallas kernel that reads each chosen expert's weight, where XLA's ragged_dot computes every
  row against all E experts).
"auto" gathers when N·k <= E, where gathering reads no more weight than the grouped product's E
matrices, and groups otherwise. On CPU the grouped matmul is ragged_dot, which jax 0.11.2 lowers
to a dense product over all E groups with the other groups' rows masked (E times the FLOPs; at
E=64, I=1408, D=2048 and 512 rows, 3.1 s against 35 ms for one expert's dense product), so it is
a correct but slow prefill there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mla_jax import ops
from mla_jax.config import ModelConfig
from mla_jax.layers import (MLP, InitSignature, Linear, RMSNorm, as_array, gated, on_fused_gemv,
                            to_weight_format)
from mla_jax.ops import device
from mla_jax.ops import top_k as top_k_op

IMPLS = ("auto", "gather", "grouped")

def route(logits, *, top_k: int, topk_method: str = "greedy", n_group: int = 1,
          topk_group: int = 1, norm_topk_prob: bool = False,
          routed_scaling_factor: float = 1.0, norm=None):
  """Router logits [N,E] -> (weights [N,top_k] float32, expert ids [N,top_k] int32); see the
  module docstring. norm: None, or (sq_sum [N,1], dim, eps) of an RMSNorm folded into the
  router's product: each row's logits are divided by sqrt(sq_sum / dim + eps) first. Greedy
  routing on a GPU takes all of it in one kernel (ops.softmax_top_k), where XLA launches the
  division, the softmax and a sort."""
  if topk_method == "greedy" and _on_router_kernel(logits, top_k):
    weights, ids = ops.softmax_top_k(logits, top_k, norm=norm, interpret=not device.is_gpu())
    return _scaled(weights, norm_topk_prob, routed_scaling_factor), ids
  if norm is not None:
    sq_sum, dim, eps = norm
    logits = logits * jax.lax.rsqrt(sq_sum / dim + eps)
  scores = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  candidates = scores
  if topk_method == "group_limited_greedy":
    N, E = scores.shape
    group_best = jnp.max(scores.reshape(N, n_group, E // n_group), axis=-1)  # [N,G]
    _, groups = jax.lax.top_k(group_best, topk_group)
    kept = jnp.any(groups[:, :, None] == jnp.arange(n_group), axis=1)  # [N,G]
    # Masked scores are 0, below every softmax score, as transformers masks them.
    candidates = jnp.where(jnp.repeat(kept, E // n_group, axis=1), scores, 0.0)
  elif topk_method != "greedy":
    raise ValueError(f"topk_method={topk_method!r}; expected 'greedy' or 'group_limited_greedy'")
  weights, ids = jax.lax.top_k(candidates, top_k)
  return _scaled(weights, norm_topk_prob, routed_scaling_factor), ids.astype(jnp.int32)


def _on_router_kernel(logits, top_k: int) -> bool:
  """Whether route takes greedy routing's softmax and top k in ops.softmax_top_k: on a GPU,
  where the kernel takes the shapes (E a power of two)."""
  return device.is_gpu() and top_k_op.unsupported(logits, top_k) is None


def _scaled(weights, norm_topk_prob: bool, routed_scaling_factor: float):
  """The chosen experts' weights [N, k], normalised to sum 1 if norm_topk_prob, then scaled."""
  if norm_topk_prob:
    weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
  return weights * routed_scaling_factor


def _shared_rows(shared: MLP, I: int, dtype):
  """The shared MLP's gate_proj and up_proj cut into S pieces of I rows, an expert's each: (S
  [I, D] slices of gate_proj, S of up_proj), dequantized if quantized; None where its
  intermediate size is no multiple of I."""
  gate, up = (as_array(p.weight.get_value(), dtype) for p in (shared.gate_proj, shared.up_proj))
  if gate.shape[0] % I:
    return None
  rows = [slice(c * I, (c + 1) * I) for c in range(gate.shape[0] // I)]
  return [gate[r] for r in rows], [up[r] for r in rows]


class Experts(nnx.Module):
  """E gated SiLU MLPs (layers.MLP's function), their weights stacked along a leading axis."""

  __signature__ = InitSignature()

  def __init__(self, num_experts: int, dim: int, intermediate_size: int, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    E, D, I = num_experts, dim, intermediate_size
    init = lambda fan_in, shape: nnx.initializers.normal(fan_in ** -0.5)(rngs.params(), shape,
                                                                         param_dtype)
    self.gate_proj = nnx.Param(init(D, (E, I, D)))
    self.up_proj = nnx.Param(init(D, (E, I, D)))
    self.down_proj = nnx.Param(init(I, (E, D, I)))
    self.dtype = dtype

  @property
  def num_experts(self) -> int:
    return self.gate_proj.get_value().shape[0]

  def set_weight_format(self, weight_format: str | None):
    """Stores the three stacked weights as layers.to_weight_format does (quantized per expert)."""
    for param in (self.gate_proj, self.up_proj, self.down_proj):
      param.set_value(to_weight_format(param.get_value(), weight_format))

  def gather(self, x, ids, weights, *, scale=None, shared: MLP | None = None):
    """x [N,D], ids and weights [N,k] -> Σ_j weights[:, j] · expert_{ids[:, j]}(x) [N,D] float32,
    reading only the N·k chosen experts' weights (per-token GEMVs).

    scale [N,1] float32 or None multiplies each token's gate_proj and up_proj products before
    the SiLU: an RMSNorm folded into them (MoE.__call__). shared, a gated MLP over the same x
    (the shared experts), adds shared(x) to the sum. Where its intermediate size is a multiple
    of the experts' I, its gate_proj and up_proj rows run beside the chosen experts', as that
    many more experts, in the same fusions and SiLU; its down_proj stays a product of its own,
    which XLA ran at 2.0 TB/s on an H100 where the chosen experts' down product over it too ran
    at 1.6 (docs/model_decode.md).

    gate_proj and up_proj run one (token, expert) pair at a time, each on its expert's weight
    sliced at the id: XLA GPU fuses such a slice into the product's reduction. Over the gathered
    [N,k,I,D] weights it writes the gathered copy out first (compiled for an H200 at
    V2-Lite's shapes: two 35 MB copies a layer at N=1 and two transposed 277 MB copies at N=8,
    against none this way, in as many kernels at N=1; tests/test_h200_compile.py). down_proj's
    product over the gathered weights fuses as it is.

    Quantized experts meet up to layers.GEMV_MAX_ROWS (token, expert) pairs on a GPU in the
    fused GEMV instead (gathered_gemv), which decodes their blocks in registers, where its
    kernel takes their shapes (layers.on_fused_gemv): XLA writes a dequantized expert out
    before its product."""
    x = x.astype(self.dtype)
    params = (self.gate_proj, self.up_proj, self.down_proj)
    if on_fused_gemv(x, tuple(p.get_value() for p in params), ids.size):
      y = self.gathered_gemv(x, ids, weights, scale=scale)
      return y if shared is None else y + shared(x, scale=scale)

    def expert(param, e):  # [out,in]; a quantized weight's blocks are sliced, then dequantized
      return as_array(jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, e, 0, False),
                                   param.get_value()), self.dtype)

    def hidden(n, gate, up):  # silu(gate · x_n) · (up · x_n) for token n: [rows of gate]
      return gated(gate @ x[n], up @ x[n], None if scale is None else scale[n])

    N, k = ids.shape
    h = [[hidden(n, expert(self.gate_proj, ids[n, j]), expert(self.up_proj, ids[n, j]))
          for j in range(k)] for n in range(N)]
    # ids come from top_k, in range: "clip" spares the bounds check that "fill" would add (a
    # kernel of its own a layer, compiled for an H200)
    down = as_array(jax.tree.map(lambda a: jnp.take(a, ids, axis=0, mode="clip"),
                                 self.down_proj.get_value()),
                    self.dtype)  # [N,k,D,I]
    shared_rows = None if shared is None else _shared_rows(shared, down.shape[-1], self.dtype)
    if shared_rows is not None:  # the shared gate and up rows beside the chosen experts'
      h = [pairs + [hidden(n, g, u) for g, u in zip(*shared_rows)] for n, pairs in enumerate(h)]
    h = jnp.stack([jnp.stack(pairs) for pairs in h])  # [N,k(+S),I]
    y = jnp.einsum("nki,nkdi->nkd", h[:, :k], down, preferred_element_type=jnp.float32)
    y = jnp.einsum("nkd,nk->nd", y, weights)
    if shared is None:
      return y
    if shared_rows is None:
      return y + shared(x, scale=scale)
    return y + shared.down_proj(h[:, k:].reshape(N, -1))

  def gathered_gemv(self, x, ids, weights, *, scale=None, interpret: bool = False):
    """gather's sum (without shared) for quantized experts in two fused GEMV launches, gate_proj
    and up_proj in one, down_proj in the other: the N·k pairs are the GEMV's heads, and head
    (n, j) reads expert ids[n, j]'s blocks where they lie (ops.batched_gemv's head_ids).
    scale: as gather's. interpret: Pallas' interpret mode."""
    N, k = ids.shape
    flat = ids.reshape(N * k)

    def gemv(rows, weights):  # rows [N·k or 1, in] -> [N·k, out], for each weight (a tuple)
      ys = ops.batched_gemv(rows[None], weights, impl="pallas", interpret=interpret,
                            head_ids=flat)
      return tuple(y[0] for y in ys)

    # token n for each of its k experts; one token's row is read by all of them where it lies
    # (a copy would be a kernel of XLA's own)
    rows = x.astype(self.dtype)
    rows = rows if N == 1 else jnp.repeat(rows, k, axis=0)
    gate, up = gemv(rows, (self.gate_proj.get_value(), self.up_proj.get_value()))
    row_scale = None if scale is None else jnp.repeat(scale, k, axis=0)
    (y,) = gemv(gated(gate, up, row_scale), (self.down_proj.get_value(),))
    y = y.astype(jnp.float32).reshape(N, k, -1)
    return jnp.einsum("nkd,nk->nd", y, weights)

  def grouped(self, x, ids, weights):
    """The same sum as gather, as grouped matmuls over the N·k rows sorted by expert."""
    N, k = ids.shape
    flat_ids = ids.reshape(-1)
    order = jnp.argsort(flat_ids, stable=True)  # row r of the groups is pair order[r]
    token = order // k
    group_sizes = jnp.bincount(flat_ids, length=self.num_experts).astype(jnp.int32)
    rows = x.astype(self.dtype)[token]  # [N·k, D]

    def grouped(lhs, param, **kw):
      return ops.grouped_matmul(lhs, as_array(param.get_value(), self.dtype), group_sizes, **kw)

    h = gated(grouped(rows, self.gate_proj), grouped(rows, self.up_proj))
    y = grouped(h, self.down_proj, out_dtype=jnp.float32)  # [N·k, D]
    y = y * weights.reshape(-1)[order][:, None]
    return jnp.zeros((N, x.shape[-1]), jnp.float32).at[token].add(y)


class MoE(nnx.Module):
  """A DeepSeek-V2 MoE layer (module docstring): gate (the router), experts, shared_experts.

  impl: "auto", "gather" or "grouped", how the routed experts run (module docstring).
  """

  __signature__ = InitSignature()

  def __init__(self, cfg: ModelConfig, *, impl: str = "auto", dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if impl not in IMPLS:
      raise ValueError(f"impl={impl!r}; expected one of {IMPLS}")
    if cfg.n_routed_experts < 1:
      raise ValueError(f"cfg.n_routed_experts={cfg.n_routed_experts}; a MoE needs >= 1")
    self.cfg, self.impl, self.dtype = cfg, impl, dtype
    D = cfg.hidden_size
    # The router runs in float32, as transformers' does.
    self.gate = Linear(D, cfg.n_routed_experts, dtype=jnp.float32, param_dtype=param_dtype,
                       rngs=rngs)
    self.experts = Experts(cfg.n_routed_experts, D, cfg.moe_intermediate_size, dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)
    if cfg.n_shared_experts:
      self.shared_experts = MLP(D, cfg.n_shared_experts * cfg.moe_intermediate_size, dtype=dtype,
                                param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, *, input_norm: RMSNorm | None = None):
    """x [..., D] -> [..., D] in self.dtype. input_norm: an RMSNorm that the layer reads x
    through (a decoder layer's post_attention_layernorm): the result is that of calling it on
    input_norm(x). The gather path folds it into the products, norm(x)·W = ((g·x)·W)/rms(x), so
    that no kernel writes the normalised x (docs/decode_step.md does the same for attention);
    the grouped path normalises first."""
    cfg = self.cfg
    x_ND = x.reshape(-1, x.shape[-1])
    impl = self.impl
    if impl == "auto":
      gather = x_ND.shape[0] * cfg.num_experts_per_tok <= cfg.n_routed_experts
      impl = "gather" if gather else "grouped"
    scale = norm = None
    if input_norm is not None and impl == "gather":
      scale = input_norm.inv_rms(x_ND)  # [N,1] float32
      norm = (input_norm.sq_sum(x_ND), x.shape[-1], input_norm.eps)  # the router's 1/rms(x)
      x_ND = input_norm.weight[...].astype(x.dtype) * x_ND
    elif input_norm is not None:
      x_ND = input_norm(x_ND)
    logits = self.gate(x_ND)
    weights, ids = route(logits, norm=norm,
                         top_k=cfg.num_experts_per_tok, topk_method=cfg.topk_method,
                         n_group=cfg.n_group, topk_group=cfg.topk_group,
                         norm_topk_prob=cfg.norm_topk_prob,
                         routed_scaling_factor=cfg.routed_scaling_factor)
    shared = self.shared_experts if cfg.n_shared_experts else None
    if impl == "gather":
      y = self.experts.gather(x_ND, ids, weights, scale=scale, shared=shared)
    else:
      y = self.experts.grouped(x_ND, ids, weights)
      y = y if shared is None else y + shared(x_ND)
    return y.reshape(x.shape).astype(self.dtype)
