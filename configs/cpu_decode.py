"""CPU decode microbenchmark (issue 5): the cache-shard path vs the whole-cache einsum and a
head-parallel GEMV formulation, on this machine's CPU, per layer at V2-Lite shapes.

Run by experiments/bench_cpu_decode.py (fields as in its FULL): ms per layer, GB/s of cache
bytes, the ratios and the memory floor (cache bytes over read bandwidth measured in the same
run), with a plot.
"""

import ml_collections
from ml_collections import config_dict


def get_config():
  config = ml_collections.ConfigDict()
  config.kind = "cpu_decode"  # experiment: experiments/bench_cpu_decode.run(config, workdir)
  config.batch_size = 1  # B
  config.num_heads = 16  # H (V2-Lite)
  config.kv_lora_rank = 512  # C, latent width
  config.rope_dim = 64  # R, rope width
  config.seq_lens = (128, 512, 2048, 8192, 16384, 65536)  # S, cache lengths
  config.formats = ("bfloat16", "float32", "int8")  # latent cache formats
  config.seconds_per_case = 2.0  # timed budget per (format, S); rounds = budget / one round
  config.min_rounds = 7  # fewest alternating rounds of the three formulations
  config.max_rounds = 201  # most rounds
  config.shard_size = config_dict.placeholder(int)  # cache entries per shard; None: heuristic
  config.partial_fills = ((65536, 4096),)  # (S, length): a long cache holding a short sequence
  config.plot = True  # write the speedup-vs-context plot
  return config
