"""mla_jax: DeepSeek Multi-head Latent Attention in JAX/Pallas for fast token generation."""

from mla_jax import ops, parallel, quant
from mla_jax.attention import MLAttention, jit_step
from mla_jax.cache import KVCache, LatentCache, init_cache
from mla_jax.checkpoint import load_hf_attention, load_hf_model
from mla_jax.config import MLAConfig, ModelConfig
from mla_jax.generate import Sampler, decode_loop, decode_loop_fn, generate, generate_fn
from mla_jax.model import CausalLM
from mla_jax.moe import MoE
from mla_jax.stack import AttentionStack

__all__ = ["AttentionStack", "CausalLM", "MLAConfig", "MLAttention", "KVCache", "LatentCache",
           "ModelConfig", "MoE", "Sampler", "decode_loop", "decode_loop_fn", "generate",
           "generate_fn", "init_cache", "jit_step", "load_hf_attention", "load_hf_model", "ops",
           "parallel", "quant"]
