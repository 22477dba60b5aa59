"""Quantized storage formats.

Int8Rows — the latent cache in int8 (llama.cpp's Q8_KV idea): each row (one token's c_kv [C]) holds
int8 values q and one float32 scale d, with x ≈ d·q and d = max|x| / 127. At C=512 that is
512 + 4 bytes a token instead of 1024 in bf16. Rows of zeros get d = 0 and dequantize to zeros.

QuantizedTensor — GGML block formats for weights [..., K, N] (per head [H, K_in, N_out], e.g. wk_b
[H,K,C] and wv_b [H,C,V]). A block is 32 consecutive elements along the contraction axis K, so
block kb of column n is w[..., 32·kb : 32·kb+32, n], and every block carries one float16 scale:
- "q8_0": x ≈ d·q with q int8 and d = max|x| / 127 (ggml's quantize_row_q8_0_ref).
- "iq4_nl": x ≈ d·IQ4_NL_VALUES[i] with i a 4-bit index into the non-linear table; d comes from
  ggml's search (quantize_row_iq4_nl_impl, 2·7+1 candidate scales, weights x², no imatrix).
Storage is structure-of-arrays with N fastest, so that a GPU tile of columns reads contiguous
bytes (the Pallas GEMV loads [32, block_n] of qs and [1, block_n] of d per block):
- q8_0:   qs int8  [..., K, N]      qs[..., k, n] is the int8 of w[..., k, n]
          d  f16   [..., K/32, N]
- iq4_nl: qs uint8 [..., K/2, N]    byte 16·kb + j of column n holds element 32·kb + j in its
          d  f16   [..., K/32, N]   low nibble and element 32·kb + 16 + j in its high nibble
The bytes of one block (d, then qs in block order) are exactly ggml's block_q8_0 / block_iq4_nl
for the ggml row n of the [N, K] matrix (ggml contracts along its rows): `to_ggml_blocks`
returns that array-of-blocks byte layout.

QuantizedActivations — Q8_1-style activations x [..., K]: blocks of 32 along K with int8 values,
scale d = max|x| / 127 and s = d·Σq (ggml's block_q8_1; ggml stores d and s as halves, here they
stay float32 because activations are quantized on the fly and never stored).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

_INT8_MAX = 127.0

BLOCK = 32  # QK8_0 = QK4_NL = QK8_1 in ggml
FORMATS = ("q8_0", "iq4_nl")
IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
_IQ4_NL_NTRY = 7  # quantize_iq4_nl's search: scales (itry + values[0]) / max for |itry| <= 7
_GROUP_MAX_EPS = 1e-15
_CHUNK = 1 << 20  # the most weights quantize() works on at a time


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
    """The rows as a dtype array [..., C]: values · scales."""
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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
  """A GGML-block-quantized weight [..., K, N]; see the module docstring for the layout."""

  qs: jax.Array  # q8_0: int8 [..., K, N]; iq4_nl: uint8 [..., K/2, N]
  d: jax.Array  # float16 [..., K/32, N]
  fmt: str = dataclasses.field(metadata=dict(static=True))

  @property
  def shape(self) -> tuple[int, ...]:
    *lead, kb, n = self.d.shape
    return (*lead, kb * BLOCK, n)

  @property
  def ndim(self) -> int:
    return self.d.ndim

  @property
  def dtype(self):
    return self.qs.dtype

  @property
  def nbytes(self) -> int:
    return self.qs.size + 2 * self.d.size

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    """The weight as a dtype array [..., K, N]."""
    *lead, kb, n = self.d.shape
    if self.fmt == "q8_0":
      q = self.qs.astype(jnp.float32).reshape(*lead, kb, BLOCK, n)
    else:
      packed = self.qs.reshape(*lead, kb, BLOCK // 2, n)
      idx = jnp.concatenate([packed & 0xF, packed >> 4], axis=-2)
      q = jnp.asarray(IQ4_NL_VALUES, jnp.float32)[idx.astype(jnp.int32)]
    w = q * self.d.astype(jnp.float32)[..., :, None, :]
    return w.reshape(self.shape).astype(dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedActivations:
  """Q8_1-style activations [..., K]: int8 values, per-block scale d and sum s = d·Σq."""

  values: jax.Array  # int8 [..., K]
  d: jax.Array  # float32 [..., K/32]
  s: jax.Array  # float32 [..., K/32]

  @property
  def shape(self) -> tuple[int, ...]:
    return self.values.shape

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    """The activations as a dtype array [..., K]."""
    *lead, k = self.values.shape
    q = self.values.astype(jnp.float32).reshape(*lead, k // BLOCK, BLOCK)
    return (q * self.d[..., None]).reshape(self.shape).astype(dtype)


def round_half_away(v: jax.Array) -> jax.Array:
  """C's roundf (ties away from zero), which ggml uses; jnp.round rounds ties to even."""
  r = jnp.floor(jnp.abs(v) + 0.5)
  return jnp.where(v < 0, -r, r)


