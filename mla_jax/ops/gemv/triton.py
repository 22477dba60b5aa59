"""Fused batched GEMV over all heads (Pallas, Triton lowering): y[b,h] = x[b,h,:K] · w[h].

The absorbed decode step (DeepSeek-V2 §2.1) does two small products per head, q_latent =
q_nope·wk_b [H,K,C] and out = o_latent·wv_b [H,C,V]. Run as H separate GEMVs, each with its own
copy of the strided q_nope row and its own activation quantization, that is 3H launches, which
cost more than the work (the CUDA result this follows made MLA generation 31% faster by fusing
them). Here one launch covers every head and batch row:

- grid (H, N / block_n, ceil(B / block_b)); a program owns [block_b, block_n] outputs of one head
  and walks K in GGML blocks of 32 rows;
- x is read in place from any [B, H, K'] array with K' >= K (the whole query q [B,H,K+R] for
  q_nope): only the first K columns are loaded, rows past B are masked;
- quantized weights (quant.QuantizedTensor: q8_0, iq4_nl) are decoded in registers, one block at a
  time: the partial product of a block is scaled by its float16 d after the dot, so the weights
  never reach HBM as floats. IQ4_NL's table lookup is a degree-4 polynomial of the 4-bit index,
  rounded, exact on all 16 entries (the table is smooth; a register gather is not expressible).
  The 4-bit indices become floats, and the polynomial is rounded, by the magic-number trick
  (the float32 bits of 1.5·2^23 + i): integer and float adds, not the conversion unit, which on
  Hopper retires 16 results per clock per SM against 64-128 for adds (CUDA guide, arithmetic
  instructions); so do q8_0's int8 values on the way to the tensor-core dot. Or (lookup="prmt")
  the table is looked up by byte permutes in inline PTX, as ggml's CUDA kernels and the Mosaic
  GEMV do (ops/mosaic/iq4_nl_prmt.py): 22 integer instructions for 8 weights, written as
  bfloat16, then one integer op a weight to float32, against about 9 float and integer
  instructions a weight for the polynomial;
- `int8=True` (q8_0) quantizes each x block to Q8_1 (quant.quantize_q8_1's arithmetic) in
  registers and dots int8·int8 -> int32 on the tensor cores, so activation quantization costs no
  launch either;
- `dot=False` (one batch row per program) accumulates x·w elementwise into a [32, block_n] tile
  and reduces it once at the end, instead of padding B to Triton's minimum dot of 16 rows;
- the K loop is a pipelined loop (Triton's num_stages), not unrolled: on the H200 the pipelined
  loop measured up to 2x faster than a fully unrolled one at K=512 (docs/batched_gemv.md);
- `split_k=G` gives each output block G programs (the largest count <= G that divides K's
  GGML blocks), each over a piece of K, which write float32 partial sums [G, B, H, N] that one
  small XLA reduction adds (split-K, as in GEMM libraries): with one head (a Linear's weight),
  N / block_n programs alone cannot fill the GPU's SMs nor keep enough loads in flight, and each
  would walk all of K. Several weights of one launch write their partial sums side by side
  into one array, so that one reduction adds them all.

ops/gemv/mosaic.py is the Hopper kernel of the same product; ops.gemv's dispatcher runs it on
request (lowering="mosaic") and says why this one stays the default.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from mla_jax import quant
from mla_jax.ops.common import (MAGIC, MAGIC_BITS, TRITON_MIN_DOT, check_field, check_same_kind,
                                is_pow2, is_positive_int, next_pow2)
from mla_jax.ops.mosaic import iq4_nl_prmt

BLOCK = quant.BLOCK
HALF = BLOCK // 2
MAX_BLOCK_B = 64
_LONG_K = 1024  # contractions from here on (projections, experts) may split K at B=1
_SPLIT_PROGRAMS = 1536  # programs a split-K launch aims at: about a dozen an SM
LOOKUPS = ("poly", "prmt")  # how IQ4_NL's 4-bit indices become table values (module docstring)

# IQ4_NL_VALUES[i] == round(-127 + i·(c3 + i·(c2 + i·(c1 + i·c0)))) for i in 0..15: the minimax
# fit with the constant pinned to the integer IQ4_NL_VALUES[0] (max error 0.44, scipy linprog),
# so that the rounding add of MAGIC merges into the last coefficient exactly.
_IQ4_POLY = (0.00144801846, 0.0362732496, -1.43856375, 24.5005993)
_IQ4_CONST = quant.IQ4_NL_VALUES[0]


@dataclasses.dataclass(frozen=True)
class TritonGemvTuning:
  """Tuning knobs; `choose_tuning` picks them per shape from the H200 sweep in
  docs/batched_gemv.md."""

  block_n: int = 128  # output columns per program
  block_b: int | None = None  # batch rows per program (dot); None: next power of two >= B
  dot: bool = True  # tensor-core dot (pads block_b to 16) or, per batch row, FMA into [32, n]
  int8: bool = False  # Q8_1 activations, int8 dot (q8_0 weights with dot=True only)
  num_warps: int = 4
  num_stages: int = 3  # Triton software pipelining depth of the K loop
  unroll: bool = False  # unroll the K loop fully (all loads in flight, no pipelining)
  block_k: int = 1  # GGML blocks of 32 rows per step of the (pipelined) K loop
  split_k: int = 1  # at most this many programs per output block, each over a piece of K
  lookup: str = "poly"  # IQ4_NL's table: "poly" (a polynomial) or "prmt" (byte permutes)

  def __post_init__(self):
    check_field(self, "block_n", isinstance(self.block_n, int) and is_pow2(self.block_n),
                "a power of two")
    check_field(self, "block_b", self.block_b is None or (isinstance(self.block_b, int)
                                                          and is_pow2(self.block_b)),
                "None or a power of two")
    check_field(self, "num_warps", isinstance(self.num_warps, int) and is_pow2(self.num_warps),
                "a power of two")
    check_field(self, "num_stages", is_positive_int(self.num_stages), "an integer >= 1")
    check_field(self, "block_k", is_positive_int(self.block_k), "an integer >= 1")
    check_field(self, "split_k", is_positive_int(self.split_k), "an integer >= 1")
    check_field(self, "int8", not self.int8 or self.dot, "False unless dot=True")
    check_field(self, "lookup", self.lookup in LOOKUPS, f"one of {LOOKUPS}")


def choose_tuning(B: int, H: int, K: int, N: int, fmt: str | None) -> TritonGemvTuning:
  """The configuration used when none is given: rules read off sweeps of the variants at the
  benchmark shapes (docs/batched_gemv.md, "Default tuning", has their figures), kept only where
  a rule won by more than the ~5% run-to-run noise.

  - Many heads fill the GPU with wider column blocks: block_n 64 at H >= 64, else 32.
  - Long contractions (K > N, the wv_b product) move 4 GGML blocks per pipelined step, so each
    step's loads are large enough to stream (bf16, and q8_0 at B >= 64); short ones (K < N, the
    wk_b product) 2 blocks for bf16 at few heads.
  - Quantized weights with one batch row and many heads skip the 16-row padding of the tensor-core
    dot (dot=False): for the short contraction 4 blocks per step (q8_0 128 columns, iq4_nl 64),
    for the long one 32 columns with the whole K in one step and 8 warps.
  - q8_0 with a few batch rows and many heads, short contraction: 128-column blocks
    (6.9 vs 7.8 µs at H=128, B=8; slower at B=64 and H=16).
  - Quantized weights with one row, few heads and a long contraction (a Linear's weight, a MoE
    layer's chosen experts): split-K into up to 16 pieces, about _SPLIT_PROGRAMS programs in
    all, FMA, 4 blocks a step. H100, 2048 -> 3072, B=1: 8.0 µs (iq4_nl) and 8.6 µs (q8_0) of
    GPU time, the partials' sum included, against 26 µs for the rule below and 16 µs for XLA's
    dequantize-then-dot. iq4_nl looks its table up by byte permutes there, in the widest
    column blocks that still give _SPLIT_PROGRAMS / 2 programs at 16 pieces (_one_row_iq4_nl).
  """
  block_n = min(64 if H >= 64 else 32, N)
  if fmt is not None and B == 1 and H < 64 and K >= _LONG_K:
    if fmt == "iq4_nl":
      return _one_row_iq4_nl(H, N)
    return _one_row_split(H, N, 32)
  if fmt is None:
    if K > N:
      return TritonGemvTuning(block_n=block_n, block_k=4)
    return TritonGemvTuning(block_n=block_n, block_k=1 if H >= 64 else 2)
  if K < N and H >= 64 and B == 1:
    return TritonGemvTuning(block_n=min(128 if fmt == "q8_0" else 64, N), dot=False, block_k=4)
  if K > N and H >= 64 and B == 1:
    return TritonGemvTuning(block_n=min(32, N), dot=False, block_k=16, num_warps=8)
  if K < N and fmt == "q8_0" and H >= 64 and B <= 8:
    return TritonGemvTuning(block_n=min(128, N))
  if K > N and fmt == "q8_0" and B >= 64:
    return TritonGemvTuning(block_n=block_n, block_k=4)
  return TritonGemvTuning(block_n=block_n if K < N else min(32, N))


def _one_row_split(H: int, N: int, block_n: int, **knobs) -> TritonGemvTuning:
  """One row, few heads, a long contraction: FMA over column blocks of block_n, 4 GGML blocks a
  step, K split into as many pieces (up to 16) as make about _SPLIT_PROGRAMS programs."""
  programs = H * pl.cdiv(N, block_n)
  return TritonGemvTuning(block_n=min(block_n, N), dot=False, block_k=4,
                          split_k=max(1, min(16, _SPLIT_PROGRAMS // programs)), **knobs)


def _one_row_iq4_nl(H: int, N: int) -> TritonGemvTuning:
  """_one_row_split for IQ4_NL: the table by byte permutes, and column blocks of 128 or 64 where
  16 pieces still make _SPLIT_PROGRAMS / 2 programs, else 32. H100, B=1, GPU µs of a call, the
  partials' sums included, against the rule before (polynomial, block_n 32, about 1536 programs;
  docs/batched_gemv.md): q_proj with kv_a_proj_with_mqa (2048 -> 3072 + 576) 8.3 against 10.7,
  o_proj (2048 -> 2048) 5.2 against 6.4, 6 chosen experts' gate_proj with up_proj (2048 -> 1408
  + 1408) 21.1 against 32.9, their down_proj (1408 -> 2048) 10.8 against 17.1."""
  block_n = next((n for n in (128, 64) if H * pl.cdiv(N, n) * 16 >= _SPLIT_PROGRAMS // 2), 32)
  return _one_row_split(H, N, block_n, lookup="prmt")


def _int_to_f32(i):
  """Exact float32 of small integers (|i| < 2^22, e.g. int8 or 4-bit), without a conversion."""
  return _unbias(i.astype(jnp.int32) + MAGIC_BITS)


def _unbias(bits):
  """The integer i, as float32, from the bits of MAGIC + i."""
  return jax.lax.bitcast_convert_type(bits, jnp.float32) - MAGIC


def iq4_nl_values(idx):
  """Table lookup IQ4_NL_VALUES[idx] for 4-bit indices, as float32 (exact).

  The last Horner step adds MAGIC + IQ4_NL_VALUES[0], which rounds the polynomial to an
  integer; its bits pass through a no-op AND (the sign bit is clear) so that compilers that
  reassociate floats (XLA:CPU, which runs interpret mode, does) cannot fold the add of MAGIC
  and its subtraction into one add of the unrounded value."""
  t = _int_to_f32(idx)
  acc = jnp.full(t.shape, _IQ4_POLY[0], jnp.float32)
  for c in _IQ4_POLY[1:]:
    acc = acc * t + c
  rounded = acc * t + (MAGIC + _IQ4_CONST)
  return _unbias(jax.lax.bitcast_convert_type(rounded, jnp.int32) & 0x7FFFFFFF)


def block_of(w_refs, e, kb, *, cols, fmt, lookup: str, interpret: bool):
  """GGML block kb (rows 32·kb.. of K) of weight head e at columns cols, read from w_refs (w_ref
  [E, K, N], or a quant.QuantizedTensor's qs_ref and d_ref): ([(row offset in the block, its
  values [rows, n])], the block's scales d [1, n] float32, or None for a float weight). One part
  of 32 rows, or for iq4_nl two of 16, its low and high nibbles (quant.py's layout), looked up
  by `lookup` (LOOKUPS)."""
  k0 = _aligned(kb * BLOCK, BLOCK)
  if fmt is None:
    return [(0, w_refs[0][e, pl.ds(k0, BLOCK), cols])], None  # [32, n]
  qs_ref, d_ref = w_refs
  d = d_ref[e, kb, cols].astype(jnp.float32)[None, :]  # [1, n]
  if fmt == "q8_0":
    return [(0, qs_ref[e, pl.ds(k0, BLOCK), cols])], d  # int8 [32, n]
  packed = qs_ref[e, pl.ds(_aligned(kb * HALF, HALF), HALF), cols]  # uint8 [16, n]
  if lookup == "prmt":
    lo, hi = iq4_nl_prmt.decode_triton(packed, interpret)
    return [(0, lo), (HALF, hi)], d
  return [(0, iq4_nl_values(packed & 0xF)), (HALF, iq4_nl_values(packed >> 4))], d


def as_dot_operand(w, dtype):
  """A weight tile as the dot's dtype; q8_0's int8 goes through its exact float32
  (`_int_to_f32`): on the H200 that made the tensor-core path up to 1.5x faster than int8 ->
  bfloat16 directly, while the FMA path, which needs float32 anyway, is faster with the plain
  conversion (docs/batched_gemv.md)."""
  return (_int_to_f32(w) if jnp.issubdtype(w.dtype, jnp.integer) else w).astype(dtype)


def _aligned(v, m):
  return v if isinstance(v, int) else pl.multiple_of(v, m)


def _dividing_block(block: int, n: int) -> int:
  """The largest power of two <= block that divides n (n a multiple of 32: at least 32): the
  column blocks then tile N exactly (q_proj's 3072, kv_a's 576 columns...)."""
  while n % block:
    block //= 2
  return block


def _gemv_kernel(x_ref, *refs, fmt, B, E, K, block_b, block_n, block_k, dot, int8, unroll,
                 compute_dtype, gathered, shared_x, split_k, col_blocks, lookup, interpret):
  # x_ref: [B, H, K'] (K' >= K; columns [0, K) are read in place), or [B, 1, K'] when
  #   gathered: one row of x for every head
  # ids_ref: [H] int32, the weight head of each head (gathered), clamped into [0, E) here
  # then per weight t (col_blocks[t] column blocks of N_t):
  #   dense:  w_ref [E, K, N_t]
  #   q8_0:   qs_ref int8 [E, K, N_t], d_ref float16 [E, K/32, N_t]
  #   iq4_nl: qs_ref uint8 [E, K/2, N_t], d_ref float16 [E, K/32, N_t]
  # then per weight t, o_ref: [B, H, N_t]; or, split over pieces of K, one o_ref
  #   [split_k, B, H, Σ N_t] of float32 partial sums, the weights' columns side by side
  # E = H, and head h reads w[h], unless gathered: then head h reads w[ids[h]].
  ids_ref, refs = (refs[0], refs[1:]) if gathered else (None, refs)
  arity = 1 if fmt is None else 2  # arrays a weight is made of
  num_weights = len(col_blocks)
  h, column_block = pl.program_id(0), pl.program_id(1)
  i, g = pl.program_id(2) // split_k, pl.program_id(2) % split_k  # batch block, piece of K
  num_blocks = K // BLOCK // split_k  # GGML blocks of this program's piece of K
  first_block = g * num_blocks
  e = jnp.clip(ids_ref[h], 0, E - 1) if gathered else h  # a bad id reads no foreign memory
  xh = jnp.int32(0) if shared_x else h  # an array: interpret mode takes no int index here
  rows = pl.ds(i * block_b, block_b)
  row_ok = (i * block_b + jnp.arange(block_b)) < B  # [block_b]

  def load_x(k0, width):  # [block_b, width]
    mask = jnp.broadcast_to(row_ok[:, None], (block_b, width))
    return pltriton.load(x_ref.at[rows, xh, pl.ds(k0, width)], mask=mask, other=0.0)

  def product(w_refs, o_ref, j, o_first):
    """Column block j of this weight: [block_b, block_n] outputs of head h, at columns o_first +
    j·block_n of o_ref."""
    cols = pl.ds(pl.multiple_of(j * block_n, block_n), block_n)

    weight_block = functools.partial(block_of, w_refs, e, cols=cols, fmt=fmt, lookup=lookup,
                                     interpret=interpret)

    def dot_body(kb, acc):  # acc: [block_b, block_n] float32
      k0 = kb * BLOCK
      parts, d = weight_block(kb)
      if int8:  # Q8_1 activation block (quant.quantize_q8_1's arithmetic), int8 x int8 -> int32
        x = load_x(k0, BLOCK).astype(jnp.float32)  # [block_b, 32]
        d_x, inv = quant.q8_block_scale(jnp.max(jnp.abs(x), axis=1, keepdims=True))
        x_q = quant.round_half_away(x * inv).astype(jnp.int8)
        part = jax.lax.dot(x_q, parts[0][1], preferred_element_type=jnp.int32)
        return acc + part.astype(jnp.float32) * d_x * d
      part = sum(jax.lax.dot(load_x(k0 + off, q.shape[0]).astype(compute_dtype),
                             as_dot_operand(q, compute_dtype), preferred_element_type=jnp.float32)
                 for off, q in parts)
      return acc + (part if d is None else part * d)

    def fma_body(kb, acc):  # one batch row; acc: [rows of a part, block_n] float32
      k0 = kb * BLOCK
      parts, d = weight_block(kb)
      part = sum(x_ref[i, xh, pl.ds(k0 + off, q.shape[0])].astype(jnp.float32)[:, None]
                 * q.astype(jnp.float32) for off, q in parts)
      return acc + (part if d is None else part * d)

    body = dot_body if dot else fma_body
    acc_rows = block_b if dot else (HALF if fmt == "iq4_nl" else BLOCK)
    acc = jnp.zeros((acc_rows, block_n), jnp.float32)
    if unroll:  # every block's loads are issued before the first is used
      for kb in range(num_blocks):
        acc = body(first_block + kb, acc)
    else:  # Triton pipelines the loads of the next num_stages steps (cp.async)
      def step(ks, acc):
        for sub in range(block_k):
          acc = body(first_block + ks * block_k + sub, acc)
        return acc
      acc = jax.lax.fori_loop(0, num_blocks // block_k, step, acc)
    if not dot:
      acc = jnp.sum(acc, axis=0, keepdims=True)  # [1, block_n]
    mask = jnp.broadcast_to(row_ok[:, None], (block_b, block_n))
    o_cols = pl.ds(pl.multiple_of(o_first + j * block_n, block_n), block_n)
    out = o_ref.at[g, rows, h, o_cols] if split_k > 1 else o_ref.at[rows, h, o_cols]
    pltriton.store(out, acc.astype(o_ref.dtype), mask=mask)

  first = 0  # the weights' column blocks follow each other along the grid's axis 1
  for t, blocks in enumerate(col_blocks):
    o_ref, o_first = ((refs[num_weights * arity], first * block_n) if split_k > 1
                      else (refs[num_weights * arity + t], 0))
    run = functools.partial(product, refs[t * arity:(t + 1) * arity], o_ref,
                            column_block - first, o_first)
    if num_weights == 1:
      run()
    else:
      pl.when((column_block >= first) & (column_block < first + blocks))(run)
    first += blocks


def unsupported(x, w) -> str | None:
  """Why this kernel cannot take these arguments (shapes as common.check_gemv_args), or None."""
  _, K, N = w.shape
  if K % BLOCK or N % BLOCK:
    return f"w.shape={tuple(w.shape)}; expected K and N multiples of {BLOCK}"
  if not jnp.issubdtype(x.dtype, jnp.floating):
    return f"x.dtype={x.dtype}; expected a float dtype"
  if not isinstance(w, quant.QuantizedTensor) and not jnp.issubdtype(w.dtype, jnp.floating):
    return f"w.dtype={w.dtype}; expected a float array or quant.QuantizedTensor"
  return None


@functools.partial(jax.jit, static_argnames=("tuning", "interpret"))
def batched_gemv(x, w, *, tuning: TritonGemvTuning, interpret: bool = False, head_ids=None):
  """y [B,H,N] = x[..., :K] · w per head, in one kernel launch; y has x's dtype.

  x: [B,H,K'] with K' >= K, e.g. the whole query [B,H,K+R] (only x[..., :K] is read, in place).
  w: [H,K,N] float array (bf16/f16/f32) or quant.QuantizedTensor ("q8_0"/"iq4_nl"); K and N
  multiples of 32 (see unsupported()). Or a tuple of such weights of one kind, E and K (a
  gate and an up projection, q_proj and kv_a_proj_with_mqa: products of the same x): their
  column blocks share the launch's grid, and y is the tuple of their products.
  interpret: Pallas' interpret mode.
  head_ids [H] int32 or None: head h multiplies w[head_ids[h]] instead, w [E,K,N] for any E
  (a MoE layer's chosen experts, read where they lie). Ids outside [0, E) are clamped. x may
  then be [B,1,K']: one row that every head multiplies.
  """
  weights = w if isinstance(w, tuple) else (w,)
  ys = _launch(x, weights, tuning, interpret, head_ids)
  return ys if isinstance(w, tuple) else ys[0]


def _launch(x, weights, tuning, interpret, head_ids):
  """The products of x with each of `weights` in one pallas_call: a tuple of [B,H,N_t]."""
  check_same_kind(weights)
  B, H = x.shape[0], x.shape[1] if head_ids is None else head_ids.shape[0]
  E, K, _ = weights[0].shape
  widths = [wt.shape[2] for wt in weights]
  quantized = isinstance(weights[0], quant.QuantizedTensor)
  fmt = weights[0].fmt if quantized else None
  if tuning.int8 and fmt != "q8_0":
    raise ValueError(f"{tuning=}: int8=True needs q8_0 weights and dot=True (Triton's int8 dot "
                     "needs K >= 32 and an IQ4_NL block splits into two 16-row nibble halves)")
  common = math.gcd(*widths)
  block_n = _dividing_block(min(tuning.block_n, common), common)
  block_b = 1
  if tuning.dot:
    block_b = max(min(tuning.block_b or next_pow2(B), MAX_BLOCK_B), TRITON_MIN_DOT)
    block_n = max(block_n, TRITON_MIN_DOT)
  compute_dtype = x.dtype if quantized else jnp.promote_types(x.dtype, weights[0].dtype)
  split_k = max(g for g in range(1, tuning.split_k + 1) if (K // BLOCK) % g == 0)
  col_blocks = tuple(n // block_n for n in widths)
  kernel = functools.partial(
      _gemv_kernel, fmt=fmt, B=B, E=E, K=K, block_b=block_b, block_n=block_n,
      block_k=math.gcd(tuning.block_k, K // BLOCK // split_k), dot=tuning.dot,
      int8=tuning.int8, unroll=tuning.unroll, compute_dtype=compute_dtype,
      gathered=head_ids is not None, shared_x=x.shape[1] != H, split_k=split_k,
      col_blocks=col_blocks, lookup=tuning.lookup, interpret=interpret)
  w_args = tuple(a for wt in weights for a in ((wt.qs, wt.d) if quantized else (wt,)))
  if head_ids is not None:  # clamped in the kernel, not in a kernel of XLA's own
    w_args = (head_ids.astype(jnp.int32), *w_args)
  out_shape = ([jax.ShapeDtypeStruct((split_k, B, H, sum(widths)), jnp.float32)] if split_k > 1
               else [jax.ShapeDtypeStruct((B, H, n), x.dtype) for n in widths])
  ys = pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid=(H, sum(col_blocks), pl.cdiv(B, block_b) * split_k),
      compiler_params=pltriton.CompilerParams(num_warps=tuning.num_warps,
                                              num_stages=tuning.num_stages),
      interpret=interpret,
      name="mla_batched_gemv",
  )(x, *w_args)
  if split_k == 1:
    return tuple(ys)
  # one sum of every weight's partials: one XLA reduction a launch, not one a weight
  y = ys[0].sum(axis=0).astype(x.dtype)
  return tuple(jnp.split(y, np.cumsum(widths)[:-1], axis=-1))
