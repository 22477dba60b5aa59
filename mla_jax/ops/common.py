"""What every op family shares: the impl names, the plan that a dispatcher reports, the argument
checks, the causal visibility rule and a few integer and logarithm helpers."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from mla_jax import quant
from mla_jax.ops import device

LOG2E = math.log2(math.e)  # softmax in base 2: exp(x) = 2^(x·log2 e)
LN2 = math.log(2.0)
TRITON_MIN_DOT = 16  # Triton's minimum dot extent per dimension
TMA_SLOTS = 8  # the Mosaic decode kernels' TMA tiles need the cache's slot count a multiple of it
# 1.5·2^23: float32 values in [2^23, 2^24) have unit spacing, so the float whose bits are
# MAGIC_BITS + i is MAGIC + i for every integer |i| < 2^22, and MAGIC + v rounds v to an integer
# (to nearest even).
MAGIC = 12582912.0
MAGIC_BITS = 0x4B400000

DECODE_IMPLS = ("reference", "xla", "pallas", "cpu", "auto")
GEMV_IMPLS = ("reference", "xla", "pallas", "auto")
# What impl="auto" means on each platform (device.platform(): the compilation target).
AUTO_DECODE = {"gpu": "pallas", "cpu": "cpu"}
AUTO_GEMV = {"gpu": "xla", "cpu": "xla"}


def next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def is_pow2(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def resolve_impl(impl: str, *, allowed=DECODE_IMPLS) -> str:
  """Maps "auto" to the best implementation for the device compiled for."""
  if impl not in allowed:
    raise ValueError(f"impl={impl!r}; expected one of {allowed}")
  if impl != "auto":
    return impl
  table = AUTO_DECODE if allowed is DECODE_IMPLS else AUTO_GEMV
  return table.get(device.platform(), "xla")


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a dispatcher runs: the impl, the kernel within it ("triton", "mosaic", "mosaic_heads",
  "mosaic_int8", "cpu", "xla" or "reference") and the kernel's tuning (None for xla and
  reference)."""

  impl: str
  kernel: str
  tuning: object | None = None

  def __str__(self) -> str:
    name = self.impl if self.kernel == self.impl else f"{self.impl}/{self.kernel}"
    if self.tuning is None:
      return name
    fields = " ".join(f"{f.name}={getattr(self.tuning, f.name)}"
                      for f in dataclasses.fields(self.tuning))
    return f"{name} {fields}"


def check_tuning(tuning, expected: type, kernel: str):
  """tuning, if it is an `expected`; a ValueError naming both if it is not."""
  if not isinstance(tuning, expected):
    raise ValueError(f"tuning={type(tuning).__name__}: kernel {kernel!r} takes a "
                     f"{expected.__name__}")
  return tuning


def check_field(tuning, name: str, ok: bool, expected: str):
  """A tuning dataclass's check of one field: a ValueError naming the field and what it expects."""
  if not ok:
    raise ValueError(f"{type(tuning).__name__}.{name}={getattr(tuning, name)!r}: "
                     f"expected {expected}")


def is_positive_int(v) -> bool:
  return isinstance(v, int) and v >= 1


def _shape_error(name, arr, expected):
  return ValueError(f"{name}.shape={tuple(arr.shape)}; expected {expected}")


def check_decode_args(q_latent, q_rope, c_kv, k_rope, lengths):
  """Validates mla_decode's shapes (arrays, quant.Int8Rows or jax.ShapeDtypeStruct); returns
  (B, H, S, C, R)."""
  if len(q_latent.shape) != 3:
    raise _shape_error("q_latent", q_latent, "[B,H,C]")
  B, H, C = q_latent.shape
  if len(q_rope.shape) != 3 or tuple(q_rope.shape[:2]) != (B, H):
    raise _shape_error("q_rope", q_rope, f"[B,H,R] with B={B}, H={H}")
  R = q_rope.shape[2]
  if len(c_kv.shape) != 3 or c_kv.shape[0] != B or c_kv.shape[2] != C:
    raise _shape_error("c_kv", c_kv, f"[B,S,C] with B={B}, C={C}")
  S = c_kv.shape[1]
  if tuple(k_rope.shape) != (B, S, R):
    raise _shape_error("k_rope", k_rope, f"[B,S,R]=({B}, {S}, {R})")
  if tuple(lengths.shape) != (B,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"lengths.shape={tuple(lengths.shape)} dtype={lengths.dtype}; "
                     f"expected [B]=({B},) integer")
  if min(B, H, C, R) < 1:
    raise _shape_error("q_rope" if R < 1 else "q_latent", q_rope if R < 1 else q_latent,
                       "every size >= 1")
  if S < 1:
    raise _shape_error("c_kv", c_kv, "[B,S,C] with S >= 1 (a cache of at least one slot)")
  return B, H, S, C, R


