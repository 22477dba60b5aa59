"""Fused batched GEMV on Hopper: Pallas with the Mosaic GPU lowering (TMA + wgmma).

Same product as ops/gemv_gpu.py, y[b,h] = x[b,h,:K] · w[h] for all heads and batch rows in one
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
products are done. x arrives with each chunk, one [Bp, 32] tile per GGML block (the operand
layout that lets a block's product be scaled on its own).

Quantized q8_0 weights (quant.QuantizedTensor) never reach HBM as floats: each int8 chunk is
converted exactly to the activation dtype (int8 fits 8 significant bits; Mosaic converts int8
to bfloat16 with integer and packed-bf16 ops, not the conversion unit) into one shared-memory
tile, each block's product goes to its own accumulator, and is scaled by the block's float16 d
per output column before it is added: y = Σ_blocks d_kb · (q_kb · x_kb).

Every tile is read in place: x from any [B, H, K'] array with K' >= K (the whole query), the
weights as stored. The Triton kernel (ops/gemv_gpu.py) stays the default and the portable path,
and serves what this one does not (see unsupported()); gemv_gpu.batched_gemv(lowering="mosaic")
runs this one, and says why it is not the default.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from mla_jax import quant
from mla_jax.ops.mgpu_common import accumulate, interpret_params

BLOCK = quant.BLOCK
_TN = 64       # output columns per program: the wgmma M
_TK = 2 * BLOCK  # contraction rows per chunk
_STAGES = 4    # chunks in flight per warpgroup
_MAX_BLOCK_B = 64
_NUM_SMS = 132   # H100/H200 SXM, the GPUs choose_warpgroups was measured on


def _smem(shape, dtype, swizzle=64):
  """A shared-memory buffer tiled and swizzled on its minor axis: by default in 64-byte rows,
  the swizzle of x's [Bp, 32] block tiles, which both wgmma operands must share."""
  bits = jnp.dtype(dtype).itemsize * 8
  swizzle = swizzle or plgpu.find_swizzle(shape[-1] * bits)
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, swizzle * 8 // bits)),
                                              plgpu.SwizzleTransform(swizzle)))


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def block_rows(B: int) -> int:
  """Batch rows per program: B rounded up to a power of two, at least wgmma's N of 8."""
  return min(max(8, _next_pow2(B)), _MAX_BLOCK_B)


def choose_warpgroups(programs: int, K: int, Bp: int, quantized: bool) -> int:
  """Warpgroups that split a program's contraction (H200 sweep, docs/batched_gemv.md): two, from
  4 chunks up, where the grid has fewer programs than SMs (at H=16, K=512: bf16 2.8 vs 3.5 µs,
  q8_0 3.9 vs 4.6), or for q8_0's conversion at a few batch rows (H=128, K=512: 5.9-6.1 vs
  6.4). Elsewhere one: the second warpgroup's tiles and partial sums halve the programs an SM
  holds (H=128, K=512, B=64: 11.2-11.5 vs 8.5-9.4 µs); at K=128 one chunk each was slower."""
  few_programs = programs < _NUM_SMS
  return 2 if K // _TK >= 4 and (few_programs or (quantized and Bp <= 8)) else 1


def unsupported(x, w) -> str | None:
  """Why this kernel cannot take these arguments, or None if it can."""
  K, N = w.shape[1:]
  dtype = jnp.dtype(x.dtype)
  if dtype not in (jnp.bfloat16, jnp.float16):
    return f"x.dtype={x.dtype}: the wgmma operands must be bfloat16 or float16"
  if isinstance(w, quant.QuantizedTensor):
    if w.fmt != "q8_0":
      return f"w.fmt={w.fmt!r}: only q8_0 is decoded by this kernel"
  elif jnp.dtype(w.dtype) != dtype:
    return f"w.dtype={w.dtype}, x.dtype={x.dtype}: a float w must have x's dtype"
  if K % _TK or N % _TN:
    return f"w.shape={tuple(w.shape)}: K must be a multiple of {_TK} and N of {_TN}"
  B, _, Kx = x.shape
  if Kx % 8:
    return f"x.shape={tuple(x.shape)}: x's row length must be a multiple of 8 (TMA strides)"
  if B > 8 and B % 8:
    return f"x.shape={tuple(x.shape)}: B must be at most 8 or a multiple of 8 (TMA row tiles)"
  return None


