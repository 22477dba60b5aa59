"""tg@pp sweep on a GPU: 27 DeepSeek-V2-Lite attention layers, bf16, B=1, pp128 … pp131072.

tg64 at each prompt length: standard/xla vs absorbed/xla vs absorbed/pallas.

The 27-layer standard cache at pp131072 is 36 GB (5120 bf16 elements a token a layer), the latent
cache 4 GB; prefill costs grow like N² and dominate the long prompts, so time_budget_s skips the
lengths that would not finish inside one device call. Fields not set here, and their meaning,
are in configs/tg_sweep.py.
"""

from configs import tg_sweep


def get_config():
  config = tg_sweep.get_config()
  config.num_layers = 27  # attention layers in the stack (all of V2-Lite's)
  config.prompt_lengths = (128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
  config.n_gen = 64  # tg: decode steps timed per rep
  config.reps = 3  # timed reps of n_gen steps
  config.dtype = "bfloat16"  # compute dtype of activations
  config.param_dtype = "bfloat16"  # dtype of the random weights
  config.cache_dtype = "bfloat16"  # default cache dtype
  config.impls = "standard/xla,absorbed/xla,absorbed/pallas"
  config.compare = "absorbed/xla vs standard/xla,absorbed/pallas vs standard/xla"
  config.prefill_scores_bytes = 4 << 30  # bytes allowed for a chunk's [B,T,H,S] f32 scores
  config.time_budget_s = 330.0  # skip prompt lengths predicted to end past this (0: no limit)
  return config
