"""The whole model on a CPU: tg@pp t/s of a tiny random DeepSeek-V2 (MoE), standard vs absorbed.

experiments/bench_model.py: a random CausalLM (4 layers, the first dense, then MoE with 16
routed experts, top 4, and 2 shared) generates greedily from random prompts; every
implementation holds the same weights. float32, because XLA CPU runs bfloat16 einsums several
times slower. About a minute on a 2-core machine.
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.kind = "model_tg"  # experiment: experiments/bench_model.py
  # ModelConfig fields over DeepSeek-V2-Lite's, "name=value,..." (a tiny model a CPU runs fast).
  config.model_overrides = (
      "hidden_size=256,num_heads=4,kv_lora_rank=128,qk_nope_head_dim=32,qk_rope_head_dim=16,"
      "v_head_dim=32,num_layers=4,vocab_size=4096,intermediate_size=512,"
      "moe_intermediate_size=128,n_routed_experts=16,n_shared_experts=2,num_experts_per_tok=4")
  # Implementations "mode/backend[:cache=dtype][:option=value]" (experiments/model.py); options
  # go to CausalLM (e.g. moe_impl=gather), weight_format to its set_weight_format.
  config.impls = "standard/xla,absorbed/xla,absorbed/cpu"
  # Pairs "candidate vs baseline" of the published table's form (t/s, t/s, speedup) and the plot.
  config.compare = "absorbed/xla vs standard/xla,absorbed/cpu vs standard/xla"
  config.batch_size = 1  # B prompts generated together; t/s counts all B
  config.prompt_lengths = (128, 1024)  # pp: prompt lengths N, one row each
  config.n_gen = 32  # tg: greedy tokens generated per timed call (test name tg<n_gen>@pp<N>)
  config.reps = 11  # timed calls; t/s from their median
  # prefill in chunks of this many tokens (0: the whole prompt at once)
  config.prefill_chunk = 0
  # every model built first, their timed reps alternating (the order rotating every rep), so
  # that a change in the shared host's load falls on all of them.
  config.alternate = True
  config.dtype = "float32"  # compute dtype
  config.param_dtype = "float32"  # dtype of the random weights
  config.cache_dtype = "float32"  # default cache dtype; an impl overrides it with ":cache=int8"
  config.floor_tbps = 0.02  # TB/s of the byte floor: an assumed DRAM rate, not measured here
  config.seed = 0  # seed of the weights and the prompts
  return config
