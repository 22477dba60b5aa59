"""tg@pp sweep on a CPU in bfloat16: `make run`'s sweep with bf16 activations, weights and cache.

The same one V2-Lite layer, B=1 and prompts as configs/tg_sweep.py, with the two absorbed paths
(whole-cache einsum, CPU shard path) timed in alternating reps against standard/xla. XLA CPU runs
bf16 products by converting their operands (docs/cpu_decode.md), so this is the shard path's case
for reading a 16-bit cache a shard at a time. Fields not set here are configs/tg_sweep.py's.
"""

from configs import tg_sweep


def get_config():
  config = tg_sweep.get_config()
  config.dtype = "bfloat16"  # compute dtype of activations
  config.param_dtype = "bfloat16"  # dtype of the random weights
  config.cache_dtype = "bfloat16"  # default cache dtype
  # Speedup columns "candidate vs baseline": both absorbed paths over standard, then cpu over xla.
  config.compare = ("absorbed/xla vs standard/xla,absorbed/cpu vs standard/xla,"
                    "absorbed/cpu vs absorbed/xla")
  config.time_budget_s = 400.0  # skip prompt lengths predicted to end past this (0: no limit)
  return config
