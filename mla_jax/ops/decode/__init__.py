"""The absorbed MLA decode family (split-KV attention over the latent cache): this module is its
one dispatcher. `plan` names the kernel and tuning that `mla_decode` runs:

  impl "reference" | "xla"  ops/reference.py, ops/xla.py (the whole cache in three einsums)
  impl "cpu"                cpu.py: XLA CPU, the cache in shards, each shard's work as GEMMs
  impl "pallas"             lowering "triton" (triton.py) or "mosaic", whose kernel follows from
                            the heads and the cache: mosaic.py (H ≤ 32, float cache),
                            mosaic_int8.py (H ≤ 32, quant.Int8Rows) or mosaic_heads.py (H > 32)

With lowering=None the Pallas kernel is chosen from the device and the shapes only: Mosaic on a
Hopper GPU for the arguments its kernel takes, else Triton (interpret mode runs Triton unless
lowering="mosaic"). docs/decode_gpu.md and docs/cpu_decode.md have the kernels and their timings.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mla_jax import quant
from mla_jax.ops import device, reference, xla
from mla_jax.ops.merge import project_values
from mla_jax.ops.common import (DECODE_IMPLS, Plan, cache_dtype, check_decode_args,
                                check_lengths, check_tuning, check_values, resolve_impl)
from mla_jax.ops.decode import cpu, mosaic, mosaic_common, mosaic_heads, mosaic_int8, triton

LOWERINGS = ("triton", "mosaic")
_KERNELS = {
    "triton": (triton, triton.TritonTuning),
    "mosaic": (mosaic, mosaic.MosaicTuning),
    "mosaic_int8": (mosaic_int8, mosaic_int8.MosaicInt8Tuning),
    "mosaic_heads": (mosaic_heads, mosaic_heads.HeadsTuning),
    "cpu": (cpu, cpu.ShardTuning),
}


def mosaic_kernel(q_latent, c_kv) -> str:
  """The Mosaic GPU kernel for these heads and this cache: "mosaic_heads" for more than
  mosaic_common.MAX_HEADS heads, else "mosaic_int8" for a quant.Int8Rows cache, else "mosaic"."""
  if q_latent.shape[1] > mosaic_common.MAX_HEADS:
    return "mosaic_heads"
  return "mosaic_int8" if isinstance(c_kv, quant.Int8Rows) else "mosaic"


def _pallas_kernel(q_latent, c_kv, k_rope, lowering, interpret) -> str:
  if lowering not in (None, *LOWERINGS):
    raise ValueError(f"lowering={lowering!r}: expected None or one of {LOWERINGS}")
  name = mosaic_kernel(q_latent, c_kv)
  reason = _KERNELS[name][0].unsupported(q_latent, c_kv, k_rope)
  if lowering is None:
    lowering = "mosaic" if reason is None and not interpret and device.is_hopper() else "triton"
  if lowering == "mosaic":
    if reason is not None:
      raise ValueError("lowering='mosaic': " + reason)
    return name
  reason = triton.unsupported(q_latent, c_kv, k_rope)
  if reason is not None:
    raise ValueError("lowering='triton': " + reason)
  return "triton"


def _choose_tuning(kernel: str, dims, q_latent, c_kv):
  """The kernel's own heuristic for these shapes; dims: (B, H, S, C, R)."""
  B, H, S, C, R = dims
  cache = cache_dtype(c_kv)
  itemsize = jnp.dtype(q_latent.dtype).itemsize
  if kernel == "cpu":
    return cpu.choose_tuning(H, C, R, cache)
  if kernel == "triton":
    return triton.choose_tuning(B, H, S, num_sms=device.num_sms(),
                                cache_itemsize=cache.itemsize, C=C, R=R,
                                out_dtype=q_latent.dtype)
  if kernel == "mosaic":
    return mosaic.choose_tuning(B, S, num_sms=device.num_sms())
  if kernel == "mosaic_int8":
    return mosaic_int8.choose_tuning(B, H, S, C, R, itemsize, num_sms=device.num_sms())
  return mosaic_heads.choose_tuning(B, H, S, num_sms=device.num_sms())


