"""Decode-kernel microbenchmark (issue 3): ops.mla_decode, Pallas vs the XLA einsum, on the GPU.

Run by experiments/bench_decode.py (fields as in its FULL): correctness against the reference
first, then µs, TB/s of cache bytes read and the ratio to XLA for every (H, B, S, cache format).
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.kind = "decode_kernels"  # experiment: experiments/bench_decode.run(config, workdir)
  config.heads = (16, 128)  # H: V2-Lite has 16, V3 128
  # (B, S): batch and cache length; C=512 and R=64 are fixed by the module
  config.shapes = ((1, 4096), (1, 16384), (1, 131072), (8, 16384), (64, 4096), (64, 16384))
  config.formats = ("bf16", "int8")  # latent cache formats (int8: quant.Int8Rows)
  config.variants = ml_collections.ConfigDict({"pallas": {}})  # name -> decode_gpu.mla_decode options
  config.reps = 10  # enqueued calls per trial (rotating input sets larger than L2)
  config.trials = 5  # timed trials; the median is reported
  config.check = True  # compare every variant with the reference before timing
  config.seed = 0  # seed of the random inputs
  return config
