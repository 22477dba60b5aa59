"""Quantized storage formats.

Int8Rows — the latent cache in int8 (llama.cpp's Q8_KV idea): each row (one token's c_kv [C]) holds
int8 values q and one float32 scale d, with x ≈ d·q and d = max|x| / 127. At C=512 that is
512 + 4 bytes a token instead of 1024 in bf16. Rows of zeros get d = 0 and dequantize to zeros.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

_INT8_MAX = 127.0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8Rows:
  """int8 values [..., C] with one float32 scale per row [...]."""

  values: jax.Array  # int8 [..., C]
  scales: jax.Array  # float32 [...]

  @property
  def shape(self) -> tuple[int, ...]:
    return self.values.shape

  @property
  def ndim(self) -> int:
    return self.values.ndim

  @property
  def nbytes(self) -> int:
    return self.values.size * 1 + self.scales.size * 4

  def __getitem__(self, idx) -> Int8Rows:
    """Indexes the leading (row) axes, e.g. rows[b] or rows[:, :S]."""
    return Int8Rows(self.values[idx], self.scales[idx])

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    return (self.values.astype(jnp.float32) * self.scales[..., None]).astype(dtype)


def quantize_rows(x: jax.Array) -> Int8Rows:
  """Symmetric per-row int8 quantization of x [..., C] (round to nearest)."""
  x = x.astype(jnp.float32)
  scales = jnp.max(jnp.abs(x), axis=-1) / _INT8_MAX
  inv = jnp.where(scales > 0, 1.0 / jnp.where(scales > 0, scales, 1.0), 0.0)
  values = jnp.clip(jnp.round(x * inv[..., None]), -_INT8_MAX, _INT8_MAX).astype(jnp.int8)
  return Int8Rows(values, scales)


def zeros_rows(shape: tuple[int, ...]) -> Int8Rows:
  """An all-zero Int8Rows of logical shape [..., C] (an empty cache buffer)."""
  return Int8Rows(jnp.zeros(shape, jnp.int8), jnp.zeros(shape[:-1], jnp.float32))


def dequantize(q, dtype=jnp.float32) -> jax.Array:
  """The float array a quantized container stands for; plain arrays are cast to dtype."""
  if hasattr(q, "dequantize"):
    return q.dequantize(dtype)
  return jnp.asarray(q, dtype)
