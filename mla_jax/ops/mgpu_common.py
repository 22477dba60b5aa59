"""What the Mosaic GPU kernels (decode_mgpu, decode_mgpu_heads, gemv_mgpu) share: running in
Mosaic GPU's interpret mode, on a CPU, as well as compiled on a Hopper GPU."""

import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu


def accumulate(acc, product, interpret: bool):
  """acc + what the wgmma `product(acc_ref)` adds: in place on the GPU (run_state). Mosaic GPU's
  interpret mode cannot run run_state; there the product goes to a fresh accumulator that is
  then added (the same sum)."""
  if interpret:
    def fresh(acc_ref):
      product(acc_ref)
      return acc_ref[...]
    return acc + pl.run_scoped(fresh, plgpu.ACC(acc.shape, jnp.float32))
  return pl.run_state(product)(plgpu.ACC.init(acc))


def interpret_params(interpret: bool):
  """plgpu.kernel's `interpret` argument."""
  return plgpu.InterpretGPUParams() if interpret else False
