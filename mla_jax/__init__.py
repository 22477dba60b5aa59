"""mla_jax: DeepSeek Multi-head Latent Attention in JAX/Pallas for fast token generation."""

from mla_jax import ops, quant
from mla_jax.attention import MLAttention, jit_step
from mla_jax.cache import KVCache, LatentCache, init_cache
from mla_jax.checkpoint import load_hf_attention
from mla_jax.config import MLAConfig, ModelConfig
from mla_jax.generate import decode_loop, decode_loop_fn
from mla_jax.moe import MoE
from mla_jax.stack import AttentionStack

__all__ = ["AttentionStack", "MLAConfig", "MLAttention", "KVCache", "LatentCache", "ModelConfig",
           "MoE", "decode_loop", "decode_loop_fn", "init_cache", "jit_step", "load_hf_attention",
           "ops", "quant"]
