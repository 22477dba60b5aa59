"""The batched GEMV family, y[b,h] = x[b,h,:K] · w[h] (the absorbed decode's two products): this
module is its one dispatcher. `plan` names the kernel and tuning that `batched_gemv` runs:

  impl "reference" | "xla"  ops/reference.py, ops/xla.py
  impl "pallas"             lowering "triton" (triton.py, the default) or "mosaic" (mosaic.py)

Triton is the default and the portable path. On a Hopper GPU, quantized weights run on Mosaic
where it was measured faster (`default_lowering`): a MoE layer's chosen experts, and one token
through a q8_0 Linear or an IQ4_NL one as wide as lm_head. Inside a compiled step XLA captures
either kernel in its command buffers (CUDA graphs); a standalone call of the Mosaic kernel alone
runs outside them, at 2-5 µs of host time (docs/batched_gemv.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mla_jax import quant
from mla_jax.ops import device, reference, xla
from mla_jax.ops.common import (GEMV_IMPLS, Plan, check_gemv_args, check_tuning,
                                resolve_impl)
from mla_jax.ops.gemv import mosaic, triton

LOWERINGS = ("triton", "mosaic")
_KERNELS = {"triton": (triton, triton.TritonGemvTuning),
            "mosaic": (mosaic, mosaic.MosaicGemvTuning)}


def plan(x, w, *, impl: str = "auto", lowering: str | None = None, tuning=None,
         interpret: bool = False, head_ids=None) -> Plan:
  """What batched_gemv runs for these arguments (arrays or jax.ShapeDtypeStruct; w may be a
  quant.QuantizedTensor): only shapes and dtypes are read. lowering (impl "pallas" only):
  "triton", "mosaic" or None (default_lowering). tuning: the chosen kernel's tuning dataclass,
  or None for its choose_tuning. interpret (impl "pallas" only): the kernel will run in interpret
  mode, where lowering=None means Triton. w may be a tuple of weights (batched_gemv).
  """
  weights = w if isinstance(w, tuple) else (w,)
  if head_ids is not None:
    x = _gathered_x(x, head_ids)
  for wt in weights:
    check_gemv_args(x, wt if head_ids is None else _gathered_shape(x, wt))
  impl = resolve_impl(impl, allowed=GEMV_IMPLS)
  if impl != "pallas":
    if lowering is not None or tuning is not None or interpret:
      raise ValueError(f"lowering={lowering!r}, tuning={tuning!r}, interpret={interpret!r}: "
                       f"impl={impl!r} takes none of them")
    return Plan(impl, impl)
  if lowering not in (None, *LOWERINGS):
    raise ValueError(f"lowering={lowering!r}: expected None or one of {LOWERINGS}")
  kernel = lowering or default_lowering(x, weights, head_ids, interpret)
  module, tuning_type = _KERNELS[kernel]
  reason = next(filter(None, (module.unsupported(x, wt) for wt in weights)), None)
  if reason is not None:
    raise ValueError(f"lowering={kernel!r}: {reason}")
  if tuning is None:  # several weights: the program count of their columns together
    B, H, _ = x.shape
    _, K, _ = weights[0].shape
    N = sum(wt.shape[2] for wt in weights)
    fmt = getattr(weights[0], "fmt", None)
    tuning = (triton.choose_tuning(B, H, K, N, fmt) if kernel == "triton"
              else mosaic.choose_tuning(B, H, K, N, fmt, num_sms=device.num_sms()))
  return Plan(impl, kernel, check_tuning(tuning, tuning_type, kernel))


def default_lowering(x, weights: tuple, head_ids, interpret: bool) -> str:
  """The kernel of lowering=None: "mosaic" for quantized weights on a Hopper GPU, compiled, where
  that kernel takes them and was measured faster (_mosaic_measured_faster); else "triton"."""
  if (isinstance(weights[0], quant.QuantizedTensor) and not interpret and device.is_hopper()
      and _mosaic_measured_faster(x, weights, head_ids)
      and all(mosaic.unsupported(x, wt) is None for wt in weights)):
    return "mosaic"
  return "triton"


def _mosaic_measured_faster(x, weights: tuple, head_ids) -> bool:
  """Where the Mosaic kernel took less GPU time than the Triton one (H100, one token):

  - a MoE layer's chosen experts (head_ids). A 4-layer V2-Lite model (a dense layer and 3 MoE
    layers, absorbed, B=1, tg64@pp128), two runs of each, µs of GPU kernels a token and t/s:
    q8_0 607.1 / 609.0 µs, 1536 / 1552 t/s on Triton against 553.9 / 557.1 µs, 1595 / 1576 t/s
    on Mosaic; iq4_nl 495.3 / 495.4 µs, 1845 / 1898 t/s against 487.8 / 481.8 µs, 1887 / 1907
    t/s. Timed alone at 6 of 64 experts, 15.7 against 28.7 µs for q8_0's gate and up products
    (2048 -> 2 x 1408), 16.4 against 20.5 for iq4_nl's (docs/batched_gemv.md). Several
    tokens' experts (N·k heads) take the same path unmeasured.
  - one row through a Linear (one head) in q8_0, with mosaic.choose_split's split-K: 7.6
    against 9.4 µs for q_proj with kv_a_proj_with_mqa (2048 -> 3648), 6.1 against 6.2 for
    o_proj, 9.1 against 12.2 for the shared experts' gate and up products (2048 -> 2 x 2816),
    7.7 against 8.5 for their down product, 97.6 against 155.5 for lm_head (2048 -> 102400).
    The 27-layer V2-Lite model, tg64@pp128, one process, reps alternating: 298.9 against 284.7
    t/s, 2514 against 2757 µs of kernels a token.
  - in iq4_nl, only a Linear as wide as lm_head (at least 8 column tiles of 64 an SM): 91.3
    against 106.6 µs there, but slower at the layers' Linears (6.0-10.3 against 5.2-8.9)."""
  B, H, _ = x.shape
  if head_ids is not None:
    return True
  if B != 1 or H != 1:
    return False
  columns = sum(wt.shape[2] for wt in weights)
  return weights[0].fmt == "q8_0" or columns >= 8 * 64 * device.num_sms()


