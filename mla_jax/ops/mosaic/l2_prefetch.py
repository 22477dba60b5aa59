"""L2 prefetch from inside a Mosaic GPU kernel: it brings into the GPU's L2 cache the arrays that
the kernels after it will read.

A B=1 decode layer is a chain of short kernels whose every step waits for its loads, so they
read HBM at a fraction of its bandwidth: XLA's row reductions over a projection's weights at about
2 TB/s of the H200's 4.8 (docs/decode_step.md). While the split-KV kernel runs, HBM is mostly idle.
Its programs can use that time to issue TMA prefetches (`cp.async.bulk.prefetch.tensor.L2`,
`plgpu.async_prefetch`) of the weights that the next kernels read, so that those read them from
L2. Issued by the split's own programs it did not shorten a 27-layer V2-Lite token on an H100
(docs/decode_step.md); the launch with a program an SM (launched) is not timed.

A prefetch is only a hint: it writes nothing and returns nothing, and L2 is the GPU's point of
coherence, so it needs no ordering with the kernels around it and changes no value; the kernel
issues it first thing, before it waits for its inputs. Mosaic GPU's interpret mode skips it.
"""

from __future__ import annotations

import math

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from mla_jax.ops import device

BOX = 256  # a TMA box holds at most 256 elements along each axis
_WIDTHS = (256, 128, 64, 32, 16)


def views(arrays) -> tuple[jax.Array, ...]:
  """The leaves of `arrays` (a pytree: arrays, quant.QuantizedTensor) as 2-D row-major views
  [size / W, W], W the widest of 256, 128, ... 16 elements that divides the leaf and makes a row a
  multiple of 16 bytes (TMA's unit); a reshape of a contiguous array, so no copy. A leaf that no
  W divides is left out: the hint covers what it can."""
  out = []
  for leaf in jax.tree.leaves(arrays):
    width = next((w for w in _WIDTHS if leaf.size % w == 0
                  and w * leaf.dtype.itemsize % 16 == 0), None)
    if width is not None:
      out.append(leaf.reshape(leaf.size // width, width))
  return tuple(out)


def issue(refs, program, programs: int):
  """Prefetches the views `refs` (GMEM refs of views()) into L2 in boxes of BOX rows (a view's
  last box may be shorter): the views' boxes counted in order, box k by the program k mod
  programs (program: this program's index, a traced int32), so that the programs share the
  issue; a loop over a view's whole boxes, its partial box on its own."""
  k0 = 0
  for ref in refs:
    rows = ref.shape[0]
    whole = rows // BOX

    def prefetch(j, carry, ref=ref):
      plgpu.async_prefetch(ref.at[pl.ds(pl.multiple_of(j * BOX, BOX), BOX)])
      return carry

    first = lax.rem(program - k0 % programs + programs, programs)
    lax.fori_loop(0, pl.cdiv(whole - first, programs),
                  lambda n, c: prefetch(first + n * programs, c), None)
    if rows % BOX:
      plgpu.async_prefetch(ref.at[pl.ds(whole * BOX, rows % BOX)],
                           predicate=program == (k0 + whole) % programs)
    k0 += pl.cdiv(rows, BOX)


def widened(grid, axis: int, programs: int) -> tuple[int, ...]:
  """grid with axis `axis` lengthened, if need be, to as many programs as fit in `programs`
  (the SMs: one wave, so that no program waits for another to finish)."""
  others = math.prod(grid) // grid[axis]
  return (*grid[:axis], max(grid[axis], programs // others), *grid[axis + 1:])


def launched(kernel, operands: tuple, prefetch, grid, grid_names, *, axis: int,
             thread_name=None):
  """(kernel, grid, operands) for plgpu.kernel, so that its programs prefetch `prefetch` (a
  pytree of arrays) into L2 before they run kernel: unchanged when there is nothing to prefetch.
  Otherwise the views() follow the operands, axis `axis` of the grid (axes `grid_names`) is
  widened to a program an SM (the programs past its length only prefetch), and every program
  issues its share (issue), from one warpgroup if the kernel has several (thread_name). A short
  cache's split has few programs (3 for 192 slots), each of which would issue about 70 boxes of
  a layer's weights through its SM's one TMA unit; widened, each issues one or two."""
  extra = views(prefetch)
  if not extra:
    return kernel, grid, operands
  wide = widened(grid, axis, device.num_sms())
  n = len(operands)

  def prefetching(*refs, **kwargs):
    program = lax.axis_index(grid_names[0])
    for length, name in zip(wide[1:], grid_names[1:]):
      program = program * length + lax.axis_index(name)
    start = lambda: issue(refs[n:n + len(extra)], program, math.prod(wide))
    if thread_name is None:
      start()
    else:
      pl.when(lax.axis_index(thread_name) == 0)(start)
    run = lambda: kernel(*refs[:n], *refs[n + len(extra):], **kwargs)
    pl.when(lax.axis_index(grid_names[axis]) < grid[axis])(run)

  return prefetching, wide, (*operands, *extra)