def check_values(wv_b, H: int, C: int):
  """Validates mla_decode's value up-projection wv_b: None, a floating [H,C,V] array or a
  quant.QuantizedTensor of that shape."""
  if wv_b is None:
    return
  if len(wv_b.shape) != 3 or tuple(wv_b.shape[:2]) != (H, C) or wv_b.shape[2] < 1:
    raise _shape_error("wv_b", wv_b, f"[H,C,V] with H={H}, C={C}")
  if (not isinstance(wv_b, quant.QuantizedTensor)
      and not jnp.issubdtype(wv_b.dtype, jnp.floating)):
    raise ValueError(f"wv_b.dtype={wv_b.dtype}; expected a floating dtype")


def check_lengths(lengths, S: int):
  """Outside jit, lengths are concrete: raises ValueError unless 0 <= lengths[b] <= S. Under jit
  they are not, and the kernels take min(max(lengths[b], 0), S) rows (documented, not checked)."""
  if isinstance(lengths, jax.core.Tracer):
    return
  values = np.asarray(lengths)
  bad = np.flatnonzero((values < 0) | (values > S))
  if bad.size:
    raise ValueError(f"lengths[{bad[0]}]={values[bad[0]]}: expected 0 <= lengths[b] <= S={S} "
                     "(valid entries of row b are [0, lengths[b]))")


def check_gemv_args(x, w):
  """Validates batched_gemv's shapes: x [B,H,K'] and w [H,K,N] with K <= K'."""
  if len(x.shape) != 3:
    raise _shape_error("x", x, "[B,H,K'] (K' >= K of w)")
  if len(w.shape) != 3 or w.shape[0] != x.shape[1] or w.shape[1] > x.shape[2]:
    raise _shape_error("w", w, f"[H,K,N] with H={x.shape[1]} and K <= {x.shape[2]}")


def check_same_kind(weights):
  """Weights that share a GEMV launch: one type, dtype, format, E and K."""
  first = weights[0]
  for t, wt in enumerate(weights[1:], 1):
    if (type(wt) is not type(first) or wt.dtype != first.dtype
        or getattr(wt, "fmt", None) != getattr(first, "fmt", None)
        or tuple(wt.shape[:2]) != tuple(first.shape[:2])):
      raise ValueError(f"w[{t}]: {type(wt).__name__} {tuple(wt.shape)} {wt.dtype}; the weights "
                       f"of one launch must be like w[0]: {type(first).__name__} "
                       f"{tuple(first.shape)} {first.dtype}, of one format, E and K")


def clamped_head_ids(head_ids, E: int):
  """A GEMV's head_ids as int32, each clamped into [0, E): the weight head each x head reads."""
  return jnp.clip(head_ids.astype(jnp.int32), 0, E - 1)


def cache_dtype(c_kv):
  """int8 for a quant.Int8Rows cache, else the array's dtype."""
  return jnp.dtype(jnp.int8 if isinstance(c_kv, quant.Int8Rows) else c_kv.dtype)


def causal_visibility(q_slots, kv_lengths, num_slots):
  """[B,T,S] bool: key slot j is visible to the query at cache slot q_slots[b,t] iff
  j < kv_lengths[b] and j <= q_slots[b,t]."""
  j = jnp.arange(num_slots)[None, None, :]
  return (j < jnp.asarray(kv_lengths)[:, None, None]) & (j <= jnp.asarray(q_slots)[:, :, None])
