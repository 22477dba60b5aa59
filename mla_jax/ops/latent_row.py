"""One token's row of the latent cache, written from inside a decode kernel: the slot it goes
to, kv_a_layernorm's rounding and rope's rotation, on values the kernel has loaded. The kernels
that write the cache (latent_update.py, decode_layer.py) share these, and advance lengths and
overflow with cache.advance itself, so that their rule is the cache's."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def slot(length, position, max_len: int):
  """(valid, ok, at) for a row of `length` tokens getting a token at `position`: valid (int32
  1 or 0) unless the position is padding (-1); ok where it is written, valid and not full; at,
  its slot (`length`, kept in bounds where the row is full)."""
  valid = (position >= 0).astype(jnp.int32)
  return valid, (valid > 0) & (length < max_len), jnp.minimum(length, max_len - 1)


def kv_norm(c, weight, eps: float, dtype):
  """layers.RMSNorm of c [C] float32 with its weight, rounded where the module rounds: to dtype
  before and after the weight (as float32)."""
  rounded = lambda v: v.astype(dtype).astype(jnp.float32)
  inv_rms = jax.lax.rsqrt(jnp.sum(c * c) / c.shape[-1] + eps)
  return rounded(rounded(c * inv_rms) * rounded(weight))


def rotate(even, odd, position, inv_freq, scale: float):
  """rope.apply_rope on the pairs (even, odd) [..., R/2] float32 at integer positions [...]:
  cos and sin computed from the position and the inverse frequencies [R/2], times `scale`
  (rope.attention_factor)."""
  angles = position.astype(jnp.float32)[..., None] * inv_freq
  cos, sin = jnp.cos(angles) * scale, jnp.sin(angles) * scale
  return even * cos - odd * sin, even * sin + odd * cos
