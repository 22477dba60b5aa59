"""The split-KV decode's merge of partials (FlashDecoding, Dao et al. 2023) as one small Pallas
kernel with the Triton lowering; ops/merge.py has the math.

Every split-KV kernel writes partials o_p [P, B, N, C] and lse_p [P, B, N]. A program merges, for
one sequence, block_n heads and block_c columns over all P pieces, walking P in steps of `chunk`:

  lse = logsumexp_p(lse_p),   out = Σ_p exp(lse_p − lse) · o_p,

a head whose pieces are all empty gives out = 0 and lse = -inf. Each caller picks the launch
(MergeLaunch) that suits its partials: the Triton decode one head and narrow column blocks per
program, the Mosaic decodes blocks of heads with 64 columns (a contiguous partial row).

merge_values merges and then applies the value up-projection wv_b [H,C,V] in the same kernel, a
program per (b, h, block of V): the absorbed decode step's merge and its wv_b GEMV as one launch.
A q8_0 or IQ4_NL wv_b is decoded there, 32-row GGML block by block, as the Triton GEMV decodes it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from mla_jax import quant
from mla_jax.ops.common import next_pow2
from mla_jax.ops.gemv import triton as gemv_triton
from mla_jax.ops.merge import merge_partials, project_values

MERGES = ("pallas", "xla")  # the merge kernel below, or ops.merge_partials
_VALUES_TILE = 16384  # partial values (and wv_b values) merge_values loads per step


@dataclasses.dataclass(frozen=True)
class MergeLaunch:
  """Grid of the merge: a program per (block_n of the first `heads` heads, block_c columns, b),
  `chunk` pieces per step; heads_outer puts the head blocks on the grid's first axis (else the
  column blocks). `name` is the kernel's name in profiles."""

  heads: int
  block_n: int
  block_c: int
  chunk: int
  heads_outer: bool
  name: str


def _merge_kernel(lse_parts_ref,  # [P, block_n]
                  o_parts_ref,    # [P, block_n, block_c]
                  out_ref,        # [block_n, block_c]
                  lse_ref,        # [block_n]
                  *, num_pieces: int, chunk: int):
  P_pad = next_pow2(num_pieces)
  lse_p = pltriton.load(lse_parts_ref.at[pl.ds(0, P_pad), :],
                        mask=(jnp.arange(P_pad) < num_pieces)[:, None], other=-jnp.inf)
  m = jnp.max(lse_p, axis=0)
  m = jnp.where(m > -jnp.inf, m, 0.0)
  l = jnp.sum(jnp.exp(lse_p - m[None, :]), axis=0)

  def body(i, acc):
    valid = i * chunk + jnp.arange(chunk) < num_pieces
    rows = pl.ds(i * chunk, chunk)
    w = jnp.exp(pltriton.load(lse_parts_ref.at[rows, :], mask=valid[:, None], other=-jnp.inf)
                - m[None, :])                                            # [chunk, block_n]
    o = pltriton.load(o_parts_ref.at[rows, :, :], mask=valid[:, None, None],
                      other=0.0).astype(jnp.float32)                     # [chunk, block_n, block_c]
    return acc + jnp.sum(w[:, :, None] * o, axis=0)

  acc = jax.lax.fori_loop(0, pl.cdiv(num_pieces, chunk), body,
                          jnp.zeros(o_parts_ref.shape[1:], jnp.float32))
  safe_l = jnp.where(l > 0, l, 1.0)
  out_ref[...] = (acc / safe_l[:, None]).astype(out_ref.dtype)
  lse_ref[...] = jnp.where(l > 0, m + jnp.log(safe_l), -jnp.inf)