def plan(q_latent, q_rope, c_kv, k_rope, lengths, *, impl: str = "auto",
         lowering: str | None = None, tuning=None, interpret: bool = False) -> Plan:
  """What mla_decode runs for these arguments (arrays or jax.ShapeDtypeStruct; c_kv may be a
  quant.Int8Rows): only shapes and dtypes are read. lowering (impl "pallas" only): "triton",
  "mosaic" or None (see the module docstring). tuning: the chosen kernel's tuning dataclass, or
  None for its choose_tuning. interpret: the Pallas kernel will run in interpret mode."""
  dims = check_decode_args(q_latent, q_rope, c_kv, k_rope, lengths)
  impl = resolve_impl(impl, allowed=DECODE_IMPLS)
  if impl != "pallas" and (lowering is not None or interpret):
    raise ValueError(f"lowering={lowering!r}, interpret={interpret!r}: only impl='pallas' takes "
                     f"a lowering or runs interpreted (impl={impl!r})")
  if impl in ("reference", "xla"):
    if tuning is not None:
      raise ValueError(f"tuning={type(tuning).__name__}: impl={impl!r} takes no tuning")
    return Plan(impl, impl)
  kernel = "cpu" if impl == "cpu" else _pallas_kernel(q_latent, c_kv, k_rope, lowering, interpret)
  if tuning is None:
    tuning = _choose_tuning(kernel, dims, q_latent, c_kv)
  return Plan(impl, kernel, check_tuning(tuning, _KERNELS[kernel][1], kernel))


def _as_lengths(lengths):
  values = np.asarray(lengths)
  if values.dtype.kind not in "iu":
    raise ValueError(f"lengths={lengths!r}: expected integers, one per batch row")
  return jnp.asarray(values, jnp.int32)


@functools.partial(jax.jit, static_argnames=("sm_scale",))
def _xla_decode(q_latent, q_rope, c_kv, k_rope, lengths, *, sm_scale):
  return xla.mla_decode(q_latent, q_rope, c_kv, k_rope, lengths, sm_scale=sm_scale)


def mla_decode(q_latent, q_rope, c_kv, k_rope, lengths, *, sm_scale: float, impl: str = "auto",
               lowering: str | None = None, tuning=None, interpret: bool = False, wv_b=None):
  """Absorbed MLA decode: out [B,H,C] (float32 for impl "reference", else q_latent.dtype), lse
  [B,H] float32 (natural log). q_latent [B,H,C], q_rope [B,H,R], c_kv [B,S,C] or a
  quant.Int8Rows, k_rope [B,S,R], lengths [B] (valid entries of row b are [0, lengths[b])).
  Runs what plan() names; interpret: run a Pallas kernel in interpret mode (on a CPU).
  Outside jit, lengths outside [0, S] raise ValueError; under jit they are clamped to it.
  lengths may be any integer array-like (a list, a numpy array).
  wv_b [H,C,V] (kv_b_proj's value half; an array or a q8_0/iq4_nl quant.QuantizedTensor, which
  the Pallas path decodes in its merge): out is then out [B,H,C] (rounded to its dtype) · wv_b[h],
  [B,H,V] in the same dtype, accumulated in float32; the Pallas path merges the split's partials
  and projects them in one kernel (merge_triton.merge_values)."""
  if not isinstance(lengths, jax.Array):
    lengths = _as_lengths(lengths)
  p = plan(q_latent, q_rope, c_kv, k_rope, lengths, impl=impl, lowering=lowering, tuning=tuning,
           interpret=interpret)
  check_values(wv_b, *q_latent.shape[1:])
  check_lengths(lengths, k_rope.shape[1])
  if p.kernel in ("reference", "xla", "cpu"):
    out, lse = _unfused_decode(p, q_latent, q_rope, c_kv, k_rope, lengths, sm_scale=sm_scale)
    return (out, lse) if wv_b is None else (project_values(out, wv_b, out.dtype), lse)
  return _KERNELS[p.kernel][0].mla_decode(q_latent, q_rope, c_kv, k_rope, lengths, wv_b,
                                          sm_scale=float(sm_scale), tuning=p.tuning,
                                          interpret=interpret)


def _unfused_decode(p: Plan, q_latent, q_rope, c_kv, k_rope, lengths, *, sm_scale):
  if p.kernel == "reference":
    return reference.mla_decode(q_latent, q_rope, c_kv, k_rope, lengths, sm_scale=sm_scale)
  if p.kernel == "xla":
    return _xla_decode(q_latent, q_rope, c_kv, k_rope, lengths, sm_scale=sm_scale)
  return cpu.mla_decode(q_latent, q_rope, c_kv, k_rope, lengths, sm_scale=float(sm_scale),
                        tuning=p.tuning)
