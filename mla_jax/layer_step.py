"""A decode layer's attention half, x + attn(input_norm(x)), as one kernel: ops/decode_layer.py.

MLAttention.residual calls it, when the module was built with layer_kernel=True, for one token a
row in absorbed mode on the Pallas backend, where the kernel takes the layer: unquantized
weights, x and a float cache all in the module's dtype (the kernel reads the weights as they
lie), no q_lora (its q_a_layernorm needs all of q_a before q_b_proj, one more phase), the
default kernels (gemv_lowering "triton", decode_lowering None), no mesh, and the sizes of
ops.decode_layer.unsupported. Elsewhere MLAttention.residual adds the module's own output."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from mla_jax import quant, rope
from mla_jax.ops import decode_layer, device
from mla_jax.ops.common import resolve_impl

# Programs of the kernel where it is interpreted (on a CPU): the projections' phases run one
# program per unit there, so fewer programs test the same code faster.
INTERPRET_PROGRAMS = 16


def supported(module, x, cache, input_norm) -> bool:
  """Whether module.residual(x, positions, cache, input_norm=input_norm) runs the kernel."""
  cfg = module.cfg
  if (not module.layer_kernel or module.mode != "absorbed" or x.shape[1] != 1
      or input_norm is None
      or x.dtype != jnp.dtype(module.dtype)
      or resolve_impl(module.backend) != "pallas" or module.mesh is not None
      or cfg.q_lora_rank is not None or module.gemv_lowering != "triton"
      or module.decode_lowering is not None):
    return False
  weights = (module.q_proj.weight.get_value(), module.kv_a_proj_with_mqa.weight.get_value(),
             module.o_proj.weight.get_value(), *module.kv_b_proj.weights())
  if any(isinstance(w, quant.QuantizedTensor) or w.dtype != jnp.dtype(module.dtype)
         for w in weights):
    return False
  if isinstance(cache.c_kv, quant.Int8Rows) or cache.c_kv.dtype != jnp.dtype(module.dtype):
    return False
  return decode_layer.unsupported(x.shape[0], cfg.hidden_size, cfg.num_heads,
                                  cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank,
                                  cfg.v_head_dim) is None


def residual_step(module, x, positions, cache, input_norm):
  """x [B,D] (module.dtype), positions [B] -> (x + attn(input_norm(x)) [B,D], cache)."""
  cfg = module.cfg
  B, S = x.shape[0], cache.c_kv.shape[1]
  interpret = not device.is_gpu()
  shape = decode_layer.plan(
      B, cfg.hidden_size, cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
      cfg.kv_lora_rank, cfg.v_head_dim, S,
      programs=INTERPRET_PROGRAMS if interpret else device.num_sms(),
      dtype=jnp.dtype(module.dtype).name, input_eps=input_norm.eps,
      kv_eps=module.kv_a_layernorm.eps, rope_scale=rope.attention_factor(cfg),
      sm_scale=cfg.softmax_scale)
  wk_b, wv_b = module.kv_b_proj.weights()
  weights = dict(input_norm=input_norm.weight[...], q_proj=module.q_proj.weight[...],
                 kv_a_proj=module.kv_a_proj_with_mqa.weight[...],
                 kv_norm=module.kv_a_layernorm.weight[...],
                 inv_freq=jnp.asarray(rope.inv_freq(cfg)), wk_b=wk_b, wv_b=wv_b,
                 o_proj=module.o_proj.weight[...])
  buffers = dict(c_kv=cache.c_kv, k_rope=cache.k_rope, lengths=cache.lengths,
                 overflow=cache.overflow)
  x, buffers = decode_layer.decode_layer(x, positions, weights, buffers, shape,
                                         interpret=interpret)
  return x, dataclasses.replace(cache, **buffers)
