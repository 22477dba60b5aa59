"""Context-parallel decode benchmark: the cache split over a device mesh vs one device.

experiments/bench_parallel.py: parallel.mla_decode_sharded (each merge) against ops.mla_decode on
one device, then the merges alone, on a mesh of all devices along "kv". On one GPU it is the cost
of the shard_map wrapper. A 4-device CPU mesh: XLA_FLAGS=--xla_force_host_platform_device_count=4
before the command (docs/parallel.md).
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.kind = "parallel_decode"  # experiment: experiments/bench_parallel.py
  config.mesh_size = 0  # devices on the "kv" axis; 0: all of them
  config.num_heads = 16  # H (V2-Lite)
  config.shapes = ((1, 16384), (8, 16384))  # (B, S) of the decode table; C=512, R=64
  config.formats = ("bf16",)  # latent cache formats: "bf16", "float32", "int8"
  config.impl = "auto"  # each device's ops.mla_decode impl
  config.combines = ("psum", "gather")  # merges of parallel.MERGES, timed side by side
  # (B, H) of the merge-only table: partials [B,H,512] float32 per device
  config.merge_shapes = ((1, 16), (8, 16), (64, 16), (1, 128), (8, 128), (64, 128))
  config.merge_sets = 4  # rotated partial sets of the merge-only table
  config.rounds = 15  # alternating rounds of the formulations
  config.calls_per_block = 5  # timed calls per formulation per round, after one untimed call
  config.profile_runs = 5  # calls run under the profiler for the device time (GPU only)
  config.rotate_bytes = 256 << 20  # bytes of rotating decode input sets, several times an L2
  config.max_sets = 16  # most decode input sets per case
  config.seed = 0  # seed of the random inputs
  # Goals, checked in the report: (label, what, value expression over the rows, "<=" | ">=",
  # target); experiments/harness.goal_value says what the expressions may use.
  config.goals = (
      ("1", "one-device mesh: the sharded call (psum) over the unsharded one, worst case",
       "max(r['psum_over_single'] for r in rows(devices=1))", "<=", 1.05),
  )
  return config
