"""The whole decode step on a GPU with DeepSeek-V3's attention layers, bf16, µs per token.

configs/decode_step_gpu.py's benchmark (experiments/decode_step.py) on the V3 preset: 128 heads,
q_lora (q_a_proj, q_a_layernorm, q_b_proj), a 7168-wide residual. A V3 attention layer holds
187 M parameters (374 MB in bf16), 13.6× a V2-Lite layer, so its step is more bound by bytes.
The stack holds 2 of V3's 61 layers by default (per-layer figures scale to the 61): an 8-layer
run, standard/xla first, printed no line within 285 s on an H200; the absorbed rows now come
first.
With 128 heads the split runs the many-heads Mosaic kernel (ops/decode/mosaic_heads.py).
standard/xla's cache (80 KB a token a layer) is skipped where it exceeds max_cache_gb. No
goals: decode_step_gpu's are V2-Lite's. Fields not set here are configs/decode_step_gpu.py's.
"""

from configs import decode_step_gpu


def get_config():
  config = decode_step_gpu.get_config()
  config.preset = "deepseek_v3"  # MLAConfig preset
  config.num_layers = 2  # attention layers in the stack (of V3's 61)
  config.impls = "absorbed/pallas,standard/xla"  # implementations (experiments/model.py)
  config.shapes = ((1, 128), (1, 16384), (8, 16384))  # (B, S) pairs timed
  config.reps = 3  # timed reps; µs per token is their median
  config.dispatch_steps = 4  # single-step jitted calls timed for the dispatched µs per token
  config.max_cache_gb = 30.0  # skip (impl, B, S) whose caches would be larger
  config.goals = ()  # none: decode_step_gpu's goals are V2-Lite's
  return config