def unsupported(x, w, *, lowering: str | None = None) -> str | None:
  """Why impl="pallas" with this lowering (None: Triton) cannot take x and w (shapes and dtypes
  as batched_gemv's), or None if it can."""
  return _KERNELS[lowering or "triton"][0].unsupported(x, w)


def batched_gemv(x, w, *, impl: str = "auto", lowering: str | None = None, tuning=None,
                 interpret: bool = False, head_ids=None):
  """y[b,h] = x[b,h,:K] · w[h]: x [B,H,K'] with K' >= K, w [H,K,N] array or
  quant.QuantizedTensor -> [B,H,N]. Only the first K columns of x are used: pass the whole query
  [B,H,K+R] for q_nope and the Pallas kernels read them in place. Runs what plan() names;
  interpret: run a Pallas kernel in interpret mode (on a CPU).

  head_ids [H] int32: y[b,h] = x[b,h,:K] · w[head_ids[h]] instead, for w [E,K,N] of any E (a MoE
  layer's experts, chosen per token); the Pallas kernels read the chosen heads where they lie.
  x may then be [B,1,K']: one row that every head multiplies (a token's chosen experts), which
  the kernels read in place of H copies.

  w may be a tuple of weights of one kind, E and K (products of the same x, e.g. gate_proj and
  up_proj): y is then the tuple of their products, which the Pallas kernels compute in one
  launch (the other paths one product at a time)."""
  p = plan(x, w, impl=impl, lowering=lowering, tuning=tuning, interpret=interpret,
           head_ids=head_ids)
  if p.kernel in _KERNELS:
    return _KERNELS[p.kernel][0].batched_gemv(x, w, tuning=p.tuning, interpret=interpret,
                                              head_ids=head_ids)
  if isinstance(w, tuple):
    return tuple(batched_gemv(x, wt, impl=impl, lowering=lowering, tuning=tuning,
                              interpret=interpret, head_ids=head_ids) for wt in w)
  if head_ids is not None:
    w = jax.tree.map(lambda a: jnp.take(a, head_ids, axis=0), w)
    x = jnp.broadcast_to(x, _gathered_x(x, head_ids).shape)
  if p.kernel == "reference":
    return reference.batched_gemv(x[..., :w.shape[1]], w)
  return xla.batched_gemv(x[..., :w.shape[1]], w)


def _gathered_x(x, head_ids):
  """The shape and dtype (jax.ShapeDtypeStruct) of x [B,H,K'] or [B,1,K'] with a row for each
  of head_ids' H heads."""
  if len(x.shape) != 3:
    raise ValueError(f"x.shape={tuple(x.shape)}; expected [B,H,K'] or [B,1,K']")
  if len(head_ids.shape) != 1 or x.shape[1] not in (1, head_ids.shape[0]):
    raise ValueError(f"head_ids.shape={tuple(head_ids.shape)}; expected [H] with H the "
                     f"{x.shape[1]} heads of x (or any H where x has one head), one weight head "
                     "for each head")
  return jax.ShapeDtypeStruct((x.shape[0], head_ids.shape[0], x.shape[2]), x.dtype)


def _gathered_shape(x, w):
  """The [H,K,N] that w [E,K,N] gathered for x's H heads has (for check_gemv_args)."""
  if len(w.shape) != 3:
    raise ValueError(f"w.shape={tuple(w.shape)}; expected [E,K,N]")
  return jax.ShapeDtypeStruct((x.shape[1], *w.shape[1:]), w.dtype)
