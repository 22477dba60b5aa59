"""Absorbed MLA decode for XLA CPU: split-KV over cache shards, each shard's work as GEMMs.

FlashDecoding (Dao et al. 2023) splits along the cache instead of along the heads: every query
head reads the same latent cache (DeepSeek-V2 §2.1 absorption makes decode multi-query), so one
shard of S_p cache rows serves all H heads with GEMMs,

  scores [H,S_p] = q_latent [H,C]·c_kvᵀ [C,S_p] + q_rope [H,R]·k_ropeᵀ [R,S_p]
  o_p    [H,C]   = softmax(scores) [H,S_p]·c_kv [S_p,C],

and returns (o_p, lse_p); `ops.merge_partials` combines the shards. A loop visits the cache in
steps of several shards, `jax.vmap`-ed over the shards, so each step's batched GEMMs spread the
shards over the cores. A step first copies its rows into one buffer (XLA's dynamic-slice; the
int8→bfloat16 and float16→float32 casts fuse into that copy) that both products then read from
cache. Steps past the longest row are skipped (`lax.cond`): an empty tail of the cache is never
read. The last S mod W rows (W rows a step) are their whole shards, batched as one more span,
and a shard of the remaining rows, so no row is read twice: a module's cache is a little longer
than the prompt (max_len = prompt + new tokens), and a last step that slid back to stay inside
the cache re-read nearly a whole step (at S = 2080 with 2048 rows a step, twice the work). A
cache of fewer than W rows is one shard (`cut`).

What XLA CPU makes of it (jax 0.11): every dot is a YNNPACK fusion; the whole-cache einsum
(impl="xla") computes its value product [H,S]·[S,C] as one GEMM with a K=S reduction, which gets
slower per FLOP as S grows, while the per-shard GEMMs keep K = S_p. See docs/cpu_decode.md.

The score product's operand order follows the compute dtype (`rows_left`): XLA CPU's float32
GEMM is faster with the shard's rows as the left operand ([S_p,C]·[C,H], then transposed), its
bfloat16 GEMM with the queries there ([H,C]·[C,S_p]).

Sizes (ShardTuning, from `default_rows_per_step`, `default_shard_size` and
`default_shards_per_step`): a step's rows, counted as float32, fit in L3_FILL of the L3, so they
stay in cache between the two products; few large steps are faster than many small ones, since
each step's GEMMs end with the cores waiting for each other. Where the rows are the right operand
(bfloat16), a shard's working set (its rows plus its [H,S_p] scores and probabilities) fits in
L2_FILL of one core's L2; where they are the left one (float32), the step is one shard per core.

A quant.Int8Rows cache is cast to bfloat16 per step (exact: |q| <= 127) and its per-token scale
multiplies the scores and the probabilities, so no dequantized copy of the cache is ever made.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
from jax import lax

from mla_jax import quant
from mla_jax.ops.common import check_field, is_positive_int
from mla_jax.ops.merge import merge_partials

f32 = jnp.float32
MASK_VALUE = -jnp.inf

L2_FILL = 0.75  # share of one core's L2 that a shard's working set may take
L3_FILL = 0.3  # share of the shared L3 that one loop step's rows, as float32, may take
MIN_SHARD, MAX_SHARD = 64, 4096


def _cache_bytes(index: int, fallback: int) -> int:
  """Size of cache level `index` of cpu0 from sysfs (Linux: 2 is L2, 3 is L3), else fallback."""
  try:
    with open(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size", encoding="ascii") as f:
      text = f.read().strip()
    scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
    return int(text.rstrip("KM")) * scale
  except (OSError, ValueError):
    return fallback


L2_BYTES = _cache_bytes(2, 1 << 20)
L3_BYTES = _cache_bytes(3, 8 << 20)
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


@dataclasses.dataclass(frozen=True)
class ShardTuning:
  """How the cache is cut: shards of shard_size rows (S_p), shards_per_step of them per loop step.
  A cache of fewer than one step's rows runs as one shard of all its rows (`cut`)."""

  shard_size: int
  shards_per_step: int

  def __post_init__(self):
    check_field(self, "shard_size", is_positive_int(self.shard_size), "an integer >= 1")
    check_field(self, "shards_per_step", is_positive_int(self.shards_per_step), "an integer >= 1")