def q8_block_scale(amax: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(d, 1/d) for an int8 block with max |x| = amax; an all-zero block gets (0, 0)."""
  d = amax / _INT8_MAX
  return d, jnp.where(d > 0, 1.0 / jnp.where(d > 0, d, 1.0), 0.0)


def _check_blocked(w, name):
  if w.ndim < 2 or w.shape[-2] % BLOCK:
    raise ValueError(f"{name}.shape={tuple(w.shape)}; expected [..., K, N] with K a multiple "
                     f"of {BLOCK}")


def _iq4_nl_index(a: jax.Array) -> jax.Array:
  """ggml's best_index_int8: the nearest table entry to a (ties to the upper one)."""
  values = jnp.asarray(IQ4_NL_VALUES, jnp.float32)
  mu = jnp.clip(jnp.searchsorted(values, a, side="right"), 1, len(IQ4_NL_VALUES) - 1)
  return jnp.where(a - values[mu - 1] < values[mu] - a, mu - 1, mu)


def _quantize_q8_0(xb):
  """xb [..., 32] float32 -> (q int8 [..., 32], d float16 [...])."""
  d, inv = q8_block_scale(jnp.max(jnp.abs(xb), axis=-1))
  return round_half_away(xb * inv[..., None]).astype(jnp.int8), d.astype(jnp.float16)


def _quantize_iq4_nl(xb):
  """xb [..., 32] float32 -> (indices uint8 [..., 32], d float16 [...]), ggml's scale search."""
  values = jnp.asarray(IQ4_NL_VALUES, jnp.float32)
  weight = xb * xb
  amax_at = jnp.argmax(jnp.abs(xb), axis=-1)[..., None]
  xmax = jnp.take_along_axis(xb, amax_at, axis=-1)[..., 0]  # signed value of largest |x|
  valid = jnp.abs(xmax) >= _GROUP_MAX_EPS
  safe_max = jnp.where(valid, xmax, 1.0)

  def fit(inv_scale):
    q = values[_iq4_nl_index(inv_scale[..., None] * xb)]
    return jnp.sum(weight * q * xb, axis=-1), jnp.sum(weight * q * q, axis=-1)

  def search(itry, carry):
    d, best = carry
    sumqx, sumq2 = fit((itry.astype(jnp.float32) + values[0]) / safe_max)
    better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
    d = jnp.where(better, sumqx / jnp.where(sumq2 > 0, sumq2, 1.0), d)
    return d, jnp.where(better, d * sumqx, best)

  sumqx, sumq2 = fit(-values[0] / safe_max)
  d = sumqx / jnp.where(sumq2 > 0, sumq2, 1.0)
  # One candidate at a time: unrolled, XLA kept every candidate's [..., 32] temporaries alive
  # together (5.7 times the temporaries of one at a time, compiled for an H200).
  d, _ = jax.lax.fori_loop(-_IQ4_NL_NTRY, _IQ4_NL_NTRY + 1, search, (d, d * sumqx))
  d = jnp.where(valid, d, 0.0)
  inv = jnp.where(d != 0, 1.0 / jnp.where(d != 0, d, 1.0), 0.0)
  return _iq4_nl_index(inv[..., None] * xb).astype(jnp.uint8), d.astype(jnp.float16)


def _quantize_block_row(fmt: str, rows):
  """One block row of w, rows [32, N] -> (qs [32, N] int8 or [16, N] uint8, d [N] float16)."""
  xb = rows.astype(jnp.float32).T  # [N, 32]: the blocks of the row's columns
  q, d = (_quantize_q8_0 if fmt == "q8_0" else _quantize_iq4_nl)(xb)
  q = q.T
  if fmt == "iq4_nl":
    q = q[: BLOCK // 2] | (q[BLOCK // 2 :] << 4)
  return q, d


def _chunk_rows(num_rows: int, row_size: int) -> int:
  """Block rows a chunk: all of them if they hold at most _CHUNK weights, else the most that
  divides num_rows and stays within _CHUNK (a divisor, so that lax.map slices off no remainder,
  which would copy w)."""
  most = _CHUNK // max(row_size, 1)
  if num_rows <= most:
    return num_rows
  return next(rows for rows in range(max(most, 1), 0, -1) if num_rows % rows == 0)


@functools.partial(jax.jit, static_argnames="fmt")
def quantize(w: jax.Array, fmt: str) -> QuantizedTensor:
  """GGML block quantization of w [..., K, N] along K (fmt "q8_0" or "iq4_nl"), K a multiple
  of 32; the result's .shape is w's (see the module docstring for qs and d).

  The block rows (32 rows of K) run in chunks of at most _CHUNK weights, so that the
  working temporaries stay that size whatever w's: compiled for an H200, a [128, 512, 512]
  weight quantized at once to IQ4_NL took 7.2 GB (213 bytes a weight), in chunks 0.19 GB. Of
  those, 0.15 GB are a transposed copy of w and of the packed result (4.5 bytes a weight): XLA:GPU
  lays the loop's operands out with the 32 rows of a block minor."""
  if fmt not in FORMATS:
    raise ValueError(f"fmt={fmt!r}; expected one of {FORMATS}")
  _check_blocked(w, "w")
  *lead, k, n = w.shape
  rows = w.reshape(math.prod(lead) * (k // BLOCK), BLOCK, n)  # [L·K/32, 32, N]
  row = functools.partial(_quantize_block_row, fmt)
  chunk = _chunk_rows(rows.shape[0], BLOCK * n)
  q, d = (jax.vmap(row)(rows) if chunk == rows.shape[0]
          else jax.lax.map(row, rows, batch_size=chunk))
  return QuantizedTensor(q.reshape(*lead, k // BLOCK * q.shape[1], n),
                         d.reshape(*lead, k // BLOCK, n), fmt)


def quantize_q8_1(x: jax.Array) -> QuantizedActivations:
  """Q8_1-style quantization of activations x [..., K] in blocks of 32 along K."""
  if x.shape[-1] % BLOCK:
    raise ValueError(f"x.shape={tuple(x.shape)}; expected [..., K] with K a multiple of {BLOCK}")
  *lead, k = x.shape
  xb = x.astype(jnp.float32).reshape(*lead, k // BLOCK, BLOCK)
  d, inv = q8_block_scale(jnp.max(jnp.abs(xb), axis=-1))
  q = round_half_away(xb * inv[..., None])
  return QuantizedActivations(q.astype(jnp.int8).reshape(x.shape), d, d * jnp.sum(q, axis=-1))


def to_ggml_blocks(qw: QuantizedTensor) -> np.ndarray:
  """The ggml bytes of qw [..., K, N]: uint8 [..., N, K/32, 34 (q8_0) or 18 (iq4_nl)].

  Row n of the result is ggml's array of block_q8_0 / block_iq4_nl for the ggml row n (the
  column w[..., :, n]): a little-endian float16 d, then the block's qs bytes.
  """
  qs, d = np.asarray(qw.qs), np.asarray(qw.d, np.float16)
  *lead, kb, n = d.shape
  per_block = qs.shape[-2] // kb
  qs = np.moveaxis(qs.reshape(*lead, kb, per_block, n), -1, -3)  # [..., N, KB, per_block]
  d_bytes = np.swapaxes(d, -1, -2).astype("<f2")[..., None].view(np.uint8)  # [..., N, KB, 2]
  return np.concatenate([d_bytes, qs.view(np.uint8)], axis=-1)


def dequantize(q, dtype=jnp.float32) -> jax.Array:
  """The float array a quantized container stands for, in its logical shape (QuantizedTensor
  [..., K, N], Int8Rows [..., C], QuantizedActivations [..., K]); plain arrays are cast to
  dtype."""
  if hasattr(q, "dequantize"):
    return q.dequantize(dtype)
  return jnp.asarray(q, dtype)
