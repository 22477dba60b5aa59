"""A MoE router's choice in one launch (Pallas, Triton lowering): the k largest of softmax(logits).

DeepSeek-V2's greedy routing (§2.2) keeps each token's k highest softmax scores over E experts.
XLA GPU runs the softmax as one kernel and lax.top_k as a sort of the E scores, another: at
V2-Lite's E=64, k=6, B=1 the sort alone took 2.8 µs a layer on an H100, longer than the router's
product. Here one program a token holds its E logits in registers, takes their softmax, and
picks the k largest by k rounds of a max and the lowest index that reaches it (lax.top_k's
order: descending, the lower index first among equal scores).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from mla_jax.ops.common import is_pow2


def unsupported(logits, k: int) -> str | None:
  """Why softmax_top_k cannot take these arguments (arrays or jax.ShapeDtypeStruct), or None."""
  if len(logits.shape) != 2 or not jnp.issubdtype(logits.dtype, jnp.floating):
    return f"logits: {tuple(logits.shape)} {logits.dtype}; expected [N, E] float"
  E = logits.shape[1]
  if not is_pow2(E):
    return f"logits.shape={tuple(logits.shape)}; expected E (the experts) a power of two"
  if not 1 <= k <= E:
    return f"k={k}; expected 1 <= k <= E={E}"
  return None


def softmax_top_k(logits, k: int, *, norm=None, interpret: bool = False):
  """logits [N, E] (E a power of two) -> (weights [N, k] float32, ids [N, k] int32): per row
  the k largest of softmax(logits) in float32 and their columns, as lax.top_k orders them.

  norm: None, or (sq_sum [N, 1], dim, eps) for an RMSNorm folded into the router's product
  (moe.MoE): each row's logits are divided by its rms, sqrt(sq_sum / dim + eps), in the kernel,
  from the sum of squares that XLA computes with the residual add; the rms itself, or the
  logits divided by it, would each be a kernel of XLA's own before this one.
  interpret: Pallas' interpret mode."""
  reason = unsupported(logits, k)
  sq_sum, dim, eps = norm if norm is not None else (None, 1, 0.0)
  if reason is None and sq_sum is not None and tuple(sq_sum.shape) != (logits.shape[0], 1):
    reason = f"sq_sum.shape={tuple(sq_sum.shape)}; expected [N, 1] with N={logits.shape[0]}"
  if reason is not None:
    raise ValueError(reason)
  return _launch(logits, sq_sum, k, dim, eps, interpret)


@functools.partial(jax.jit, static_argnames=("k", "dim", "eps", "interpret"))
def _launch(logits, sq_sum, k, dim, eps, interpret):
  N, E = logits.shape
  return pl.pallas_call(
      functools.partial(_kernel, E=E, k=k, dim=dim, eps=eps, folded=sq_sum is not None),
      out_shape=(jax.ShapeDtypeStruct((N, k), jnp.float32),
                 jax.ShapeDtypeStruct((N, k), jnp.int32)),
      grid=(N,),
      compiler_params=pltriton.CompilerParams(num_warps=1, num_stages=1),
      interpret=interpret,
      name="mla_softmax_top_k",
  )(logits, *(() if sq_sum is None else (sq_sum,)))


def _kernel(logits_ref, *refs, E, k, dim, eps, folded):
  # logits_ref [N, E], sq_sum_ref [N, 1] (folded); weights_ref [N, k] float32 and ids_ref
  # [N, k] int32, written a scalar at a time (a k-wide row is no power of two, which Triton's
  # tensors must be; a padded one would need slicing, a kernel of XLA's own before the GEMV
  # that reads the ids); one program a row
  sq_sum_ref, weights_ref, ids_ref = refs if folded else (None, *refs)
  row = pl.program_id(0)
  logits = logits_ref[row, :].astype(jnp.float32)  # [E]
  if folded:
    logits *= jax.lax.rsqrt(sq_sum_ref[row, 0].astype(jnp.float32) / dim + eps)
  exp = jnp.exp(logits - jnp.max(logits))
  scores = exp / jnp.sum(exp)
  columns = jnp.arange(E, dtype=jnp.int32)
  for r in range(k):
    best = jnp.max(scores)
    first = jnp.min(jnp.where(scores == best, columns, E))
    weights_ref[row, r] = best
    ids_ref[row, r] = first
    scores = jnp.where(columns == first, -1.0, scores)  # below every softmax score