def compute_dtype(cache_dtype):
  """The dtype a shard's rows are cast to: YNNPACK has bfloat16 and float32 GEMMs, not int8 ×
  bfloat16 or float16 ones."""
  cache_dtype = jnp.dtype(cache_dtype)
  if cache_dtype == jnp.int8:
    return jnp.dtype(jnp.bfloat16)
  if cache_dtype == jnp.float16:
    return jnp.dtype(f32)
  return cache_dtype


def _pow2_floor(x: float) -> int:
  return 1 << max(0, int(x).bit_length() - 1)


def rows_left(dtype) -> bool:
  """Whether a shard's score product takes its cache rows as the left operand, [S_p,C]·[C,H]
  (then transposed), rather than the queries, [H,C]·[C,S_p]. Measured on XLA CPU's YNNPACK
  GEMMs (jax 0.11, AVX-512 BF16; docs/cpu_decode.md): float32 runs the rows-left form 1.3–2×
  faster, bfloat16 is as fast or faster with the queries on the left."""
  return jnp.dtype(dtype) == f32


@functools.lru_cache(maxsize=None)
def default_rows_per_step(kv_lora_rank: int, rope_dim: int) -> int:
  """Largest power of two W with W float32 rows (c_kv and k_rope) within L3_FILL of the L3: 4096
  on a 32 MiB L3. Measured there (S = 16384): float32 steps of 2048, 4096 and 8192 rows took
  5.8, 5.0 and 6.2 ms; bfloat16 ones of 4096 and 8192 rows were even, and the larger lost under
  load from other jobs, so bfloat16 steps have the same rows (half the bytes)."""
  row = (kv_lora_rank + rope_dim) * jnp.dtype(f32).itemsize
  return max(MIN_SHARD * CORES, _pow2_floor(L3_FILL * L3_BYTES / row))


@functools.lru_cache(maxsize=None)
def default_shard_size(num_heads: int, kv_lora_rank: int, rope_dim: int, cache_dtype) -> int:
  """Rows of one shard, S_p (a power of two).

  Rows on the left of the score product (float32 and float16 caches): a step's rows over the
  cores, one shard per core (2048 rows on 2 cores; measured 2.40 ms at S = 8224 against 2.58 for
  1024-row and 2.55 for 512-row shards). Rows on the right (bfloat16 and int8 caches): the
  largest S_p whose working set fits in L2_FILL of one core's L2, a row's working set being its
  c_kv and k_rope in the compute dtype plus H float32 scores, H float32 and H compute-dtype
  probabilities: 512 rows on a 1 MiB L2.
  """
  dtype = compute_dtype(cache_dtype)
  if rows_left(dtype):
    shard = _pow2_floor(default_rows_per_step(kv_lora_rank, rope_dim) / CORES)
  else:
    row = (kv_lora_rank + rope_dim) * dtype.itemsize + num_heads * (4 + 4 + dtype.itemsize)
    shard = _pow2_floor(L2_FILL * L2_BYTES / row)
  return max(MIN_SHARD, min(MAX_SHARD, shard))


def default_shards_per_step(shard_size: int, kv_lora_rank: int, rope_dim: int) -> int:
  """Shards a step: default_rows_per_step over shard_size, and at least one per core."""
  return max(CORES, default_rows_per_step(kv_lora_rank, rope_dim) // shard_size)


def choose_tuning(H: int, C: int, R: int, cache_dtype) -> ShardTuning:
  """The cache-aware sizes: default_shard_size, then default_shards_per_step."""
  shard_size = default_shard_size(H, C, R, jnp.dtype(cache_dtype))
  return ShardTuning(shard_size, default_shards_per_step(shard_size, C, R))


def _dot(a, b, contract_a, contract_b):
  return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                         preferred_element_type=f32)


def score_product(q_HK, rows_SK):
  """q·rowsᵀ [H,S_p] float32, with the operand order that `rows_left` picks for the dtype."""
  if rows_left(rows_SK.dtype):
    return _dot(rows_SK, q_HK, 1, 1).T
  return _dot(q_HK, rows_SK, 1, 1)


