"""Grouped matmul: rows of x sorted by group, each against its group's weight.

  y[r] = x[r] · w[g(r)]ᵀ,   x [M, K], w [G, N, K], group_sizes [G]:

group g owns the next group_sizes[g] rows (negative sizes count as 0); rows past the groups, or
groups past M, are cut at M, and rows in no group give 0 (jax.lax.ragged_dot's contract). w is
layers.Linear's [out, in] per group: the MoE's stacked experts (moe.Experts.grouped, the
prefill).

impl "xla" is jax.lax.ragged_dot_general. XLA GPU (jax 0.11.2) lowers it densely: compiled for
an H200, 6144 rows against 64 experts of 2048 -> 1408 became a copy of x masked per expert
([6144, 64, 2048], 1.6 GB), a transposed copy of all 64 weights and one GEMM over all of them:
64× the FLOPs, and at a 16384-token V2-Lite prefill a 28 GB allocation that an 80 GB H100
holding the model did not have.

impl "pallas" (Triton lowering) reads what a grouped GEMM reads (as MegaBlocks' block-sparse MoE
does; Gale et al. 2023): the rows are cut into tiles of block_m rows that never cross a group
(group_tiles), and a program per (tile, block of N) walks K with its tile's group's weight. A
group of n rows takes ⌈n/block_m⌉ tiles, so ⌈M/block_m⌉ + G + 1 tile slots hold every tile, the
rows in no group as one more (zero) group included; the slots past the last tile do nothing. A
tile's row window is moved back to end at M where it would run past it, its rows outside the
tile masked, so that no load or store leaves x or y.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from mla_jax.ops import device
from mla_jax.ops.common import TRITON_MIN_DOT

IMPLS = ("auto", "xla", "pallas")
_FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16)

# ragged_dot_general contracting x [M, K] with w [G, N, K] over K.
_RAGGED_N_K = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [2]), ([], [])), lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[0])


@dataclasses.dataclass(frozen=True)
class GroupedTuning:
  """The kernel's tile: block_m rows of one group, block_n columns, block_k of K a step."""
  block_m: int
  block_n: int
  block_k: int
  num_warps: int = 4
  num_stages: int = 3


