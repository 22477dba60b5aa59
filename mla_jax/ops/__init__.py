"""Pure-function ops (no flax). Each op family is a package whose __init__ is its one dispatcher
on `impl` and can say what it runs (`plan`): decode/ (the split-KV attention) and gemv/ (the
batched GEMV). `reference` is the float32 oracle (ops/reference.py), `xla` the plain-einsum
baseline (ops/xla.py), merge_partials the split-KV merge (ops/merge.py); latent_update.py is the
absorbed decode step's one kernel between its projections and the attention; grouped.py the
grouped matmul (the MoE prefill's rows, sorted by expert, against their experts' weights);
top_k.py a MoE router's softmax and top k in one kernel.
"""

from __future__ import annotations

from mla_jax.ops import decode, gemv, reference, xla
from mla_jax.ops.common import DECODE_IMPLS, GEMV_IMPLS, Plan, resolve_impl
from mla_jax.ops.grouped import grouped_matmul
from mla_jax.ops.merge import merge_partials
from mla_jax.ops.top_k import softmax_top_k

__all__ = ["mla_decode", "merge_partials", "batched_gemv", "grouped_matmul", "softmax_top_k",
           "resolve_impl",
           "reference", "xla", "decode", "gemv", "Plan", "DECODE_IMPLS", "GEMV_IMPLS"]


def mla_decode(q_latent, q_rope, c_kv, k_rope, lengths, *, sm_scale: float, impl: str = "auto",
               wv_b=None, **kernel_options):
  """Absorbed MLA decode: out [B,H,C], lse [B,H] float32. See DESIGN.md for the contract.

  c_kv is a [B,S,C] array or a quant.Int8Rows; valid entries of row b are [0, lengths[b]).
  wv_b [H,C,V]: out is the heads out · wv_b[h] [B,H,V] instead (merged and projected in one
  kernel on the Pallas path). kernel_options are decode.mla_decode's: lowering=, tuning= and
  interpret=True (impl="pallas" on a CPU); decode.plan(...) says what runs.
  """
  return decode.mla_decode(q_latent, q_rope, c_kv, k_rope, lengths, sm_scale=sm_scale, impl=impl,
                           wv_b=wv_b, **kernel_options)


def batched_gemv(x, w, *, impl: str = "auto", **kernel_options):
  """y[b,h] = x[b,h,:K] · w[h]: x [B,H,K'] with K' >= K, w [H,K,N] array or quantized tensor ->
  [B,H,N]. Only the first K columns of x are used: pass the whole query [B,H,K+R] for q_nope
  and the Pallas kernels read them in place. kernel_options are gemv.batched_gemv's: lowering=,
  tuning= and interpret=True; gemv.plan(...) says what runs."""
  return gemv.batched_gemv(x, w, impl=impl, **kernel_options)
