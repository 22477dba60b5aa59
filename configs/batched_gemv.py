"""Batched-GEMV microbenchmark (issue 4): ops.batched_gemv over all heads, Pallas vs XLA.

Run by experiments/bench_gemv.py: both absorbed products (wk_b: K=128 -> C=512 and wv_b:
C=512 -> V=128), bf16 and GGML-style quantized weights; µs, GB/s of weight bytes and kernels
launched per call, against XLA einsum (bf16) and XLA dequantize-then-einsum (quantized).
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.kind = "batched_gemv"  # experiment: experiments/bench_gemv.run(config, workdir)
  config.heads = (16, 128)  # H: V2-Lite has 16, V3 128
  config.batch_sizes = (1, 8, 64)  # B rows per head
  config.products = ((128, 512), (512, 128))  # (K in, N out): q_nope·wk_b and o_latent·wv_b
  config.weight_formats = ("bf16", "q8_0", "iq4_nl")  # quant.quantize formats; bf16 is plain
  config.impls = ("xla", "pallas")  # ops.batched_gemv impls to time (xla is the baseline)
  config.dtype = "bfloat16"  # activation dtype of x
  config.warmup = 5  # untimed calls before timing
  config.iters = 100  # timed calls; the median is reported
  config.seed = 0  # seed of the random inputs and weights
  return config
