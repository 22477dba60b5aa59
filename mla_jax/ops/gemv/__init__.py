"""The batched GEMV family, y[b,h] = x[b,h,:K] · w[h] (the absorbed decode's two products): this
module is its one dispatcher. `plan` names the kernel and tuning that `batched_gemv` runs:

  impl "reference" | "xla"  ops/reference.py, ops/xla.py
  impl "pallas"             lowering "triton" (triton.py, the default) or "mosaic" (mosaic.py)

The Mosaic kernel takes less GPU time at every benchmark shape, but timed as a standalone call
XLA launched it outside its CUDA graphs, at 2-5 µs of host time per call: more than it saves
where the step is launch-bound, as small-batch decoding is (docs/batched_gemv.md). So Triton is
the default, with one exception that the whole model's decode step measured: a MoE layer's
chosen quantized experts (head_ids) on a Hopper GPU run on Mosaic where its kernel takes them,
whose A operands come from registers for both formats (`default_lowering`).
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
  for wt in weights:
    check_gemv_args(x, wt if head_ids is None else _gathered_shape(x, wt, head_ids))
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
  """The kernel of lowering=None: "mosaic" for a MoE layer's chosen experts (head_ids) with
  quantized weights on a Hopper GPU, compiled, where that kernel takes them; else "triton".

  A 4-layer V2-Lite model (a dense layer and 3 MoE layers, absorbed, B=1, tg64@pp128) on an H100,
  two runs of each, µs of GPU kernels a token and t/s: q8_0 607.1 / 609.0 µs, 1536 / 1552 t/s
  on Triton against 553.9 / 557.1 µs, 1595 / 1576 t/s on Mosaic; iq4_nl 495.3 / 495.4 µs, 1845 /
  1898 t/s against 487.8 / 481.8 µs, 1887 / 1907 t/s. Timed alone at 6 of 64 experts, Mosaic
  took 15.7 µs against 28.7 for q8_0's gate and up products (2048 -> 2 x 1408) and 16.4
  against 20.5 for iq4_nl's (docs/batched_gemv.md). The wall clock gained less than the kernels:
  in the whole 27-layer model the IQ4_NL token took 118 µs less of kernels and the same wall
  time, its Mosaic launches adding gaps (docs/model_decode.md). Measured at one token (6 heads);
  several tokens' experts (N·k heads) take the same path unmeasured. Linears (one head) keep
  Triton's split-K."""
  quantized = isinstance(weights[0], quant.QuantizedTensor)
  if (head_ids is not None and quantized and not interpret and device.is_hopper()
      and all(mosaic.unsupported(x, wt) is None for wt in weights)):
    return "mosaic"
  return "triton"


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
  if p.kernel == "reference":
    return reference.batched_gemv(x[..., :w.shape[1]], w)
  return xla.batched_gemv(x[..., :w.shape[1]], w)


def _gathered_shape(x, w, head_ids):
  """The [H,K,N] that w [E,K,N] gathered at head_ids [H] has (for check_gemv_args)."""
  if len(head_ids.shape) != 1 or head_ids.shape[0] != x.shape[1]:
    raise ValueError(f"head_ids.shape={tuple(head_ids.shape)}; expected [H={x.shape[1]}], "
                     "one weight head for each head of x")
  if len(w.shape) != 3:
    raise ValueError(f"w.shape={tuple(w.shape)}; expected [E,K,N]")
  return jax.ShapeDtypeStruct((x.shape[1], *w.shape[1:]), w.dtype)
