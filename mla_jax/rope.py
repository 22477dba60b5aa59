"""YaRN rotary embeddings as DeepSeek-V2 uses them (transformers' DeepseekV2RotaryEmbedding).

Layout: the R rope dims are rotated as adjacent pairs (x0,x1), (x2,x3), ... — the complex view of
transformers 5.x's `apply_rotary_emb`. The latent cache stores k_rope after rotation in this same
interleaved layout (it matches the golden `cache_k_rope`).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from mla_jax.config import MLAConfig, yarn_mscale


def inv_freq(cfg: MLAConfig) -> np.ndarray:
  """[R/2] float32 inverse frequencies, YaRN-blended (Peng et al. 2023, "NTK-by-parts").

  Computed in float32 in the same order as transformers, so that positions past 4096 rotate by
  bit-identical angles: a one-ulp difference in a frequency moves the angle at position 5000 by
  ~3e-4 rad, far above the 1e-5 parity target.
  """
  dim = cfg.qk_rope_head_dim
  f32 = np.float32
  pos_freqs = f32(cfg.rope_theta) ** (np.arange(0, dim, 2).astype(f32) / f32(dim))
  extrapolation = f32(1.0) / pos_freqs
  if cfg.rope_factor <= 1.0:
    return extrapolation
  interpolation = f32(1.0) / (f32(cfg.rope_factor) * pos_freqs)
  low, high = _correction_range(cfg.beta_fast, cfg.beta_slow, dim, cfg.rope_theta,
                                cfg.original_max_position_embeddings)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2).astype(f32) - f32(low)) / f32(high - low), 0, 1).astype(f32)
  keep = f32(1.0) - ramp  # weight of the unscaled (extrapolated) frequency
  return (interpolation * (f32(1.0) - keep) + extrapolation * keep).astype(f32)


def attention_factor(cfg: MLAConfig) -> float:
  """YaRN's cos/sin multiplier: mscale(factor, mscale) / mscale(factor, mscale_all_dim)."""
  if cfg.rope_factor <= 1.0:
    return 1.0
  if cfg.mscale and cfg.mscale_all_dim:
    return yarn_mscale(cfg.rope_factor, cfg.mscale) / yarn_mscale(cfg.rope_factor,
                                                                  cfg.mscale_all_dim)
  return yarn_mscale(cfg.rope_factor)


def rope_tables(cfg: MLAConfig, positions_BT: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """cos, sin [B,T,R/2] in float32 for integer positions [B,T], scaled by attention_factor."""
  angles = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq(cfg))
  scale = attention_factor(cfg)
  return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
  """Rotates adjacent pairs of x [..., R] by cos/sin [..., R/2] (broadcast); float32 math."""
  pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  re, im = pairs[..., 0], pairs[..., 1]
  out = jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)


def _correction_range(beta_fast, beta_slow, dim, base, original_max_pos):
  def correction_dim(num_rotations):
    return dim * math.log(original_max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

  low = math.floor(correction_dim(beta_fast))
  high = math.ceil(correction_dim(beta_slow))
  return max(low, 0), min(high, dim - 1)
