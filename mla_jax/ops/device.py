"""Queries of the device the code is compiled for, which the kernels' heuristics read.

That is the default device, unless the code is traced under an abstract mesh whose abstract
device is a GPU (`jax.sharding.use_abstract_mesh`): then that device, which is how a GPU step is
compiled on a machine without one (tests/helpers.compile_for_h200 compiles for an H200 this
way). Pallas' Triton lowering reads the same abstract device.
"""

from __future__ import annotations

import jax

DEFAULT_NUM_SMS = 132  # H100/H200 SXM: what the heuristics assume where no GPU is attached
_GPU_PLATFORMS = ("gpu", "cuda")


def _abstract_gpu():
  """The abstract device of the current abstract mesh if it is a GPU, else None."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  return device if getattr(device, "platform", None) in _GPU_PLATFORMS else None


def is_gpu() -> bool:
  """Whether the code is compiled for a GPU: Pallas kernels run compiled, not interpreted."""
  return _abstract_gpu() is not None or jax.default_backend() == "gpu"


def platform() -> str:
  """"gpu" where is_gpu(), else jax.default_backend(): what impl="auto" is resolved for."""
  return "gpu" if is_gpu() else jax.default_backend()


def num_sms() -> int:
  """Streaming multiprocessors of the target GPU; DEFAULT_NUM_SMS where there is none
  (interpret mode on a CPU)."""
  abstract = _abstract_gpu()
  if abstract is not None:
    return abstract.num_cores or DEFAULT_NUM_SMS
  device = jax.devices()[0]
  if device.platform == "gpu" and getattr(device, "core_count", None):
    return device.core_count
  return DEFAULT_NUM_SMS


def is_hopper() -> bool:
  """Whether the target is a compute capability 9.0 GPU (TMA and wgmma): an abstract H100/H200,
  or the default device."""
  abstract = _abstract_gpu()
  if abstract is not None:
    return any(name in abstract.device_kind for name in ("H100", "H200"))
  device = jax.devices()[0]
  return device.platform == "gpu" and str(getattr(device, "compute_capability", "")) == "9.0"