def merge_pieces(o_parts, lse_parts, out_dtype, *, launch: MergeLaunch, interpret: bool = False):
  """Partials o_p [P, B, N, C] and lse_p [P, B, N] -> out [B, heads, C] in out_dtype and
  lse [B, heads] float32, for the first launch.heads heads."""
  P, B, _, C = o_parts.shape
  heads, block_n, block_c = launch.heads, launch.block_n, launch.block_c
  if launch.heads_outer:
    grid = (heads // block_n, C // block_c, B)
    index = lambda f: lambda n, c, b: f(n, c, b)
  else:
    grid = (C // block_c, heads // block_n, B)
    index = lambda f: lambda c, n, b: f(n, c, b)
  return pl.pallas_call(
      functools.partial(_merge_kernel, num_pieces=P, chunk=launch.chunk),
      grid=grid,
      in_specs=[pl.BlockSpec((P, None, block_n), index(lambda n, c, b: (0, b, n))),
                pl.BlockSpec((P, None, block_n, block_c), index(lambda n, c, b: (0, b, n, c)))],
      out_specs=[pl.BlockSpec((None, block_n, block_c), index(lambda n, c, b: (b, n, c))),
                 pl.BlockSpec((None, block_n), index(lambda n, c, b: (b, n)))],
      out_shape=[jax.ShapeDtypeStruct((B, heads, C), out_dtype),
                 jax.ShapeDtypeStruct((B, heads), jnp.float32)],
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret,
      name=launch.name,
  )(lse_parts, o_parts)


def merge_heads(o_parts, lse_parts, H: int, out_dtype, *, merge: str, launch: MergeLaunch,
                interpret: bool = False):
  """The first H heads of the merged partials: out [B, H, C] in out_dtype, lse [B, H]. merge:
  "pallas" (merge_pieces with `launch`) or "xla" (ops.merge_partials). A single piece is its
  own result (an empty one is o = 0, lse = -inf, as the merge would give): no merge runs, which
  saves a launch per layer at short caches."""
  if o_parts.shape[0] == 1:
    return o_parts[0, :, :H].astype(out_dtype), lse_parts[0, :, :H]
  if merge == "xla":
    out, lse = merge_partials(o_parts[:, :, :H].astype(jnp.float32), lse_parts[:, :, :H])
    return out.astype(out_dtype), lse
  out, lse = merge_pieces(o_parts, lse_parts, out_dtype, launch=launch, interpret=interpret)
  return out[:, :H], lse[:, :H]


def piece_weights(lse_parts_ref, b, h, num_pieces: int):
  """(m, l) for merging (b, h) over the pieces' lse_p [P, B, N]: m = max_p lse_p (0 if every
  piece is empty), l = Σ_p exp(lse_p − m) (0 then)."""
  P_pad = next_pow2(num_pieces)
  lse_p = pltriton.load(lse_parts_ref.at[pl.ds(0, P_pad), b, h],
                        mask=jnp.arange(P_pad) < num_pieces, other=-jnp.inf)
  m = jnp.max(lse_p)
  m = jnp.where(m > -jnp.inf, m, 0.0)
  return m, jnp.sum(jnp.exp(lse_p - m))


def merged_columns(lse_parts_ref, o_parts_ref, b, h, cols, m, *, num_pieces: int, chunk: int):
  """Σ_p exp(lse_p − m) · o_p[b, h, cols] in float32 (cols a pl.ds), over the pieces of
  o_parts [P, B, N, C] in steps of `chunk` pieces; m from piece_weights."""

  def pieces(i, merged):
    valid = i * chunk + jnp.arange(chunk) < num_pieces
    rows = pl.ds(i * chunk, chunk)
    w = jnp.exp(pltriton.load(lse_parts_ref.at[rows, b, h], mask=valid, other=-jnp.inf) - m)
    o = pltriton.load(o_parts_ref.at[rows, b, h, cols], mask=valid[:, None],
                      other=0.0).astype(jnp.float32)                     # [chunk, columns]
    return merged + jnp.sum(w[:, None] * o, axis=0)

  return jax.lax.fori_loop(0, pl.cdiv(num_pieces, chunk), pieces,
                           jnp.zeros((cols.size,), jnp.float32))


def _merge_values_kernel(lse_parts_ref,  # [P, B, N]
                         o_parts_ref,    # [P, B, N, C]
                         *refs,          # wv_b: wv_ref [H, C, V], or qs_ref and d_ref (wv_fmt);
                                         # then out_ref [B, H, V], or [splits, B, H, V] float32
                                         # partial sums, and lse_ref [B, H]
                         num_pieces: int, chunk: int, block_c: int, block_v: int,
                         splits: int, dtype, wv_fmt):
  *wv_refs, out_ref, lse_ref = refs
  b, h = pl.program_id(0), pl.program_id(1)
  value_blocks = wv_refs[-1].shape[-1] // block_v
  g, j = pl.program_id(2) // value_blocks, pl.program_id(2) % value_blocks  # piece of C, values
  piece = o_parts_ref.shape[-1] // splits
  values = pl.ds(pl.multiple_of(j * block_v, block_v), block_v)
  m, l = piece_weights(lse_parts_ref, b, h, num_pieces)
  safe_l = jnp.where(l > 0, l, 1.0)

  def column_block(k, acc):
    cols = pl.ds(pl.multiple_of(g * piece + k * block_c, block_c), block_c)
    merged = merged_columns(lse_parts_ref, o_parts_ref, b, h, cols, m, num_pieces=num_pieces,
                            chunk=chunk)
    # merge_heads' output rounding, then the product in float32 as ops.batched_gemv does
    merged = (merged / safe_l).astype(dtype).astype(jnp.float32)
    if wv_fmt is not None:
      return acc + _decoded_product(merged, wv_refs, h, g * piece + k * block_c, values,
                                    fmt=wv_fmt)
    return acc + jnp.sum(merged[:, None] * wv_refs[0][h, cols, values].astype(jnp.float32),
                         axis=0)

  acc = jax.lax.fori_loop(0, piece // block_c, column_block, jnp.zeros((block_v,), jnp.float32))
  if splits > 1:
    out_ref[g, b, h, values] = acc
  else:
    out_ref[b, h, values] = acc.astype(dtype)

  @pl.when(pl.program_id(2) == 0)
  def _():
    lse_ref[b, h] = jnp.where(l > 0, m + jnp.log(safe_l), -jnp.inf)


def _decoded_product(merged, wv_refs, h, first, values, *, fmt: str):
  """Σ_c merged[c] · wv_b[h, first + c, values] for a quantized wv_b (qs_ref, d_ref): merged
  [n] float32, n whole blocks of 32 rows; each row's decoded values times its block's scales,
  which are loaded once a row (a gather from the few scale rows) so that no [n, values] tile is
  reshaped. An IQ4_NL byte holds rows i and 16 + i of its block (quant.py): merged is split
  into each block's two halves by a masked sum over the pair axis (Triton slices no
  registers)."""
  qs_ref, d_ref = wv_refs
  n = merged.shape[0]
  if fmt == "q8_0":
    d = d_ref[h, first // quant.BLOCK + jnp.arange(n) // quant.BLOCK, values]  # [n, v]
    w = qs_ref[h, pl.ds(first, n), values].astype(jnp.float32)
    return jnp.sum(merged[:, None] * (w * d.astype(jnp.float32)), axis=0)
  half = quant.BLOCK // 2
  pairs = merged.reshape(n // quant.BLOCK, 2, half)
  lo, hi = (jnp.sum(jnp.where(jnp.arange(2)[None, :, None] == i, pairs, 0.0), axis=1)
            .reshape(n // 2) for i in (0, 1))  # rows i and 16 + i of each block
  d = d_ref[h, first // quant.BLOCK + jnp.arange(n // 2) // half, values].astype(jnp.float32)
  packed = qs_ref[h, pl.ds(first // 2, n // 2), values]  # [n / 2, v]
  return jnp.sum((lo[:, None] * gemv_triton.iq4_nl_values(packed & 0xF)
                  + hi[:, None] * gemv_triton.iq4_nl_values(packed >> 4)) * d, axis=0)


def _blocks(columns: int, V: int) -> tuple[int, int]:
  """(block_c, block_v) for a program's `columns` of C: it merges block_c columns at a time
  (the largest power of two dividing them, at most 512, so that a 512-wide latent row merges in
  one step) and projects them onto block_v values (the largest power of two dividing V: Triton's
  blocks are powers of two), with the [block_c, block_v] tile of wv_b within _VALUES_TILE. One
  pass over the columns keeps a program's loads off a chain of dependent steps. The merge is
  recomputed per value block; after the first, its partials come from L2. Timed alone on the
  H200 (C=512, V=128, H=16, bf16; docs/decode_step.md), 512 × 32 with 32 pieces a step was the
  fastest or within 0.4 µs of it at (P, B) = (132, 1), (16, 8) and (2, 1): 8.1, 5.8 and 2.9 µs,
  against 14.8, 9.2 and 7.6 µs for 64 columns a step and all 128 values a program."""
  block_c = min(columns & -columns, 512)
  return block_c, min(V & -V, _VALUES_TILE // block_c)


def column_splits(P: int, C: int, block: int = 1) -> int:
  """Pieces of C that merge_values gives programs of their own: 8 when P is more than the
  pieces one step of a whole-row program loads (32 at C=512) and C splits into 8 pieces of
  whole `block`s of columns (a quantized wv_b's 32-row blocks), else 1. Such a program walks P
  in dependent steps, and at B=1, H=16, V=128 there are only 64 of them (4 blocks of 32
  values a head); in 8 pieces of 64 columns the programs are 8 times as many and load up to
  256 partial rows a step. One small XLA fusion then sums the pieces' float32 products, ~1.2
  µs. Timed on an H100 (C=512, V=128, H=16, bf16, the sum included), 1 → 8 pieces: 11.2 → 5.8
  µs at (P, B) = (132, 1), 7.8 → 5.6 at (64, 1), 8.3 → 6.4 at (33, 4); 4.8 → 4.8 at (32, 1),
  7.3 → 7.1 at (16, 8) and 3.8 → 4.0 at (3, 1), where the extra launch costs more in the
  step (docs/decode_step.md)."""
  whole_row_step = _VALUES_TILE // _blocks(C, 1)[0]
  return 8 if P > whole_row_step and C % (8 * block) == 0 else 1


def merge_values(o_parts, lse_parts, wv_b, out_dtype, *, merge: str, interpret: bool = False,
                 splits: int | None = None):
  """Partials o_p [P, B, N, C] and lse_p [P, B, N] merged for the first H heads (wv_b [H,C,V],
  H <= N, a float array or a q8_0 or iq4_nl quant.QuantizedTensor), then projected: out [B,H,V]
  = merged o [B,H,C] (rounded to out_dtype) · wv_b[h], in out_dtype, and lse [B,H] float32.
  merge "pallas": one kernel, a program per (b, h, piece of C, block of V) walking its piece in
  column blocks and P in chunks; with splits > 1 pieces of C (column_splits if None) the
  pieces' float32 products are summed by XLA. "xla": ops.merge_partials and
  ops.project_values."""
  P, B, _, C = o_parts.shape
  H, _, V = wv_b.shape
  if merge == "xla":
    out, lse = merge_partials(o_parts[:, :, :H].astype(jnp.float32), lse_parts[:, :, :H])
    return project_values(out.astype(out_dtype), wv_b, out_dtype), lse
  wv_fmt = getattr(wv_b, "fmt", None)
  splits = column_splits(P, C, quant.BLOCK if wv_fmt else 1) if splits is None else splits
  if splits < 1 or C % splits:
    raise ValueError(f"splits={splits}; expected a divisor of C={C}")
  block_c, block_v = _blocks(C // splits, V)
  if wv_fmt is not None and block_c % quant.BLOCK:
    raise ValueError(f"C={C}, splits={splits}: a quantized wv_b needs pieces of C in whole "
                     f"{quant.BLOCK}-row blocks")
  chunk = min(next_pow2(P), max(1, _VALUES_TILE // block_c))
  out_shape = (splits, B, H, V) if splits > 1 else (B, H, V)
  out, lse = pl.pallas_call(
      functools.partial(_merge_values_kernel, num_pieces=P, chunk=chunk, block_c=block_c,
                        block_v=block_v, splits=splits, dtype=jnp.dtype(out_dtype),
                        wv_fmt=wv_fmt),
      grid=(B, H, splits * (V // block_v)),
      out_shape=[jax.ShapeDtypeStruct(out_shape, jnp.float32 if splits > 1 else out_dtype),
                 jax.ShapeDtypeStruct((B, H), jnp.float32)],
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret,
      name="mla_decode_merge_values",
  )(lse_parts, o_parts, *((wv_b.qs, wv_b.d) if wv_fmt else (wv_b,)))
  return (out.sum(axis=0).astype(out_dtype) if splits > 1 else out), lse
