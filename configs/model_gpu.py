"""The whole model on a GPU: tg@pp t/s of DeepSeek-V2-Lite, standard vs absorbed, bf16 and IQ4_NL.

The real shape with random weights (MoE), in the published tables' form.

experiments/bench_model.py on the full V2-Lite configuration (27 layers, 64 routed experts, top
6, 2 shared; about 31 GB in bf16, 9 GB in IQ4_NL), B=1. The byte floor of a step is the weights
it reads (one embedding row, the 6 chosen experts of each MoE layer) and the cache up to the
prompt, over 4.0 TB/s. A quick run: --config.prompt_lengths='(128,16384)'.
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.kind = "model_tg"  # experiment: experiments/bench_model.py
  config.model_overrides = ""  # ModelConfig fields over DeepSeek-V2-Lite's (none: the real shape)
  # Implementations "mode/backend[:cache=dtype][:option=value]" (experiments/model.py).
  config.impls = ("standard/pallas,absorbed/pallas,standard/pallas:weight_format=iq4_nl,"
                  "absorbed/pallas:weight_format=iq4_nl")
  # Pairs "candidate vs baseline" of the published table's form (t/s, t/s, speedup) and the plot.
  config.compare = ("absorbed/pallas vs standard/pallas,absorbed/pallas:weight_format=iq4_nl vs "
                    "standard/pallas:weight_format=iq4_nl")
  config.batch_size = 1  # B prompts generated together; t/s counts all B
  config.prompt_lengths = (128, 512, 2048, 8192, 16384, 65536)  # pp: one row each
  config.n_gen = 64  # tg: greedy tokens generated per timed call (test name tg<n_gen>@pp<N>)
  config.reps = 3  # timed calls; t/s from their median
  # prefill in chunks of this many tokens (0: all at once), which bounds its temporaries (an
  # 80 GB H100 holds the 31 GB bf16 model; pp65536 at once would take 4× pp16384's)
  config.prefill_chunk = 4096
  # one model at a time: two bf16 V2-Lite models do not fit one GPU together (True: every
  # model built first, their timed reps alternating).
  config.alternate = False
  config.dtype = "bfloat16"  # compute dtype
  config.param_dtype = "bfloat16"  # dtype of the random weights
  config.cache_dtype = "bfloat16"  # default cache dtype; an impl overrides it with ":cache=int8"
  config.floor_tbps = 4.0  # HBM bytes per µs·1e-6 (TB/s) of the byte floor
  config.seed = 0  # seed of the weights and the prompts
  # Goals, checked in the report: (label, what, value expression over the rows, op, target);
  # experiments/harness.goal_value says what the expressions may use.
  config.goals = (
      ("2a", "MLA speedup at pp16384 over pp128, bf16 (rises with context)",
       "(row(impl='absorbed/pallas', prompt_len=16384)['tg_tps']"
       " / row(impl='standard/pallas', prompt_len=16384)['tg_tps'])"
       " / (row(impl='absorbed/pallas', prompt_len=128)['tg_tps']"
       " / row(impl='standard/pallas', prompt_len=128)['tg_tps'])", ">", 1.0),
      ("3a", "absorbed bf16 pp128 × floor",
       "row(impl='absorbed/pallas', prompt_len=128)['x_floor']", "<=", 2.5),
      ("3b", "iq4_nl over bf16 t/s, absorbed, pp128",
       "row(impl='absorbed/pallas:weight_format=iq4_nl', prompt_len=128)['tg_tps']"
       " / row(impl='absorbed/pallas', prompt_len=128)['tg_tps']", ">=", 2.0),
  )
  return config
