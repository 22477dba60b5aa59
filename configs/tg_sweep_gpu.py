"""tg sweep on the lent GPU (H200): a 27-layer DeepSeek-V2-Lite attention stack in bfloat16, B=1,
tg64 at pp128 … pp131072: standard/xla vs absorbed/xla vs absorbed/pallas.

The 27-layer standard cache at pp131072 is 36 GB (5120 bf16 elements a token a layer), the latent
cache 4 GB; prefill costs grow like N² and dominate the long prompts, so time_budget_s skips the
lengths that would not finish inside one device call.
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.kind = "tg_sweep"  # experiment: tg@pp sweep (experiments/sweep.py)
  config.preset = "deepseek_v2_lite"  # MLAConfig preset: deepseek_v2_lite | deepseek_v3
  config.num_layers = 27  # attention layers in the stack (all of V2-Lite's)
  config.mla_overrides = ""  # other MLAConfig fields, "name=value,..."
  config.batch_size = 1  # B sequences decoded together; t/s counts all B
  # pp: prompt lengths N, one table row each
  config.prompt_lengths = (128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
  config.n_gen = 64  # tg: decode steps timed per rep (test name tg<n_gen>@pp<N>)
  config.reps = 3  # timed reps of n_gen steps; tg t/s is their mean ± std
  config.warmup_reps = 1  # untimed reps after compiling, before timing
  config.dtype = "bfloat16"  # compute dtype of activations
  config.param_dtype = "bfloat16"  # dtype of the random weights
  config.cache_dtype = "bfloat16"  # default cache dtype; an impl overrides it with ":cache=int8"
  # Implementations "layer/backend[:cache=dtype][:option=value]" (experiments/model.py).
  config.impls = "standard/xla,absorbed/xla,absorbed/pallas"
  # Speedup columns "candidate vs baseline", comma-separated: t/s(candidate) / t/s(baseline).
  config.compare = "absorbed/xla vs standard/xla,absorbed/pallas vs standard/xla"
  config.gate_reference = "standard/xla"  # decode output every impl must match at the first N
  # Gate tolerance on ‖attn − ref‖/‖ref‖ (all layers' attention outputs), keyed by the least
  # precise dtype an impl uses (compute or cache).
  config.gate_rtol = ml_collections.ConfigDict(
      {"float32": 1e-3, "float16": 2e-2, "bfloat16": 5e-2, "int8": 5e-2})
  config.prefill_chunk = 2048  # longest prefill chunk (tokens per call)
  config.prefill_scores_bytes = 4 << 30  # bytes allowed for a chunk's [B,T,H,S] f32 scores
  config.time_budget_s = 330.0  # skip prompt lengths predicted to end past this (0: no limit)
  config.seed = 0  # seed of the weights (layer i uses seed+i) and of the prompt
  config.plot = True  # write plot.png at the end
  return config