def group_tiles(group_sizes, M: int, block_m: int):
  """(group, start, rows) [T] int32 for T = ⌈M/block_m⌉ + G + 1 tile slots: slot t covers rows
  [start, start + rows) of group `group`, rows ≤ block_m, in order; group G holds the rows in
  no group; slots past the last tile have rows = 0."""
  G = group_sizes.shape[0]
  ends = jnp.minimum(jnp.cumsum(jnp.maximum(group_sizes.astype(jnp.int32), 0)), M)
  starts = jnp.concatenate([jnp.zeros(1, jnp.int32), ends])          # [G+1]: group G is the rest
  sizes = jnp.concatenate([ends, jnp.full(1, M, jnp.int32)]) - starts  # [G+1]
  tiles = -(-sizes // block_m)
  tile_end = jnp.cumsum(tiles)
  t = jnp.arange(pl.cdiv(M, block_m) + G + 1, dtype=jnp.int32)
  group = jnp.searchsorted(tile_end, t, side="right").astype(jnp.int32)  # G + 1 past the end
  g = jnp.minimum(group, G)
  local = t - (tile_end[g] - tiles[g])
  rows = jnp.where(group <= G, jnp.clip(sizes[g] - local * block_m, 0, block_m), 0)
  return g, starts[g] + local * block_m, rows.astype(jnp.int32)


def _kernel(group_ref,  # [T] int32: each tile slot's group (group_tiles)
            start_ref,  # [T] int32: its first row
            rows_ref,   # [T] int32: its rows
            x_ref,      # [M, K]
            w_ref,      # [G, N, K]
            y_ref,      # [M, N]
            *, tuning: GroupedTuning, num_groups: int):
  t, j = pl.program_id(0), pl.program_id(1)
  group, start, rows = group_ref[t], start_ref[t], rows_ref[t]
  bm, bn, bk = tuning.block_m, tuning.block_n, tuning.block_k
  M, K = x_ref.shape
  window = jnp.clip(start, 0, M - bm)  # bm rows that stay inside x and y
  r = window + jnp.arange(bm)
  mine = (r >= start) & (r < start + rows)
  cols = pl.ds(pl.multiple_of(j * bn, bn), bn)
  g = jnp.minimum(group, num_groups - 1)
  precision = jax.lax.Precision.HIGHEST if x_ref.dtype == jnp.float32 else None

  def step(i, acc):
    ks = pl.ds(pl.multiple_of(i * bk, bk), bk)
    xb = pltriton.load(x_ref.at[pl.ds(window, bm), ks], mask=mine[:, None], other=0)
    wb = w_ref[g, cols, ks]                                                # [bn, bk]
    return acc + jax.lax.dot_general(xb, wb, (((1,), (1,)), ((), ())), precision=precision,
                                     preferred_element_type=jnp.float32)

  def store(y):
    pltriton.store(y_ref.at[pl.ds(window, bm), cols], y.astype(y_ref.dtype), mask=mine[:, None])

  zeros = jnp.zeros((bm, bn), jnp.float32)
  pl.when((group < num_groups) & (rows > 0))(lambda: store(jax.lax.fori_loop(0, K // bk, step,
                                                                             zeros)))
  pl.when((group == num_groups) & (rows > 0))(lambda: store(zeros))  # rows in no group


def _pallas(x, w, group_sizes, out_dtype, tuning: GroupedTuning, *, interpret: bool):
  M, _ = x.shape
  G, N, _ = w.shape
  tiles = group_tiles(group_sizes, M, tuning.block_m)
  return pl.pallas_call(
      functools.partial(_kernel, tuning=tuning, num_groups=G),
      grid=(tiles[0].shape[0], N // tuning.block_n),
      out_shape=jax.ShapeDtypeStruct((M, N), out_dtype),
      compiler_params=pltriton.CompilerParams(num_warps=tuning.num_warps,
                                              num_stages=tuning.num_stages),
      interpret=interpret,
      name="mla_grouped_matmul",
  )(*tiles, x, w)


def grouped_matmul(x, w, group_sizes, *, impl: str = "auto", out_dtype=None,
                   interpret: bool = False):
  """x [M, K], w [G, N, K], group_sizes [G] int -> y [M, N] in out_dtype (default x's dtype);
  see the module docstring. impl: "xla", "pallas", or "auto" (the kernel where it runs compiled
  on a GPU and takes the shapes, else XLA). interpret: Pallas' interpret mode (impl="pallas")."""
  _check_args(x, w, group_sizes)
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r}; expected one of {IMPLS}")
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  if impl == "auto":
    impl = "pallas" if device.is_gpu() and unsupported(x, w) is None else "xla"
  if impl == "xla":
    sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
    return jax.lax.ragged_dot_general(x, w, sizes, _RAGGED_N_K, preferred_element_type=out_dtype)
  reason = unsupported(x, w)
  if reason is not None:
    raise ValueError(f"impl='pallas': {reason}")
  return _pallas(x, w, group_sizes, out_dtype, choose_tuning(x, w), interpret=interpret)


def unsupported(x, w) -> str | None:
  """Why the kernel does not take x and w (None if it does): Triton's dots need at least 16
  rows, and N and K multiples of 16; x and w share a float dtype."""
  M, K = x.shape
  _, N, _ = w.shape
  if M < TRITON_MIN_DOT:
    return f"M={M} rows; the kernel needs >= {TRITON_MIN_DOT}"
  if N % TRITON_MIN_DOT or K % TRITON_MIN_DOT:
    return f"N={N}, K={K}; the kernel needs multiples of {TRITON_MIN_DOT}"
  if x.dtype != w.dtype or jnp.dtype(x.dtype) not in map(jnp.dtype, _FLOATS):
    names = ", ".join(jnp.dtype(d).name for d in _FLOATS)
    return f"x.dtype={x.dtype}, w.dtype={w.dtype}; the kernel needs both the same, one of {names}"
  return None


def choose_tuning(x, w) -> GroupedTuning:
  """64-row tiles (fewer where M is smaller), the widest blocks of N (≤ 128) and K (≤ 64) that
  divide them."""
  M, K = x.shape
  N = w.shape[1]
  widest = lambda size, most: next(b for b in (128, 64, 32, 16) if b <= most and size % b == 0)
  block_m = next(b for b in (64, 32, 16) if b <= M)
  return GroupedTuning(block_m=block_m, block_n=widest(N, 128), block_k=widest(K, 64))


def _check_args(x, w, group_sizes):
  if x.ndim != 2 or w.ndim != 3 or x.shape[1] != w.shape[2]:
    raise ValueError(f"x.shape={tuple(x.shape)}, w.shape={tuple(w.shape)}; expected x [M,K] "
                     "and w [G,N,K]")
  if group_sizes.shape != w.shape[:1] or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(f"group_sizes.shape={tuple(group_sizes.shape)} dtype={group_sizes.dtype}; "
                     f"expected [G]=[{w.shape[0]}] integer")
