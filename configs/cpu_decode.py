"""CPU decode microbenchmark (issue 5): the cache-shard path vs the whole-cache einsum and a
head-parallel GEMV formulation, on this machine's CPU, per layer at V2-Lite shapes.

Run by experiments/bench_cpu_decode.py: ms per layer, GB/s of cache bytes, the ratios and the
memory floor (cache bytes over read bandwidth measured in the same run), with a plot.
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.kind = "cpu_decode"  # experiment: experiments/bench_cpu_decode.run(config, workdir)
  config.batch_size = 1  # B
  config.heads = 16  # H (V2-Lite)
  config.kv_lora_rank = 512  # C, latent width
  config.rope_dim = 64  # R, rope width
  config.seq_lens = (128, 512, 2048, 8192, 16384, 65536)  # S, cache lengths
  config.cache_dtypes = ("bfloat16", "float32", "int8")  # latent cache formats
  # (a) whole-cache einsum, (b) head-parallel GEMVs, (c) the shard path (impl="cpu")
  config.formulations = ("xla", "heads", "cpu")
  config.shard_size = 0  # cache entries per shard; 0 uses the path's heuristic
  config.reps = 10  # timed calls per formulation, alternating between formulations
  config.seed = 0  # seed of the random inputs
  config.plot = True  # write the speedup-vs-context plot
  return config
