"""An int8 cache tile, transposed, as wgmma's A operand in registers: the values product of the
int8 decode (ops/decode/mosaic_int8.py).

The few-heads decode swaps its products, so the values product is

  accᵀ [C, N] += cᵀ[C, T] · pᵀ[T, N]        (A = cᵀ, contraction over the T = 64 tokens)

with c [T, C] the int8 tile in shared memory, channels contiguous. A 16-bit wgmma could read cᵀ
through a transposed descriptor, but the tile is 8-bit, and an 8-bit wgmma reads A from shared
memory only with its contraction contiguous. So `values_operand` loads the tile into registers
with `ldmatrix.x4.trans` and converts it there, exactly, to the query's dtype (int8_ptx.py):
a lane gets the bytes of two tokens and two channels, and the fragment's rows then hold the
channels in int8_ptx's transposed order (int8_ptx.column). accᵀ comes out with its rows in that
order, and `store_output` writes them back in channel order.

The tile is in shared memory as TMA wrote it: tiled (8, 128) and 128-byte swizzled, so byte
(t, c) sits in the 1 KiB tile (t / 8, c / 128), row t % 8, 16-byte chunk (c % 128 / 16) ^ (t % 8).
The load reads 8 rows of one 16-byte column per matrix, which the swizzle spreads over all banks.

In interpret mode (on a CPU) the same order is applied with array operations, and the operand is
staged in shared memory, because the interpreter's wgmma takes A only from there.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith, memref

from mla_jax.ops.mosaic import int8_ptx

SWIZZLE = 128  # bytes: the int8 tile's rows
TRANSFORMS = (plgpu.TilingTransform((8, SWIZZLE)), plgpu.SwizzleTransform(SWIZZLE))


def _lane_indices():
  i32 = ir.IntegerType.get_signless(32)
  k = lambda v: mgpu_utils.c(v, i32)
  thread = arith.remui(mgpu_utils.thread_idx(), k(128))
  return arith.shrui(thread, k(5)), arith.andi(thread, k(31)), k


def _offset(k, row_tile, col_tile, row, chunk, channels):
  """Byte offset of (16-byte chunk `chunk` of 128-byte column tile `col_tile`, row `row` of
  8-row tile `row_tile`) in the tiled, swizzled [T, channels] int8 tile."""
  tile = arith.addi(arith.muli(row_tile, k(channels // SWIZZLE)), col_tile)
  return arith.addi(arith.addi(arith.muli(tile, k(8 * SWIZZLE)), arith.muli(row, k(SWIZZLE))),
                    arith.muli(arith.xori(chunk, row), k(16)))


def _values_compiled(tile_ref, dtype, first: int, channels: int):
  layout = plgpu.Layout.WGMMA
  tokens, all_channels = tile_ref.shape  # [T, C]

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(TRANSFORMS),),
                     return_type=plgpu.ShapeDtypeStruct((channels, tokens), dtype, layout=layout))
  def build(ctx, ref):
    del ctx
    regs, fragment_layout = int8_ptx.empty_fragment((channels, tokens), dtype, layout.to_mgpu())
    # Register [b, j, 0, 0, i, ...] holds row 64b + 16w + 8i + l/4, tokens 8j + 2(l % 4) + {0, 1}.
    assert regs.shape == (channels // 64, tokens // 8, 1, 1, 2, 1, 1, 1, 1), regs.shape
    warp, lane, k = _lane_indices()
    row = arith.andi(lane, k(7))
    for b in range(channels // 64):
      block = first // 64 + b  # the warp's 16 channels: chunk 4(block % 2) + w of tile block / 2
      chunk = arith.addi(warp, k(4 * (block % 2)))
      for half in range(tokens // 32):  # lane l names token 32 half + l
        row_tile = arith.addi(arith.shrui(lane, k(3)), k(4 * half))
        offset = _offset(k, row_tile, k(block // 2), row, chunk, all_channels)
        words = int8_ptx.ldmatrix_x4(int8_ptx.shared_address(ref, offset), trans=True)
        for g, word in enumerate(words):  # tokens 32 half + 8g up
          for i, sel in enumerate(int8_ptx.COLUMN_PAIRS):
            regs[b, 4 * half + g, 0, 0, i, 0, 0, 0, 0] = int8_ptx.convert_pair(word, sel, dtype)
    return int8_ptx.fragment(regs, fragment_layout)

  return build(tile_ref)


def values_operand(tile_ref, dtype, first: int, channels: int, staging=None):
  """Channels [first, first + channels) of the int8 tile [T, C] in `tile_ref` (shared memory,
  TRANSFORMS), transposed, as the values' A operand: a [channels, T] array of `dtype`, rows in
  int8_ptx.column's order (WGMMA layout). In interpret mode it is written to `staging` (shared
  memory [channels, T]), which is returned."""
  if staging is None:
    return _values_compiled(tile_ref, dtype, first, channels)
  cols = tile_ref[...][:, first:first + channels]
  staging[...] = int8_ptx.to_rows(cols.astype(dtype).T)
  return staging


def store_output(parts, o_ref, interpret: bool):
  """o_ref [N, C] (global memory) = the accᵀ `parts` ([C / len(parts), N] each, rows in
  int8_ptx.column's order), transposed back to channel order, in o_ref's dtype."""
  rows = parts[0].shape[0]
  if interpret:
    o_ref[...] = jnp.concatenate([int8_ptx.to_columns(p) for p in parts]).T.astype(o_ref.dtype)
    return

  @plgpu.inline_mgpu(arg_types=(*[plgpu.Layout.WGMMA] * len(parts), plgpu.RefType()))
  def store(ctx, *args):
    del ctx
    *accs, ref = args
    out_type = ir.MemRefType(ref.type).element_type
    ops = int8_ptx.IndexOps()

    def put(first, value, idx):
      c = arith.addi(int8_ptx.column(idx[0], ops), ops.value(first))
      memref.store(arith.truncf(out_type, value), ref, [idx[1], c])

    for p, acc in enumerate(accs):
      acc.foreach(lambda v, idx, first=p * rows: put(first, v, idx))

  store(*parts, o_ref)
