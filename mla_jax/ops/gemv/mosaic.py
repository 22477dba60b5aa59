"""Fused batched GEMV on Hopper: Pallas with the Mosaic GPU lowering (TMA + wgmma).

Same product as ops/gemv/triton.py, y[b,h] = x[b,h,:K] · w[h] for all heads and batch rows in one
launch, laid out for the tensor cores' warpgroup MMA, whose M is at least 64. The batch (1-64
rows) cannot fill M, so the product is swapped (the "swap AB" of small-batch GEMMs): a
64-column slice of the weights is the M operand and the batch rows are N,

  yᵀ[n, b] = Σ_k w[k, n] · x[b, k]  =  (w-slice)ᵀ [64, K] · xᵀ [K, Bp],

Bp = B rounded up to a power of two >= 8 (wgmma's N). Rows past B are never read from or written
to memory: TMA fills out-of-bounds rows of x with zeros and drops those of y (which needs B <= 8
or a multiple of 8: TMA's row tiles).

A program owns one head, 64 output columns and Bp batch rows; its contraction is split between
`warpgroups` warpgroups (split-K inside the program: more loads in flight and more arithmetic
in parallel where the grid is small), whose partial sums meet in shared memory at the end. Each
warpgroup streams its weights in chunks of 64 contraction rows (two GGML blocks) through its
own ring of `stages` shared-memory slots: TMA loads chunk c + stages as soon as chunk c's
products are done. With quantized weights K may also be split across programs (`split_k`, for a
grid too small to fill the SMs, a Linear's one head): each piece is a head of its own, and XLA
adds the pieces' float32 partial products. x arrives with each chunk, one [Bp, 32] tile per
GGML block (the operand layout that lets a block's product be scaled on its own).

Quantized weights (quant.QuantizedTensor) never reach HBM as floats. Each chunk is decoded
exactly to the activation dtype, each block's product goes to its own accumulator, and is scaled
by the block's float16 d per output column before it is added: y = Σ_blocks d_kb · (q_kb · x_kb).
- q8_0: each block goes from the int8 tile straight into wgmma's A operand registers
  (ops/mosaic/q8_0_registers.py: a transposing ldmatrix, then integer and packed-float ops),
  not through shared memory. Its rows come in a permuted column order, which the block scales
  and the output tile follow.
- iq4_nl: the same transposing load of the packed bytes, then byte permutes look the 4-bit
  indices up in the table straight into the A operand registers, one K=16 product per half
  block (ops/mosaic/iq4_nl_registers.py), rows in the same order. A chunk is 128 rows (4
  blocks), so that its packed bytes fill a [64, 64] tile; x arrives in [Bp, 16] half-block
  tiles.

Every tile is read in place: x from any [B, H, K'] array with K' >= K (the whole query), the
weights as stored, a MoE layer's chosen experts where they lie (head_ids: head h's program
reads weight head head_ids[h]). Several weights of one kind (gate_proj and up_proj) share one
launch: their column tiles follow each other along the grid, and each program fetches from and
stores to its own weight's arrays.

The Triton kernel (ops/gemv/triton.py) stays the default and the portable path, and serves what
this one does not (see unsupported()); ops.gemv's dispatcher runs this one with
lowering="mosaic", and by default on a Hopper GPU for a MoE layer's quantized experts, one row
through a q8_0 Linear, and an IQ4_NL one as wide as lm_head (ops.gemv.default_lowering, which
says why).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from mla_jax import quant
from mla_jax.ops.common import (check_field, check_same_kind, clamped_head_ids, is_positive_int,
                                next_pow2)
from mla_jax.ops.mosaic import iq4_nl_registers, q8_0_registers
from mla_jax.ops.mosaic.common import accumulate, interpret_params, smem, wait_for_inputs

BLOCK = quant.BLOCK
_TN = 64       # output columns per program: the wgmma M
_TK = 2 * BLOCK  # contraction rows per chunk (iq4_nl: 2 * _TK)
STAGES = 4     # chunks in flight per warpgroup
_MAX_BLOCK_B = 64
_SWIZZLE = 64  # bytes: of the weight and output tiles (and of x's [Bp, 32] 16-bit block tiles)


@dataclasses.dataclass(frozen=True)
class MosaicGemvTuning:
  """Pipelining and split-K of the Mosaic GEMV."""

  stages: int = STAGES  # chunks in flight per warpgroup (at most its chunks)
  warpgroups: int = 1   # warpgroups that split a program's contraction (must divide its chunks)
  split_k: int = 1      # pieces of K, each its own programs (quantized weights; see _split_k)

  def __post_init__(self):
    check_field(self, "stages", is_positive_int(self.stages), "an integer >= 1")
    check_field(self, "warpgroups", is_positive_int(self.warpgroups), "an integer >= 1")
    check_field(self, "split_k", is_positive_int(self.split_k), "an integer >= 1")


def block_rows(B: int) -> int:
  """Batch rows per program: B rounded up to a power of two, at least wgmma's N of 8."""
  return min(max(8, next_pow2(B)), _MAX_BLOCK_B)


