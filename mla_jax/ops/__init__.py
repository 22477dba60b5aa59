"""Pure-function ops (no flax). Each public op dispatches on `impl`; `reference` is the float32
oracle (ops/reference.py), `xla` the plain-einsum baseline (ops/xla.py); kernels plug in here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mla_jax.ops import reference, xla
from mla_jax.ops.merge import merge_partials

DECODE_IMPLS = ("reference", "xla", "pallas", "cpu", "auto")
GEMV_IMPLS = ("reference", "xla", "pallas", "auto")

__all__ = ["mla_decode", "merge_partials", "batched_gemv", "resolve_impl", "reference", "xla"]


# What impl="auto" means on each platform (jax.default_backend()).
AUTO_DECODE = {
    "gpu": "pallas",
    "cpu": "cpu",
}
AUTO_GEMV = {
    "gpu": "xla",
    "cpu": "xla",
}


def resolve_impl(impl: str, *, allowed=DECODE_IMPLS) -> str:
  """Maps "auto" to the best implementation for the default backend."""
  if impl not in allowed:
    raise ValueError(f"impl={impl!r}; expected one of {allowed}")
  if impl != "auto":
    return impl
  table = AUTO_DECODE if allowed is DECODE_IMPLS else AUTO_GEMV
  return table.get(jax.default_backend(), "xla")


def _shape_error(name, arr, expected):
  return ValueError(f"{name}.shape={tuple(arr.shape)}; expected {expected}")


def check_decode_args(q_latent, q_rope, c_kv, k_rope, lengths):
  """Validates mla_decode's shapes; returns (B, H, S, C, R)."""
  if q_latent.ndim != 3:
    raise _shape_error("q_latent", q_latent, "[B,H,C]")
  B, H, C = q_latent.shape
  if q_rope.ndim != 3 or q_rope.shape[:2] != (B, H):
    raise _shape_error("q_rope", q_rope, f"[B,H,R] with B={B}, H={H}")
  R = q_rope.shape[2]
  if c_kv.ndim != 3 or c_kv.shape[0] != B or c_kv.shape[2] != C:
    raise _shape_error("c_kv", c_kv, f"[B,S,C] with B={B}, C={C}")
  S = c_kv.shape[1]
  if k_rope.shape != (B, S, R):
    raise _shape_error("k_rope", k_rope, f"[B,S,R]=({B}, {S}, {R})")
  if lengths.shape != (B,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"lengths.shape={tuple(lengths.shape)} dtype={lengths.dtype}; "
                     f"expected [B]=({B},) integer")
  return B, H, S, C, R


@functools.partial(jax.jit, static_argnames=("sm_scale",))
def _xla_decode(q_latent, q_rope, c_kv, k_rope, lengths, *, sm_scale):
  return xla.mla_decode(q_latent, q_rope, c_kv, k_rope, lengths, sm_scale=sm_scale)


def mla_decode(q_latent, q_rope, c_kv, k_rope, lengths, *, sm_scale: float, impl: str = "auto",
               **kernel_options):
  """Absorbed MLA decode: out [B,H,C], lse [B,H] float32. See DESIGN.md for the contract.

  c_kv is a [B,S,C] array or a quant.Int8Rows; valid entries of row b are [0, lengths[b]).
  kernel_options go to the chosen kernel (e.g. interpret=True for impl="pallas").
  """
  check_decode_args(q_latent, q_rope, c_kv, k_rope, lengths)
  impl = resolve_impl(impl)
  if impl == "reference":
    return reference.mla_decode(q_latent, q_rope, c_kv, k_rope, lengths, sm_scale=sm_scale)
  if impl == "xla":
    return _xla_decode(q_latent, q_rope, c_kv, k_rope, lengths, sm_scale=sm_scale)
  if impl == "pallas":
    from mla_jax.ops import decode_gpu  # pylint: disable=import-outside-toplevel
    return decode_gpu.mla_decode(q_latent, q_rope, c_kv, k_rope, lengths, sm_scale=sm_scale,
                                 **kernel_options)
  from mla_jax.ops import decode_cpu  # pylint: disable=import-outside-toplevel
  return decode_cpu.mla_decode(q_latent, q_rope, c_kv, k_rope, lengths, sm_scale=sm_scale,
                               **kernel_options)


def batched_gemv(x, w, *, impl: str = "auto", **kernel_options):
  """y[b,h] = x[b,h,:K] · w[h]: x [B,H,K'] with K' >= K, w [H,K,N] array or quantized tensor ->
  [B,H,N]. Only the first K columns of x are used: pass the whole query [B,H,K+R] for q_nope
  and the Pallas kernel reads them in place."""
  if x.ndim != 3:
    raise _shape_error("x", x, "[B,H,K'] (K' >= K of w)")
  if len(w.shape) != 3 or w.shape[0] != x.shape[1] or w.shape[1] > x.shape[2]:
    raise _shape_error("w", w, f"[H,K,N] with H={x.shape[1]} and K <= {x.shape[2]}")
  impl = resolve_impl(impl, allowed=GEMV_IMPLS)
  if impl == "reference":
    return reference.batched_gemv(x[..., :w.shape[1]], w)
  if impl == "xla":
    return xla.batched_gemv(x[..., :w.shape[1]], w)
  from mla_jax.ops import gemv_gpu  # pylint: disable=import-outside-toplevel
  return gemv_gpu.batched_gemv(x, w, **kernel_options)
