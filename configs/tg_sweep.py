"""tg@pp sweep sized for a CPU (`make run`): standard vs absorbed vs the CPU shard path.

Sized to finish in under 5 minutes on a 2-core machine: the costly part is prefill, which
attends every prompt token over the whole cache (O(N·S) per layer, absorbed more than standard),
so the stack is one V2-Lite-shaped layer and prompts stop at 8192 (pp8192 alone is ~3 minutes of
prefill on a busy 2-core machine); time_budget_s skips a length predicted to overrun. float32,
because XLA CPU runs bfloat16 einsums several times slower than float32.
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.kind = "tg_sweep"  # experiment: the tg@pp sweep (experiments/sweep.py)
  config.preset = "deepseek_v2_lite"  # MLAConfig preset: deepseek_v2_lite | deepseek_v3
  config.num_layers = 1  # attention layers in the stack (V2-Lite has 27; 1 keeps CPU prefill short)
  config.mla_overrides = ""  # other MLAConfig fields, "name=value,..." (e.g. "num_heads=8")
  config.batch_size = 1  # B sequences decoded together; t/s counts all B
  config.prompt_lengths = (512, 2048, 8192)  # pp: prompt lengths N, one table row each
  config.n_gen = 32  # tg: decode steps timed per rep (test name tg<n_gen>@pp<N>)
  config.reps = 5  # timed reps of n_gen steps; tg t/s is their mean ± std
  config.warmup_reps = 1  # untimed reps after compiling, before timing
  config.dtype = "float32"  # compute dtype of activations
  config.param_dtype = "float32"  # dtype of the random weights
  config.cache_dtype = "float32"  # default cache dtype; an impl overrides it with ":cache=int8"
  # Implementations "layer/backend[:cache=dtype][:option=value]" (experiments/model.py).
  config.impls = "standard/xla,absorbed/xla,absorbed/cpu"
  # Speedup columns "candidate vs baseline", comma-separated: t/s(candidate) / t/s(baseline).
  config.compare = ("absorbed/xla vs standard/xla,absorbed/cpu vs standard/xla,"
                    "absorbed/cpu vs absorbed/xla")
  config.gate_reference = "standard/xla"  # decode output every impl must match at the first N
  # Gate tolerance on ‖attn − ref‖/‖ref‖ (all layers' attention outputs), keyed by the least
  # precise dtype an impl uses (compute or cache).
  config.gate_rtol = ml_collections.ConfigDict(
      {"float32": 1e-3, "float16": 2e-2, "bfloat16": 5e-2, "int8": 5e-2})
  config.prefill_chunk = 2048  # longest prefill chunk (tokens per call)
  config.prefill_scores_bytes = 1 << 30  # bytes allowed for a chunk's [B,T,H,S] f32 scores
  config.time_budget_s = 270.0  # skip prompt lengths predicted to end past this (0: no limit)
  config.seed = 0  # seed of the weights (layer i uses seed+i) and of the prompt
  config.plot = True  # write <name>.png (t/s and speedup against prompt length) at the end
  return config