def choose_warpgroups(programs: int, chunks: int, Bp: int, quantized: bool, num_sms: int) -> int:
  """Warpgroups that split a program's `chunks` (H200 sweeps, docs/batched_gemv.md). Two:
  - from 4 chunks up where the grid has fewer programs than SMs (H=16, K=512: bf16 2.8 vs 3.5
    µs, q8_0 3.9 vs 4.6, iq4_nl's 4 chunks 3.4-3.8 vs 3.6-4.4);
  - from 8 chunks up for a quantized conversion at a few batch rows (H=128, K=512, q8_0's 8
    chunks: 4.9 vs 5.3 µs at B=1, 5.3 vs 5.5 at B=8; iq4_nl's 4 chunks ran faster on one
    warpgroup, 5.6-5.7 vs 6.0 at B=1 in three runs).
  Elsewhere one: the second warpgroup's tiles and partial sums halve the programs an SM holds
  (H=128, K=512, B=64: 11.2-11.5 vs 8.5-9.4 µs); at K=128 one chunk each was slower."""
  few_programs = programs < num_sms and chunks >= 4
  conversion = quantized and Bp <= 8 and chunks >= 8
  return 2 if chunks % 2 == 0 and (few_programs or conversion) else 1


def _chunk_rows(fmt: str | None) -> int:
  """Contraction rows per chunk: iq4_nl's packed bytes fill a 64-row tile at 128 rows."""
  return 2 * _TK if fmt == "iq4_nl" else _TK


def _x_width(fmt: str | None) -> int:
  """Columns of x per tile: a GGML block, or half of one for iq4_nl's nibble halves."""
  return BLOCK // 2 if fmt == "iq4_nl" else BLOCK


def unsupported(x, w) -> str | None:
  """Why this kernel cannot take these arguments, or None if it can."""
  K, N = w.shape[1:]
  dtype = jnp.dtype(x.dtype)
  if dtype not in (jnp.bfloat16, jnp.float16):
    return f"x.dtype={x.dtype}: the wgmma operands must be bfloat16 or float16"
  fmt = getattr(w, "fmt", None)
  if fmt is None and jnp.dtype(w.dtype) != dtype:
    return f"w.dtype={w.dtype}, x.dtype={x.dtype}: a float w must have x's dtype"
  if K % _chunk_rows(fmt) or N % _TN:
    return (f"w.shape={tuple(w.shape)}: K must be a multiple of {_chunk_rows(fmt)} and N of "
            f"{_TN}")
  B, _, Kx = x.shape
  if Kx % _x_width(fmt):
    return (f"x.shape={tuple(x.shape)}: x's row length must be a multiple of {_x_width(fmt)} "
            "(x's TMA tiles)")
  if B > 8 and B % 8:
    return f"x.shape={tuple(x.shape)}: B must be at most 8 or a multiple of 8 (TMA row tiles)"
  return None


