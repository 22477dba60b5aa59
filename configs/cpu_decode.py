"""CPU decode benchmark: the cache-shard path vs the whole-cache einsum and head-parallel GEMVs.

experiments/bench_cpu_decode.py, on this machine's CPU, one layer at V2-Lite shapes: ms per call,
GB/s of cache bytes, the ratios and the memory floor (cache bytes over read bandwidth measured in
the same run), with a plot. A quick run: --config.seq_lens='(128,2048,16384)'
--config.formats='("bfloat16","int8")' --config.seconds_per_case=0.7 --config.partial_fills='()'.
"""

import ml_collections
from ml_collections import config_dict


def get_config():
  config = ml_collections.ConfigDict()
  config.kind = "cpu_decode"  # experiment: experiments/bench_cpu_decode.py
  config.batch_size = 1  # B
  config.num_heads = 16  # H (V2-Lite)
  config.kv_lora_rank = 512  # C, latent width
  config.rope_dim = 64  # R, rope width
  config.seq_lens = (128, 512, 2048, 8192, 16384, 65536)  # S, cache lengths
  config.formats = ("bfloat16", "float32", "int8")  # latent cache formats
  config.seconds_per_case = 2.0  # timed budget per (format, S); rounds = budget / one round
  config.calls_per_block = 3  # timed calls per formulation per round, after one untimed call
  config.min_rounds = 7  # fewest alternating rounds of the three formulations
  config.max_rounds = 201  # most rounds
  # passes over all cases, each timing a share of every case's rounds: load from other jobs
  # then slows a few rounds of many cases rather than all the rounds of one
  config.passes = 3
  config.shard_size = config_dict.placeholder(int)  # cache entries per shard; None: the plan's
  # (S, length): a long cache holding a short sequence, as MLAttention's cache is during
  # generation; bytes and floors count the live rows only
  config.partial_fills = ((65536, 4096),)
  config.rotate_bytes = 80 << 20  # bytes of rotating input copies, > the 32 MB L3 of 2-core hosts
  config.max_sets = 256  # most input copies per case
  config.bandwidth_bytes = 256 << 20  # bytes of the array summed to measure read bandwidth
  config.gemm_size = 2048  # n of the n×n GEMM that measures the compute rate
  config.seed = 0  # seed of the random inputs
  config.plot = True  # write the speedup-vs-context plot
  # Goals, checked in the report: (label, what, value expression over the rows, "<=" | ">=",
  # target); experiments/harness.goal_value says what the expressions may use.
  config.goals = (
      ("1", "S=16384 float32: shard time over the compute floor",
       "row(format='float32', S=16384)['shard_over_compute_floor']", "<=", 1.5),
      ("2", "S=16384 bf16: shard time over the compute floor",
       "row(format='bfloat16', S=16384)['shard_over_compute_floor']", "<=", 1.5),
      ("3", "S ≥ 8192: int8 speedup over bf16 (shard path), worst S",
       "min(r['shard_ms'] / row(format='int8', S=r['S'])['shard_ms'] "
       "for r in rows(format='bfloat16') if r['S'] >= 8192)", ">=", 1.2),
      ("4", "S=128: shard time over einsum time, worst format",
       "max(r['shard_ms'] / r['einsum_ms'] for r in rows(S=128))", "<=", 1.05),
      ("5", "bf16: speedup over head-parallel at the longest S over that at the shortest",
       "rows(format='bfloat16')[-1]['shard_vs_head_parallel'] / "
       "rows(format='bfloat16')[0]['shard_vs_head_parallel']", ">", 1.0),
  )
  return config
