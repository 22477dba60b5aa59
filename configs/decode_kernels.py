"""Decode-kernel microbenchmark (issue 3): ops.mla_decode, Pallas vs the XLA einsum, on the GPU.

Run by experiments/bench_decode.py: correctness against the reference first, then µs, TB/s of
cache bytes read and the ratio to XLA for every (H, B, S, cache dtype).
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.kind = "decode_kernels"  # experiment: experiments/bench_decode.run(config, workdir)
  config.heads = (16, 128)  # H: V2-Lite has 16, V3 128
  config.batch_seq = ((1, 4096), (1, 16384), (1, 131072), (8, 16384), (64, 4096), (64, 16384))  # (B, S)
  config.kv_lora_rank = 512  # C, latent width
  config.rope_dim = 64  # R, rope width
  config.cache_dtypes = ("bfloat16", "int8")  # latent cache formats
  config.impls = ("xla", "pallas")  # ops.mla_decode impls to time (xla is the baseline)
  config.warmup = 5  # untimed calls before timing
  config.iters = 50  # timed calls; the median is reported
  config.seed = 0  # seed of the random inputs
  return config