@functools.partial(jax.jit, static_argnames=("stages", "warpgroups", "interpret"))
def batched_gemv(x, w, *, stages: int = _STAGES, warpgroups: int | None = None,
                 interpret: bool = False):
  """y [B,H,N] = x[..., :K] · w per head, in x's dtype; arguments as ops/gemv_gpu.batched_gemv
  (see unsupported() for what this kernel takes). `stages`: chunks in flight per warpgroup;
  `warpgroups`: how many split the contraction of a program (default: choose_warpgroups);
  `interpret`: run in Mosaic GPU's interpret mode (on a CPU)."""
  reason = unsupported(x, w)
  if reason is not None:
    raise ValueError(reason)
  B, H, _ = x.shape
  _, K, N = w.shape
  dtype, Bp = x.dtype, block_rows(B)
  quantized = isinstance(w, quant.QuantizedTensor)
  if stages < 1 or (warpgroups is not None and warpgroups < 1):
    raise ValueError(f"stages={stages}, warpgroups={warpgroups}: expected >= 1")
  W = warpgroups or choose_warpgroups(H * (N // _TN) * pl.cdiv(B, Bp), K, Bp, quantized)
  if (K // _TK) % W:
    raise ValueError(f"warpgroups={W}: must divide the {K // _TK} chunks of {_TK} rows of K={K}")
  per_wg = K // _TK // W
  stages = min(stages, per_wg)

  def kernel(x_ref, *refs):
    if quantized:
      qs_ref, d_ref, y_ref, x_smem, qs_smem, d_smem, conv_smem, *rest = refs
    else:
      w_ref, y_ref, x_smem, w_smem, *rest = refs
    y_smem, bars, *reduction = rest
    h, j, i = lax.axis_index("h"), lax.axis_index("n"), lax.axis_index("b")
    wg = lax.axis_index("wg")
    rows, cols = pl.ds(i * Bp, Bp), pl.ds(j * _TN, _TN)
    first = wg * per_wg  # this warpgroup's chunks: [first, first + per_wg)

    def fetch(c, slot):
      bar = bars.at[wg * stages + slot]
      for half in range(2):
        plgpu.copy_gmem_to_smem(x_ref.at[rows, h, pl.ds((2 * c + half) * BLOCK, BLOCK)],
                                x_smem.at[wg, slot, half], bar)
      k_rows = pl.ds(c * _TK, _TK)
      if quantized:
        plgpu.copy_gmem_to_smem(qs_ref.at[h, k_rows, cols], qs_smem.at[wg, slot], bar)
        plgpu.copy_gmem_to_smem(d_ref.at[h, pl.ds(2 * c, 2), cols], d_smem.at[wg, slot], bar)
      else:
        plgpu.copy_gmem_to_smem(w_ref.at[h, k_rows, cols], w_smem.at[wg, slot], bar)

    def dense_step(slot, acc):
      def products(acc_ref):
        for half in range(2):
          plgpu.wgmma(acc_ref, w_smem.at[wg, slot, pl.ds(half * BLOCK, BLOCK)].T,
                      x_smem.at[wg, slot, half].T)
      return accumulate(acc, products, interpret)

    def q8_0_step(slot, acc):
      conv = conv_smem.at[wg]
      values = plgpu.load(qs_smem.at[wg, slot], layout=plgpu.Layout.WGMMA_8BIT)
      conv[...] = values.astype(dtype)  # exact: |q| <= 127
      plgpu.commit_smem()

      def products(part0, part1):  # one accumulator per GGML block
        for half, part in enumerate((part0, part1)):
          plgpu.wgmma(part, conv.at[pl.ds(half * BLOCK, BLOCK)].T, x_smem.at[wg, slot, half].T)
        return part0[...], part1[...]

      for half, part in enumerate(pl.run_scoped(products, plgpu.ACC((_TN, Bp), jnp.float32),
                                                plgpu.ACC((_TN, Bp), jnp.float32))):
        d = plgpu.load(d_smem.at[wg, slot, half], layout=plgpu.Layout.WGMMA.reduce(1))
        acc = acc + part * lax.broadcast_in_dim(d.astype(jnp.float32), part.shape, [0])
      return acc

    for slot in range(stages):
      fetch(first + slot, slot)

    def step(c, acc):
      slot = lax.rem(c, stages)
      plgpu.barrier_wait(bars.at[wg * stages + slot])
      acc = (q8_0_step if quantized else dense_step)(slot, acc)
      pl.when(c + stages < per_wg)(lambda: fetch(first + c + stages, slot))  # the slot is free
      return acc

    acc = lax.fori_loop(0, per_wg, step,
                        plgpu.layout_cast(jnp.zeros((_TN, Bp), jnp.float32), plgpu.Layout.WGMMA))

    if W > 1:  # the split-K partial sums meet in warpgroup 0
      red_smem, red_bar = reduction

      @pl.when(wg > 0)
      def _hand_over():
        red_smem.at[wg - 1][...] = acc
        plgpu.barrier_arrive(red_bar)

    @pl.when(wg == 0)
    def _store():
      total = acc
      if W > 1:
        plgpu.barrier_wait(red_bar)
        for other in range(W - 1):
          total = total + plgpu.load(red_smem.at[other], layout=plgpu.Layout.WGMMA)
      y_smem.T[...] = plgpu.layout_cast(total.astype(dtype), plgpu.Layout.WGMMA_TRANSPOSED)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(y_smem, y_ref.at[rows, h, cols])
      plgpu.wait_smem_to_gmem(0)

  x_tiles = _smem((W, stages, 2, Bp, BLOCK), dtype)
  common = [_smem((Bp, _TN), dtype),
            plgpu.Barrier(num_arrivals=4 if quantized else 3, num_barriers=W * stages)]
  if W > 1:
    common += [_smem((W - 1, _TN, Bp), jnp.float32, swizzle=None),
               plgpu.Barrier(num_arrivals=W - 1)]
  if quantized:
    operands = (w.qs, w.d)
    scratch = [x_tiles, _smem((W, stages, _TK, _TN), jnp.int8),
               plgpu.SMEM((W, stages, 2, _TN), w.d.dtype), _smem((W, _TK, _TN), dtype), *common]
  else:
    operands = (w,)
    scratch = [x_tiles, _smem((W, stages, _TK, _TN), dtype), *common]
  return plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((B, H, N), dtype),
      grid=(H, N // _TN, pl.cdiv(B, Bp)),
      grid_names=("h", "n", "b"),
      num_threads=W,
      thread_name="wg",
      scratch_types=scratch,
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
      kernel_name="mla_batched_gemv_mgpu",
      interpret=interpret_params(interpret),
  )(x, *operands)
