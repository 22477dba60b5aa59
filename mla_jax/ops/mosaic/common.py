"""What the Mosaic GPU kernels share: shared-memory buffers laid out for TMA and wgmma, the wait
for their inputs that lets them launch early, and running in Mosaic GPU's interpret mode, on a
CPU, as well as compiled on a Hopper GPU."""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu


def smem(shape, dtype, swizzle: int | None = None):
  """A shared-memory buffer tiled (8 rows) and swizzled on its minor axis, as TMA and wgmma read
  it. swizzle: bytes of a swizzled row; None: the widest that the minor axis fills."""
  bits = jnp.dtype(dtype).itemsize * 8
  swizzle = swizzle or plgpu.find_swizzle(shape[-1] * bits)
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, swizzle * 8 // bits)),
                                              plgpu.SwizzleTransform(swizzle)))


def accumulate(acc, product, interpret: bool):
  """acc + what the wgmmas `product(acc_ref)` add: in place on the GPU (run_state). Mosaic GPU's
  interpret mode cannot run run_state; there the product goes to a fresh accumulator that is
  then added (the same sum). acc may be a tuple of arrays, product's argument then a tuple of
  refs."""
  if isinstance(acc, tuple):
    return _accumulate_all(acc, product, interpret)
  return _accumulate_all((acc,), lambda refs: product(refs[0]), interpret)[0]


def _accumulate_all(accs, product, interpret):
  if interpret:
    def fresh(*refs):
      product(refs)
      return tuple(ref[...] for ref in refs)
    added = pl.run_scoped(fresh, *[plgpu.ACC(a.shape, jnp.float32) for a in accs])
    return tuple(a + b for a, b in zip(accs, added))
  return tuple(pl.run_state(product)(tuple(plgpu.ACC.init(a) for a in accs)))


def interpret_params(interpret: bool):
  """plgpu.kernel's `interpret` argument."""
  return plgpu.InterpretGPUParams() if interpret else False


def wait_for_inputs(interpret: bool):
  """Waits until the kernels that this one follows have finished and their writes are visible:
  griddepcontrol.wait, Hopper's programmatic dependent launch (PDL; CUDA programming guide,
  "Programmatic Dependent Launch and Synchronization"). A Mosaic kernel that calls it is marked
  as using PDL, and XLA may then launch it as soon as the kernel before it has run its last
  blocks, inside its command buffers too, so that the launch and the kernel's prologue overlap
  that kernel's tail. So the call must come before the kernel reads anything from memory. Without
  PDL it returns at once; interpret mode has no grids to wait for."""
  if not interpret:
    plgpu.griddepcontrol_wait()
