"""The whole decode step on a GPU: 27 DeepSeek-V2-Lite attention layers, bf16, µs per token.

experiments/decode_step.py: a correctness gate against float32 first, then per (implementation,
batch, prompt length) the µs per token of 64 steps inside one jit, the byte floor (weights and
cache read at floor_tbps), the kernels each layer launches, and the µs per token when each step
is its own jitted call. A quick run: --config.shapes='((1,128),(1,16384),(8,16384))'.
Without a GPU: --config.num_layers=2 --config.prompt_lengths='(64,)' --config.impls=absorbed/xla
--config.dtype=float32 --config.param_dtype=float32 --config.cache_dtype=float32
(the path, not the speed).
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.kind = "decode_step"  # experiment: experiments/decode_step.py
  config.preset = "deepseek_v2_lite"  # MLAConfig preset: deepseek_v2_lite | deepseek_v3
  config.num_layers = 27  # attention layers in the stack (all of V2-Lite's)
  config.mla_overrides = ""  # other MLAConfig fields, "name=value,..." (e.g. "num_heads=8")
  # Implementations "layer/backend[:cache=dtype][:option=value]" (experiments/model.py).
  # decode_lowering=triton: the split on Triton instead of Mosaic (docs/decode_step.md);
  # layer_kernel=True: each layer's attention half as one persistent kernel (layer_step.py).
  config.impls = ("standard/xla,absorbed/xla,absorbed/pallas,absorbed/pallas:cache=int8,"
                  "absorbed/pallas:decode_lowering=triton,absorbed/pallas:gemv_lowering=mosaic,"
                  "absorbed/pallas:layer_kernel=True")
  config.batch_sizes = (1, 8)  # B: sequences decoded together (the gate runs at the first)
  config.prompt_lengths = (128, 2048, 16384, 65536)  # S: valid cache entries a row holds
  # (B, S) pairs to time instead of every batch × prompt length, e.g. ((1, 128), (8, 16384)).
  config.shapes = ()
  config.n_gen = 64  # decode steps inside one jit per timed rep
  config.reps = 5  # timed reps; µs per token is their median
  config.dispatch_steps = 16  # single-step jitted calls timed for the dispatched µs per token
  config.dtype = "bfloat16"  # compute dtype of activations
  config.param_dtype = "bfloat16"  # dtype of the random weights
  config.cache_dtype = "bfloat16"  # default cache dtype; an impl overrides it with ":cache=int8"
  config.floor_tbps = 4.0  # HBM bytes per µs·1e-6 of the byte floor (TB/s)
  config.max_cache_gb = 100.0  # skip (impl, B, S) whose caches would be larger
  config.gate_prompt_len = 128  # prefill length of the correctness gate
  # Gate tolerance on ‖y − y_ref‖/‖y_ref‖ after 27 layers, keyed by the least precise dtype.
  config.gate_rtol = ml_collections.ConfigDict(
      {"float32": 1e-3, "float16": 2e-2, "bfloat16": 5e-2, "int8": 5e-2})
  config.seed = 0  # seed of the weights, the gate's prompt and the cache contents
  # Goals, checked in the report: (label, what, value expression over the rows, op, target);
  # experiments/harness.goal_value says what the expressions may use.
  config.goals = (
      ("1a", "absorbed/pallas B=1 pp128 × floor",
       "row(impl='absorbed/pallas', batch=1, prompt_len=128)['x_floor']", "<=", 2.0),
      ("1b", "absorbed/pallas B=1 pp16384 × floor",
       "row(impl='absorbed/pallas', batch=1, prompt_len=16384)['x_floor']", "<=", 2.0),
      ("2", "absorbed/pallas kernels per layer (B=1, pp16384)",
       "row(impl='absorbed/pallas', batch=1, prompt_len=16384)['kernels_per_layer']", "<=", 8),
      ("3a", "absorbed/pallas speedup over standard/xla, B=1 pp16384",
       "row(impl='standard/xla', batch=1, prompt_len=16384)['us_per_token']"
       " / row(impl='absorbed/pallas', batch=1, prompt_len=16384)['us_per_token']", ">=", 2.5),
      ("3b", "absorbed/pallas speedup over standard/xla, B=1 pp128",
       "row(impl='standard/xla', batch=1, prompt_len=128)['us_per_token']"
       " / row(impl='absorbed/pallas', batch=1, prompt_len=128)['us_per_token']", ">=", 1.0),
      ("4", "absorbed/pallas B=8 pp16384 × floor",
       "row(impl='absorbed/pallas', batch=8, prompt_len=16384)['x_floor']", "<=", 1.5),
      ("5", "int8 cache speedup over bf16, B=1 pp16384",
       "row(impl='absorbed/pallas', batch=1, prompt_len=16384)['us_per_token']"
       " / row(impl='absorbed/pallas:cache=int8', batch=1, prompt_len=16384)['us_per_token']",
       ">=", 1.1),
  )
  return config