def _shard(q_latent_HC, rope_HS, c_kv_SC, scale_S, lo, hi, *, sm_scale, stale_rows, rows_copied):
  """One shard's partial softmax: rows j with lo <= j < hi are visible.

  rope_HS: the shard's rope scores q_rope·k_ropeᵀ [H,S_p] float32. scale_S is the int8 cache's
  per-row scale or None. stale_rows: whether rows past hi may be
  in the shard; they may hold anything, NaN included, and 0·NaN is NaN, so their c_kv is then
  zeroed before the value product (a pass over the rows, hence only where needed).
  rows_copied: whether c_kv_SC is a copy of the cache's rows (a step's slice, or a cast); the
  score product then reads the zeroed rows too (their scores are masked anyway), so that XLA
  fuses the select into the one copy instead of making a second. A shard of the whole uncast
  cache reads it as it lies for the scores, as the einsum does. Returns o_p [H,C] float32
  (normalised within the shard) and lse_p [H] float32; a shard with no visible row gives
  o_p = 0, lse_p = -inf.
  """
  j = jnp.arange(c_kv_SC.shape[0])
  visible = (j >= lo) & (j < hi)
  values = jnp.where(visible[:, None], c_kv_SC, 0) if stale_rows else c_kv_SC
  scores = score_product(q_latent_HC, values if rows_copied else c_kv_SC)  # [H,S_p]
  if scale_S is not None:
    scores = scores * scale_S[None, :]
  scores = (scores + rope_HS) * sm_scale
  scores = jnp.where(visible[None, :], scores, MASK_VALUE)
  m = jnp.max(scores, axis=1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(scores - m)  # masked rows: exp(-inf) = 0
  l = jnp.sum(p, axis=1, keepdims=True)
  if scale_S is not None:
    p = p * (jnp.where(visible, scale_S, 0) if stale_rows else scale_S)[None, :]
  o = _dot(p.astype(values.dtype), values, 1, 0)  # [H,C]
  nonempty = l > 0
  l_safe = jnp.where(nonempty, l, 1.0)
  return o / l_safe, jnp.where(nonempty, m + jnp.log(l_safe), MASK_VALUE)[:, 0]


def cut(S: int, tuning: ShardTuning) -> tuple[int, int, int]:
  """How S cache rows are visited: (steps, tail_shards, rest) with S = steps·W +
  tail_shards·shard_size + rest, W = shard_size·shards_per_step rows a step. The loop runs `steps`
  steps, one more batched span takes the tail's whole shards, and the last `rest` rows are a
  shard of their own, so no row is read twice and no shard is padded.

  A cache of fewer than one step's rows is one shard, (0, 0, S). Measured with W = 4096 and a
  module's cache (max_len = prompt + 32, the rows' ends in its last slots), one step, the tail
  and the merge against one shard: float32 1.46 vs 1.66 ms at S = 4128 and 2.61 vs 3.35 ms at
  S = 8160; bfloat16 0.82 vs 0.77 ms at S = 4128, 1.30 vs 1.38 at 6176 and 1.70 vs 1.95 at 8160.
  """
  W = tuning.shard_size * tuning.shards_per_step
  if S < W:
    return 0, 0, S
  steps, tail = divmod(S, W)
  return (steps, *divmod(tail, tuning.shard_size))


@functools.partial(jax.jit, static_argnames=("sm_scale", "tuning"))
def mla_decode(q_latent, q_rope, c_kv, k_rope, lengths, *, sm_scale: float, tuning: ShardTuning):
  """Absorbed MLA decode over cache shards: out [B,H,C] in q_latent.dtype, lse [B,H] float32.

  q_latent [B,H,C], q_rope [B,H,R], c_kv [B,S,C] (bfloat16, float16, float32 or quant.Int8Rows),
  k_rope [B,S,R], lengths [B].
  """
  B, H, C = q_latent.shape
  S = k_rope.shape[1]
  if isinstance(c_kv, quant.Int8Rows):
    values, scales = c_kv.values, c_kv.scales
  else:
    values, scales = c_kv, None
  dtype = compute_dtype(values.dtype)
  lengths = jnp.minimum(lengths.astype(jnp.int32), S)
  shard_size = tuning.shard_size
  steps, tail_shards, rest = cut(S, tuning)
  W = shard_size * tuning.shards_per_step
  in_scale = None if scales is None else 0

  def span(start, rows, shards):
    """Partials of cache rows [start, start + rows) in `shards` equal shards: [B,shards,H,C],
    [B,shards,H]. Rows past a row's length are zeroed only where the span holds some (at most
    one step a row: lax.cond runs one branch)."""
    all_valid = start + rows <= jnp.min(lengths)
    return lax.cond(all_valid, lambda: shards_of(start, rows, shards, stale_rows=False),
                    lambda: shards_of(start, rows, shards, stale_rows=True))

  def shards_of(start, rows, shards, *, stale_rows):
    shard = functools.partial(_shard, sm_scale=sm_scale, stale_rows=stale_rows,
                              rows_copied=rows < S or dtype != values.dtype)
    over_shards = jax.vmap(shard, (0, 0, 0, in_scale, 0, 0))
    over_batch = jax.vmap(over_shards, (0, 0, 0, in_scale, None, 0))

    def span_of(x):
      return x if rows == S else lax.dynamic_slice_in_dim(x, start, rows, axis=1)

    def rows_of(x):
      return span_of(x).reshape((B, shards, rows // shards) + x.shape[2:])

    # The rope scores of the whole span in one R-wide product, then cut into the shards: one
    # product per shard cost more (a module's cache at S = 8224: float32 2.49-2.63 vs 2.58-2.76
    # ms, bf16 1.70-1.79 vs 1.74-1.85; 4096 tokens in 65536 bf16 slots 1.23-1.67 vs 1.51-2.22).
    rope = jax.vmap(score_product)(q_rope.astype(dtype), span_of(k_rope).astype(dtype))
    rope = jnp.swapaxes(rope.reshape(B, H, shards, rows // shards), 1, 2)  # [B,shards,H,S_p]
    # The queries are copied per shard: with an unbatched q, XLA folds the shards into one wide
    # score GEMM and transposes the whole step's c_kv for it.
    q = jnp.broadcast_to(q_latent.astype(dtype)[:, None], (B, shards, H, C))
    first = start + jnp.arange(shards) * (rows // shards)  # cache row of each shard's row 0
    return over_batch(q, rope, rows_of(values).astype(dtype),
                      None if scales is None else rows_of(scales),
                      jnp.zeros((shards,), jnp.int32), lengths[:, None] - first[None, :])

  if not steps:  # one shard, its stale rows zeroed as the einsum does: its partial is the result
    o, lse = shards_of(0, S, 1, stale_rows=True)
    return o[:, 0].astype(q_latent.dtype), lse[:, 0]
  longest = jnp.max(lengths)

  def unless_empty(start, rows, shards):
    """span(start, rows, shards) as [shards,B,H,C], [shards,B,H]; spans past the longest row
    are not read (o_p = 0, lse_p = -inf)."""
    empty = lambda: (jnp.zeros((B, shards, H, C), f32), jnp.full((B, shards, H), MASK_VALUE, f32))
    o, lse = lax.cond(start < longest, lambda: span(start, rows, shards), empty)
    return jnp.moveaxis(o, 1, 0), jnp.moveaxis(lse, 1, 0)

  g = tuning.shards_per_step
  o, lse = lax.map(lambda i: unless_empty(i * W, W, g), jnp.arange(steps))  # [steps,g,B,H,...]
  pieces = [(o.reshape(steps * g, B, H, C), lse.reshape(steps * g, B, H))]
  if tail_shards:
    pieces.append(unless_empty(steps * W, tail_shards * shard_size, tail_shards))
  if rest:
    pieces.append(unless_empty(S - rest, rest, 1))
  out, lse = merge_partials(jnp.concatenate([o for o, _ in pieces]),
                            jnp.concatenate([lse for _, lse in pieces]))
  return out.astype(q_latent.dtype), lse
