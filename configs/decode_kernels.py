"""Decode-kernel benchmark: ops.mla_decode's Pallas kernels vs the XLA einsum, on the GPU.

experiments/bench_decode.py: correctness against the reference first, then µs (device and wall
time), TB/s of cache bytes read and the ratio to XLA for every (H, B, S, cache format). A quick
run: --config.heads='(16,)' --config.shapes='((1,16384),(8,16384))' --config.reps=5
--config.trials=3. Without a GPU: --config.interpret=True and tiny shapes (the kernels then run
in Pallas's interpret mode, which checks the code path, not the speed).
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.kind = "decode_kernels"  # experiment: experiments/bench_decode.py
  config.heads = (16, 128)  # H: V2-Lite has 16, V3 128
  # (B, S): batch and cache length; C=512 and R=64 are fixed by the model
  config.shapes = ((1, 4096), (1, 16384), (1, 131072), (8, 16384), (64, 4096), (64, 16384))
  config.formats = ("bf16", "int8")  # latent cache formats (int8: quant.Int8Rows)
  # Variants timed against the XLA einsum: name -> {"impl": "pallas" (default) | "xla" | "cpu",
  # "lowering": None (the dispatcher's choice) | "triton" | "mosaic", "tuning": {knob: value}
  # overriding that lowering's planned tuning, e.g. {"num_splits": 128}}
  config.variants = ml_collections.ConfigDict({"pallas": {}})
  config.interpret = False  # run the Pallas kernels in interpret mode (no GPU needed; slow)
  config.reps = 10  # enqueued calls per timed trial (more if a trial would last < min_trial_s)
  config.trials = 5  # timed trials; the median is reported
  config.min_trial_s = 0.03  # shortest trial, so that dispatch and clock ramps do not count
  config.profile_runs = 5  # calls run under the profiler for the device time
  config.rotate_bytes = 256 << 20  # bytes of rotating input sets, several times the 50-60 MB L2
  config.max_sets = 64  # most input sets (copies) per case
  config.check = True  # compare every variant with the reference before timing
  config.seed = 0  # seed of the random inputs
  # Goals, checked in the report: (label, what, value expression over the rows, "<=" | ">=",
  # target); experiments/harness.goal_value says what the expressions may use.
  config.goals = (
      ("1a", "H=16 bf16 B=64,S=16384 TB/s",
       "row(H=16, B=64, S=16384, format='bf16')['pallas_tbps']", ">=", 4.0),
      ("1b", "H=16 bf16 B=8,S=16384 TB/s",
       "row(H=16, B=8, S=16384, format='bf16')['pallas_tbps']", ">=", 3.5),
      ("1c", "H=16 bf16 B=1,S=131072 TB/s",
       "row(H=16, B=1, S=131072, format='bf16')['pallas_tbps']", ">=", 3.5),
      ("2a", "H=16 bf16 B=1,S=131072 speedup over XLA",
       "row(H=16, B=1, S=131072, format='bf16')['pallas_speedup_vs_xla']", ">=", 2.0),
      ("2b", "H=16 bf16 B=64,S=16384 speedup over XLA",
       "row(H=16, B=64, S=16384, format='bf16')['pallas_speedup_vs_xla']", ">=", 2.0),
      ("3", "H=16 B=64,S=16384 int8 speedup over bf16",
       "row(H=16, B=64, S=16384, format='bf16')['pallas_us']"
       " / row(H=16, B=64, S=16384, format='int8')['pallas_us']", ">=", 1.6),
      ("4", "H=128 bf16 B=64,S=16384 µs",
       "row(H=128, B=64, S=16384, format='bf16')['pallas_us']", "<=", 750.0),
  )
  return config
