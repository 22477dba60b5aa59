"""Text generation through a transformers DeepSeek-V2 checkpoint that holds its tokenizer.json.

experiments/generate_text.py: the prompt through the checkpoint's tokenizer, mla_jax.load_hf_model
and mla_jax.generate; prints the continuation and writes it with its timing. Needs the
`tokenizers` package (pip install 'mla_jax[text]'). Example:
  python -m experiments.main --config=configs/generate_text.py \\
    --config.checkpoint=DeepSeek-V2-Lite/ --config.prompt='The capital of France is'
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.kind = "generate_text"  # experiment: experiments/generate_text.py
  config.checkpoint = ""  # transformers checkpoint directory: config.json, weights, tokenizer.json
  config.prompt = ""  # the text to continue
  config.max_new_tokens = 32  # tokens generated after the prompt
  config.temperature = 0.0  # 0: greedy; else softmax(logits / temperature)
  config.top_p = 1.0  # nucleus of the sampling (1.0: the whole distribution)
  config.seed = 0  # seed of the sampling
  config.mode = "absorbed"  # MLAttention mode: absorbed | standard
  config.backend = "auto"  # MLAttention backend: auto | xla | cpu | pallas
  config.dtype = "bfloat16"  # dtype of the weights and the compute
  config.weight_format = ""  # "" keeps dtype; q8_0 or iq4_nl quantizes every Linear weight
  return config