def choose_split(programs: int, chunks: int, num_sms: int) -> int:
  """Pieces of K for a grid of `programs` over `chunks` chunks each: up to 4 (the largest count
  that divides the chunks) where the grid fills less than half the SMs, else 1. H100, one row,
  q8_0, GPU µs of a call with the partials' sum: q_proj with kv_a_proj_with_mqa (2048 -> 3648,
  57 programs) 8.5 at one piece, 7.9 at 2, 7.6 at 4, 7.5-7.8 at 8 and 16; o_proj (2048 -> 2048,
  32 programs) 8.3, 7.3, 6.1, 6.1-6.2; the shared experts' gate_proj with up_proj (2048 -> 2 x
  2816, 88 programs) 9.1 at one piece, 10.3-11.2 at 2-16 (docs/batched_gemv.md)."""
  if programs >= num_sms // 2:
    return 1
  return max(g for g in (1, 2, 4) if chunks % g == 0)


def choose_tuning(B: int, H: int, K: int, N: int, fmt: str | None, *,
                  num_sms: int) -> MosaicGemvTuning:
  """STAGES chunks in flight; for quantized weights choose_split, then choose_warpgroups for the
  grid of these shapes."""
  Bp = block_rows(B)
  programs = H * (N // _TN) * pl.cdiv(B, Bp)
  chunks = K // _chunk_rows(fmt)
  split_k = choose_split(programs, chunks, num_sms) if fmt else 1
  return MosaicGemvTuning(split_k=split_k,
                          warpgroups=choose_warpgroups(programs * split_k, chunks // split_k, Bp,
                                                       bool(fmt), num_sms))


class _Scratch(NamedTuple):
  x_smem: Any           # [W, stages, tk / xw, Bp, xw] x tiles of each chunk
  w_smem: Any = None    # [W, stages, tk, TN] float weights (None for quantized ones)
  qs_smem: Any = None   # [W, stages, rows stored per chunk, TN] quantized values
  d_smem: Any = None    # [W, stages, blocks, TN] float16 block scales
  conv_smem: Any = None  # interpret mode's A operands: q8_0 [W, blocks, TN, 32], iq4_nl
                         # [W, blocks / 2, 4, TN, 16] (iq4_nl_registers.a_operands)
  y_smem: Any = None    # [Bp, TN] the output tile
  bars: Any = None      # [W·stages]: a chunk's copies landed
  red_smem: Any = None  # [W - 1, TN, Bp] float32 split-K partial sums (W > 1)
  red_bar: Any = None   # the partial sums written (W > 1)


@functools.partial(jax.jit, static_argnames=("tuning", "interpret"))
def batched_gemv(x, w, *, tuning: MosaicGemvTuning, interpret: bool = False, head_ids=None):
  """y [B,H,N] = x[..., :K] · w per head, in x's dtype; arguments as ops.batched_gemv (see
  unsupported() for what this kernel takes). w may be a tuple of weights of one kind, E and K:
  their column tiles share the launch's grid, and y is the tuple of their products. head_ids [H]
  int32: head h reads w[head_ids[h]] of w [E, K, N] (ids outside [0, E) are clamped), and x
  may be [B, 1, K']: one row that every head multiplies.
  `interpret`: run in Mosaic GPU's interpret mode (on a CPU)."""
  weights = w if isinstance(w, tuple) else (w,)
  check_same_kind(weights)
  ys = (_launch(x, weights, tuning, interpret, head_ids) if tuning.split_k == 1
        else _split_k(x, weights, tuning, interpret, head_ids))
  return ys if isinstance(w, tuple) else ys[0]


def _split_k(x, weights, tuning, interpret, head_ids):
  """Split-K across programs (as in GEMM libraries): piece g of K of head h becomes head h·G + g
  of its own, x [B, H·G, K/G] times w [E·G, K/G, N]; both are free reshapes (of x's first K
  columns, a copy where x is wider), since GGML's blocks run along K. The kernel writes float32
  partial products [B, H·G, N], which one XLA reduction adds. With one head (a Linear's
  weight) the grid of N / 64 programs alone fills few SMs, each walking all of K."""
  G = tuning.split_k
  E, K, _ = weights[0].shape
  if head_ids is not None:  # head h·G + g reads piece g of x's row h: one row each
    x = jnp.broadcast_to(x, (x.shape[0], head_ids.shape[0], x.shape[2]))
  B, H, _ = x.shape
  fmt = getattr(weights[0], "fmt", None)
  if fmt is None or K % (G * _chunk_rows(fmt)):
    raise ValueError(f"split_k={G}: needs quantized weights whose K={K} splits into {G} pieces "
                     f"of whole {_chunk_rows(fmt)}-row chunks")
  xs = x[..., :K].reshape(B, H * G, K // G)
  ws = tuple(jax.tree.map(lambda a: a.reshape(E * G, a.shape[1] // G, a.shape[2]), wt)
             for wt in weights)
  ids = None
  if head_ids is not None:
    ids = (clamped_head_ids(head_ids, E)[:, None] * G
           + jnp.arange(G, dtype=jnp.int32)).reshape(H * G)
  parts = _launch(xs, ws, dataclasses.replace(tuning, split_k=1), interpret, ids,
                  out_dtype=jnp.float32)
  return tuple(p.reshape(B, H, G, -1).sum(axis=2).astype(x.dtype) for p in parts)


def _launch(x, weights, tuning, interpret, head_ids, out_dtype=None):
  """The products of x with each of `weights` in one Mosaic GPU kernel: a tuple of [B,H,N_t] in
  out_dtype (float32 for quantized weights only; None: x's dtype)."""
  B, H = x.shape[0], x.shape[1] if head_ids is None else head_ids.shape[0]
  E, K, _ = weights[0].shape
  widths = [wt.shape[2] for wt in weights]
  dtype, Bp = x.dtype, block_rows(B)
  out_dtype = out_dtype or dtype
  fmt = getattr(weights[0], "fmt", None)
  tk = _chunk_rows(fmt)
  xw = _x_width(fmt)
  blocks = tk // BLOCK  # GGML blocks per chunk
  chunks = K // tk
  W = tuning.warpgroups
  if chunks % W:
    raise ValueError(f"warpgroups={W}: must divide the {chunks} chunks of {tk} rows of K={K}")
  per_wg = chunks // W
  stages = min(tuning.stages, per_wg)
  arity = 2 if fmt else 1  # arrays a weight is made of
  firsts = np.cumsum([0] + [n // _TN for n in widths])  # weight t: column tiles [firsts[t], ..)

  gathered = head_ids is not None
  shared_x = x.shape[1] != H  # one row of x for every head (gathered only)

  def kernel(*refs,  # gathered only: ids_ref [H] int32, the weight head of each x head; then
                     # x_ref [B, H, K'] (or [B, 1, K'] gathered: one row for every head); per
                     # weight t: w_ref [E, K, N_t], or qs_ref and d_ref
                     # (quant.QuantizedTensor); then per weight t, y_ref [B, H, N_t]
             scratch: _Scratch):
    wait_for_inputs(interpret)
    ids_ref, (x_ref, *refs) = (refs[0], refs[1:]) if gathered else (None, refs)
    w_refs, y_refs = refs[:arity * len(widths)], refs[arity * len(widths):]
    x_smem, qs_smem, d_smem, conv_smem = (scratch.x_smem, scratch.qs_smem, scratch.d_smem,
                                          scratch.conv_smem)
    h, j, i = lax.axis_index("h"), lax.axis_index("n"), lax.axis_index("b")
    e = jnp.clip(ids_ref[h], 0, E - 1) if gathered else h  # a bad id reads no foreign memory
    xh = 0 if shared_x else h
    wg = lax.axis_index("wg")
    rows = pl.ds(i * Bp, Bp)
    first = wg * per_wg  # this warpgroup's chunks: [first, first + per_wg)

    def for_weight(body):
      """body(t, refs of weight t, its column tiles) for the weight this program's tiles are
      in: a branch per weight, one of which runs."""
      for t in range(len(widths)):
        cols = pl.ds((j - firsts[t]) * _TN, _TN)
        run = functools.partial(body, t, w_refs[t * arity:(t + 1) * arity], cols)
        if len(widths) == 1:
          run()
        else:
          pl.when((j >= firsts[t]) & (j < firsts[t + 1]))(run)

    def fetch(c, slot):
      bar = scratch.bars.at[wg * stages + slot]
      for piece in range(tk // xw):
        plgpu.copy_gmem_to_smem(x_ref.at[rows, xh, pl.ds(c * tk + piece * xw, xw)],
                                x_smem.at[wg, slot, piece], bar)

      def weight(t, refs, cols):
        del t
        if fmt:
          packed = qs_smem.shape[2]  # stored rows per chunk (iq4_nl: two weights a byte)
          plgpu.copy_gmem_to_smem(refs[0].at[e, pl.ds(c * packed, packed), cols],
                                  qs_smem.at[wg, slot], bar)
          plgpu.copy_gmem_to_smem(refs[1].at[e, pl.ds(blocks * c, blocks), cols],
                                  d_smem.at[wg, slot], bar)
        else:
          plgpu.copy_gmem_to_smem(refs[0].at[e, pl.ds(c * tk, tk), cols],
                                  scratch.w_smem.at[wg, slot], bar)

      for_weight(weight)

    def dense_step(slot, acc):
      def products(acc_ref):
        for kb in range(blocks):
          plgpu.wgmma(acc_ref, scratch.w_smem.at[wg, slot, pl.ds(kb * BLOCK, BLOCK)].T,
                      x_smem.at[wg, slot, kb].T)
      return accumulate(acc, products, interpret)

    def decode(slot):
      """The chunk's weights decoded into registers, rows in q8_0_registers.COLUMNS' order;
      per block, its (wgmma A operand, x tile) pairs: one for q8_0, for iq4_nl one per half."""
      if fmt == "q8_0":
        blocks_a = [q8_0_registers.a_operand(qs_smem.at[wg, slot, pl.ds(kb * BLOCK, BLOCK)], dtype,
                                             conv_smem.at[wg, kb] if interpret else None)
                    for kb in range(blocks)]
        if interpret:
          plgpu.commit_smem()
        return [[(a, x_smem.at[wg, slot, kb])] for kb, a in enumerate(blocks_a)]
      halves = []  # block 2p's low and high halves, then block 2p + 1's
      for p in range(blocks // 2):
        tile = qs_smem.at[wg, slot, pl.ds(p * iq4_nl_registers.TILE_ROWS,
                                          iq4_nl_registers.TILE_ROWS)]
        halves += iq4_nl_registers.a_operands(tile, dtype,
                                              conv_smem.at[wg, p] if interpret else None)
      return [[(halves[2 * kb + nibbles], x_smem.at[wg, slot, 2 * kb + nibbles])
               for nibbles in range(2)] for kb in range(blocks)]

    def quantized_step(slot, acc):
      operands = decode(slot)
      for pair in range(0, blocks, 2):  # two blocks' accumulators at a time

        def products(*parts):
          for part, kb in zip(parts, (pair, pair + 1)):
            for w_operand, x_tile in operands[kb]:
              plgpu.wgmma(part, w_operand, x_tile.T)
          return tuple(part[...] for part in parts)

        parts = pl.run_scoped(products, plgpu.ACC((_TN, Bp), jnp.float32),
                              plgpu.ACC((_TN, Bp), jnp.float32))
        for kb, part in zip((pair, pair + 1), parts):
          d = q8_0_registers.row_scales(d_smem.at[wg, slot, kb], interpret).astype(jnp.float32)
          acc = acc + part * lax.broadcast_in_dim(d, part.shape, [0])
      return acc

    for slot in range(stages):
      fetch(first + slot, slot)

    def step(c, acc):
      slot = lax.rem(c, stages)
      plgpu.barrier_wait(scratch.bars.at[wg * stages + slot])
      acc = (quantized_step if fmt else dense_step)(slot, acc)
      pl.when(c + stages < per_wg)(lambda: fetch(first + c + stages, slot))  # the slot is free
      return acc

    acc = lax.fori_loop(0, per_wg, step,
                        plgpu.layout_cast(jnp.zeros((_TN, Bp), jnp.float32), plgpu.Layout.WGMMA))

    if W > 1:  # the split-K partial sums meet in warpgroup 0
      @pl.when(wg > 0)
      def _hand_over():
        scratch.red_smem.at[wg - 1][...] = acc
        plgpu.barrier_arrive(scratch.red_bar)

    @pl.when(wg == 0)
    def _store():
      total = acc
      if W > 1:
        plgpu.barrier_wait(scratch.red_bar)
        for other in range(W - 1):
          total = total + plgpu.load(scratch.red_smem.at[other], layout=plgpu.Layout.WGMMA)
      if fmt:
        q8_0_registers.store_rows(total, scratch.y_smem, interpret)
      else:
        scratch.y_smem.T[...] = plgpu.layout_cast(total.astype(dtype),
                                                  plgpu.Layout.WGMMA_TRANSPOSED)
      plgpu.commit_smem()
      for_weight(lambda t, refs, cols: plgpu.copy_smem_to_gmem(scratch.y_smem,
                                                               y_refs[t].at[rows, h, cols]))
      plgpu.wait_smem_to_gmem(0)

  swizzle = xw * jnp.dtype(dtype).itemsize  # of x's tiles, which the weight tiles must share
  common = dict(
      x_smem=smem((W, stages, tk // xw, Bp, xw), dtype, swizzle),
      y_smem=plgpu.SMEM((Bp, _TN), out_dtype) if fmt else smem((Bp, _TN), dtype, _SWIZZLE),
      # a chunk's x tiles (tk / xw copies), then its qs and d, or its float weights
      bars=plgpu.Barrier(num_arrivals=tk // xw + (2 if fmt else 1), num_barriers=W * stages))
  if W > 1:
    common.update(red_smem=smem((W - 1, _TN, Bp), jnp.float32),
                  red_bar=plgpu.Barrier(num_arrivals=W - 1))  # each warpgroup but the first
  if fmt:
    operands = tuple(a for wt in weights for a in (wt.qs, wt.d))
    conv_smem = None
    if interpret:  # interpret mode's wgmma reads A from shared memory: staging for it
      conv_smem = (smem((W, blocks // 2, 4, _TN, BLOCK // 2), dtype, swizzle)
                   if fmt == "iq4_nl" else smem((W, blocks, _TN, BLOCK), dtype, swizzle))
    scratch = _Scratch(qs_smem=smem((W, stages, _TK, _TN), weights[0].qs.dtype, _SWIZZLE),
                       d_smem=plgpu.SMEM((W, stages, blocks, _TN), weights[0].d.dtype),
                       conv_smem=conv_smem, **common)
  else:
    operands = weights
    scratch = _Scratch(w_smem=smem((W, stages, tk, _TN), dtype, swizzle), **common)
  # no ids without head_ids: an iota of them would be an XLA kernel of its own at every launch;
  # and the kernel clamps them, which XLA would do in a kernel of its own
  ids = (head_ids.astype(jnp.int32),) if gathered else ()
  return tuple(plgpu.kernel(
      kernel,
      out_type=[jax.ShapeDtypeStruct((B, H, n), out_dtype) for n in widths],
      grid=(H, sum(widths) // _TN, pl.cdiv(B, Bp)),
      grid_names=("h", "n", "b"),
      num_threads=W,
      thread_name="wg",
      scratch_types={"scratch": scratch},
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
      kernel_name="mla_batched_gemv_mgpu",
      interpret=interpret_params(interpret),
  )(*ids, x, *operands))
