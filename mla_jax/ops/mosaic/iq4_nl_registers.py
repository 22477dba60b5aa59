"""IQ4_NL weights as wgmma's A operand in registers, for the Mosaic GPU GEMV (ops/gemv/mosaic.py).

Decoded into shared memory first, an IQ4_NL block costs a store of its two 16-bit tiles and
wgmma's read of them, per weight: on an H100 the Mosaic GEMV then read 6 heads of V2-Lite's
experts' gate and up products in IQ4_NL (19.5 MB) more slowly than in Q8_0 (36.8 MB), whose
blocks go to registers (q8_0_registers.py; docs/batched_gemv.md). Here the
packed bytes take the Q8_0 path's transposing load, and the table lookup writes the fragment:

- `q8_0_registers.thread_words` loads a [32, 64] tile of packed bytes, two GGML blocks of 16
  byte rows. Thread (warp w, lane l) gets, per 8 byte rows r0, the word [b(r, n), b(r, n+1),
  b(r+1, n), b(r+1, n+1)] with r = r0 + 2(l % 4), n = 16w + 2(l / 4).
- Byte b(r, n) holds column n's elements r (low nibble) and r + 16 (high nibble) of its block.
  So the low nibbles of bytes 0 and 2 are column n's elements (r, r+1) of the block's first
  half, a pair of adjacent contraction elements as wgmma's A fragment holds them, and bytes 1
  and 3 are column n + 1's; the high nibbles give the same for the second half. One prmt
  reorders the word's bytes to (0, 2, 1, 3), and iq4_nl_prmt's byte-permute lookup (22
  integer instructions for the word's 8 weights) then writes exactly these four pairs.
- Each half block is one K=16 product, against x's [Bp, 16] half-block tile, as in the
  shared-memory path; the fragment rows come in q8_0_registers.COLUMNS' order, so the scales
  and the output follow q8_0_registers.row_scales and store_rows.

In interpret mode (on a CPU) the operands are the same arrays in the same row order, built with
array operations into a shared-memory staging buffer (interpret mode's wgmma reads A from shared
memory). The PTX runs only compiled; the GPU tests check it.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax._src.lib.mlir import ir

from mla_jax import quant
from mla_jax.ops.mosaic import int8_ptx, iq4_nl_prmt, q8_0_registers

ROWS = q8_0_registers.ROWS  # the fragment's rows: the program's weight columns
HALF = quant.BLOCK // 2  # a half block: the contraction of one product
TILE_ROWS = 2 * HALF  # byte rows of the tile a_operands reads: two blocks
_BYTES_0213 = 0x3120  # prmt selector: the word's bytes in the order (0, 2, 1, 3)


def _operands_compiled(tile_ref, dtype):
  layout = plgpu.Layout.WGMMA
  operand = plgpu.ShapeDtypeStruct((ROWS, HALF), dtype, layout=layout)

  @plgpu.inline_mgpu(
      arg_types=(plgpu.RefType((plgpu.TilingTransform((8, q8_0_registers.SWIZZLE)),
                                plgpu.SwizzleTransform(q8_0_registers.SWIZZLE))),),
      return_type=(operand,) * 4)
  def build(ctx, ref):
    del ctx
    fragments = [int8_ptx.empty_fragment((ROWS, HALF), dtype, layout.to_mgpu())
                 for _ in range(4)]
    # WGMMA layout of [64, 16]: register [0, j, 0, 0, i, 0, ...] holds row 16w + 8i + l/4,
    # columns 8j + 2(l % 4) and the next.
    assert fragments[0][0].shape == (1, 2, 1, 1, 2, 1, 1, 1, 1), fragments[0][0].shape
    pair_type = ir.VectorType.get((2,), mgpu_utils.dtype_to_ir_type(jnp.dtype(dtype)))
    for j, word in enumerate(q8_0_registers.thread_words(ref)):
      block, j_half = divmod(j, 2)
      lo_n, lo_n1, hi_n, hi_n1 = iq4_nl_prmt.decode_register(word, dtype, _BYTES_0213)
      for nibbles, columns in enumerate(((lo_n, lo_n1), (hi_n, hi_n1))):
        regs = fragments[2 * block + nibbles][0]
        for i, pair in enumerate(columns):  # column n, then n + 1: fragment rows 8 apart
          regs[0, j_half, 0, 0, i, 0, 0, 0, 0] = mgpu_utils.bitcast(pair, pair_type)
    return tuple(int8_ptx.fragment(regs, frag_layout) for regs, frag_layout in fragments)

  return build(tile_ref)


def _operands_interpreted(tile_ref, dtype, staging):
  lo, hi = iq4_nl_prmt.decode(tile_ref[...], dtype)  # each [32, 64]
  for block in range(2):
    rows = slice(block * HALF, (block + 1) * HALF)
    for nibbles, values in enumerate((lo, hi)):
      staging.at[2 * block + nibbles][...] = int8_ptx.to_rows(values[rows].T)
  plgpu.commit_smem()
  return tuple(staging.at[k] for k in range(4))


def a_operands(tile_ref, dtype, staging=None):
  """The four K=16 A operands of the two IQ4_NL blocks in `tile_ref` (uint8 [32, 64] packed
  bytes in shared memory, tiled (8, 64) and 64-byte swizzled): (block 0's low-nibble half, its
  high-nibble half, block 1's low half, its high half), each wᵀ [64, 16] in `dtype` in the WGMMA
  layout, rows in q8_0_registers.COLUMNS' order. In interpret mode they are written to
  `staging` (a [4, 64, 16] shared-memory ref), whose four refs are returned."""
  if staging is None:
    return _operands_compiled(tile_ref, dtype)
  return _operands_interpreted(tile_ref, dtype, staging)
