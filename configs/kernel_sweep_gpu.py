"""A seeded random sweep through every GPU kernel path against float64 oracles.

The paths: decode on Triton, Mosaic few-heads, int8 and many-heads; the GEMV on Triton and Mosaic
over bf16, q8_0 and iq4_nl weights; the grouped matmul in float32 and bf16.

experiments/kernel_sweep.py: config.cases cases a path, compiled on the GPU, with the slots past
each row's length poisoned (NaN, ±Inf, stale). Without a GPU the kernels run interpreted: a
smoke run, e.g. --config.cases=2 --config.paths=triton,triton_bf16. Each case compiles its
kernels anew, so on a GPU host the paths run in parallel processes: --config.workers=10.
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.kind = "kernel_sweep"  # experiment: experiments/kernel_sweep.py
  config.cases = 60  # cases drawn per path (12 paths: 720 cases)
  config.paths = ""  # comma-separated paths to run ("" all): triton, mosaic, triton_q8_0, ...
  config.seed = 0  # seed of the case draws (each path draws from the seed and its own name)
  config.workers = 1  # processes running paths side by side (spawned; e.g. 10 on a GPU host)
  return config
