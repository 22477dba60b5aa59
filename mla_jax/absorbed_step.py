"""MLAttention's absorbed decode step (T == 1) on the Pallas backend.

A B=1 token is launch-bound: every kernel costs ~1.7 µs inside a CUDA graph whatever its size,
and XLA ran the absorbed step as about 16 kernels a layer (docs/decode_step.md). Between the
projections, XLA ran the kv norm, both ropes (with their cos/sin tables), the two cache writes,
the length bookkeeping and the absorption of wk_b as some ten small fusions. Here a layer is

  projections  q_proj (or q_a_proj, q_a_layernorm, q_b_proj) and kv_a_proj_with_mqa on XLA: in
               transformers' [out, in] layout XLA reads the weights once, and a Triton GEMV
               measured slower (docs/decode_step.md). q_proj and kv_a_proj_with_mqa run as
               one product over both weights, whose output the latent kernel reads in place
               (layers.joint_linears); quantized, the two run in one launch of the fused GEMV
               (layers.project). The layer's input RMSNorm, when the module is
               given it (input_norm), folds into them and the latent kernel
  latent       ops/latent_update.py, one launch: the input norm's 1/rms, wk_b absorbed into
               the query, rope of q and k, the kv norm, the cache write and the lengths and
               overflow flags, in place
  attention    ops.mla_decode's split-KV kernel, then one kernel that merges its pieces and
               applies wv_b (ops.mla_decode's wv_b)
  projection   o_proj on XLA

With gemv_lowering="mosaic", the absorption of wk_b and the product with wv_b run on
ops.batched_gemv (MLAttention._gemv: that lowering's kernel, or XLA where the Triton kernel does
not take the weight), and the latent kernel and the merge do the rest. Quantized kv_b_proj
weights (weight_format "q8_0"/"iq4_nl") are decoded in the latent kernel (wk_b, where K is a
multiple of 32) and in the merge (wv_b), as the Triton GEMV decodes them. The arithmetic is
the module's other path's, in the same order and with the same roundings, but for the folded
input norm, which scales after the projections instead of before (a rounding's difference);
tests/test_absorbed_step.py checks both against the XLA path.
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp

from mla_jax import layers, ops, quant, rope
from mla_jax.ops import device, latent_update
from mla_jax.ops.common import resolve_impl


def supported(module, x) -> bool:
  """Whether module's call on x [B,T,D] runs here: absorbed mode, T == 1, the Pallas backend
  (backend "pallas", or "auto" on a GPU), no mesh (a sharded cache decodes through
  parallel.mla_decode_sharded) and sizes the latent kernel takes."""
  cfg = module.cfg
  if (module.mode != "absorbed" or x.shape[1] != 1 or resolve_impl(module.backend) != "pallas"
      or module.mesh is not None):
    return False
  return latent_update.unsupported(
      x.shape[0], cfg.num_heads, cfg.qk_nope_head_dim, cfg.kv_lora_rank, cfg.qk_rope_head_dim,
      latent_update.choose_tuning(cfg.kv_lora_rank)) is None


def _project(module, x, input_scale, q_in_kernel: bool):
  """(q, kv): module._project(x, input_scale); or (q | kv, None), both from one product over
  q_proj's and kv_a_proj_with_mqa's weights side by side (layers.joint_linears), which the
  latent kernel reads in place: a launch fewer a layer. That takes what joint_linears takes
  (decode rows on a GPU, unquantized weights), no q_lora, and q left whole to the latent kernel
  (q_in_kernel, no input_scale)."""
  if module.cfg.q_lora_rank is None and q_in_kernel and input_scale is None:
    joint = layers.joint_linears(x, module.q_proj, module.kv_a_proj_with_mqa)
    if joint is not None:
      return joint, None
  return module._project(x, input_scale=input_scale)


def _fold_input_norm(module, x, input_norm, q_in_kernel: bool):
  """(q, kv, latent_update's input-norm arguments) for x [B,D] read through input_norm.

  rms_norm(x)·W = ((x·g)·W) / rms(x) for the norm's weight g: the projections read x·g, an
  elementwise product that XLA fuses into each projection's reduction, and the latent kernel
  divides kv, and q if q_in_kernel, by rms(x), from Σx² (a reduction that XLA fuses with the
  residual add making x). Otherwise q is divided here: with q_lora, q_a_layernorm needs q_a
  itself, and a GEMV that absorbs wk_b reads q."""
  if input_norm is None:
    return (*_project(module, x, None, q_in_kernel), {})
  xg = x * input_norm.weight[...].astype(x.dtype)
  scale_q = q_in_kernel and module.cfg.q_lora_rank is None
  q, kv = _project(module, xg, None if scale_q else input_norm.inv_rms(x), q_in_kernel)
  norm_args = dict(input_ss=input_norm.sq_sum(x)[..., 0], input_dim=x.shape[-1],
                   input_eps=input_norm.eps, scale_q=scale_q)
  return q, kv, norm_args


def decode_step(module, x, positions, cache, input_norm=None):
  """x [B,D] in the module's dtype, positions [B], input_norm an RMSNorm or None (x is read
  through it) -> (heads [B,H,V], cache)."""
  cfg = module.cfg
  B, H = x.shape[0], cfg.num_heads
  wk_b, wv_b = module.kv_b_proj.weights()
  gemv_absorbs = module.gemv_lowering != "triton" or (
      isinstance(wk_b, quant.QuantizedTensor) and cfg.qk_nope_head_dim % quant.BLOCK)
  gemv_projects = module.gemv_lowering != "triton"
  int8 = isinstance(cache.c_kv, quant.Int8Rows)
  values, scales = (cache.c_kv.values, cache.c_kv.scales) if int8 else (cache.c_kv, None)
  q, kv, norm_args = _fold_input_norm(module, x, input_norm, q_in_kernel=not gemv_absorbs)
  q_latent, q_rope, values, scales, k_rope, lengths, overflow = latent_update.latent_update(
      q, kv, positions, module.kv_a_layernorm.weight[...],
      jnp.asarray(rope.inv_freq(cfg)), None if gemv_absorbs else wk_b, values, scales,
      cache.k_rope, cache.lengths, cache.overflow, num_heads=H,
      rope_scale=rope.attention_factor(cfg), eps=module.kv_a_layernorm.eps, dtype=module.dtype,
      tuning=latent_update.choose_tuning(cfg.kv_lora_rank),
      interpret=not device.is_gpu(), **norm_args)
  if gemv_absorbs:
    q_latent = module._gemv(q.reshape(B, H, cfg.qk_head_dim), wk_b)
  cache = dataclasses.replace(cache, c_kv=quant.Int8Rows(values, scales) if int8 else values,
                              k_rope=k_rope, lengths=lengths, overflow=overflow)
  decode = functools.partial(ops.mla_decode, q_latent, q_rope.astype(q_latent.dtype), cache.c_kv,
                             cache.k_rope, cache.lengths, sm_scale=cfg.softmax_scale,
                             impl=module._decode_impl,
                             **module._decode_options)
  if gemv_projects:
    o_latent, _ = decode()
    return module._gemv(o_latent.astype(q_latent.dtype), wv_b), cache
  heads, _ = decode(wv_b=wv_b)
  return heads, cache
