"""Queries of the default device that the kernels' heuristics read."""

from __future__ import annotations

import jax

DEFAULT_NUM_SMS = 132  # H100/H200 SXM: what the heuristics assume where no GPU is attached


def num_sms() -> int:
  """Streaming multiprocessors of the default GPU; DEFAULT_NUM_SMS where there is none
  (interpret mode on a CPU)."""
  device = jax.devices()[0]
  if device.platform == "gpu" and getattr(device, "core_count", None):
    return device.core_count
  return DEFAULT_NUM_SMS


def is_hopper() -> bool:
  """Whether the default device is a compute capability 9.0 GPU (TMA and wgmma)."""
  device = jax.devices()[0]
  return device.platform == "gpu" and str(getattr(device, "compute_capability", "")) == "9.0"
