"""Batched-GEMV microbenchmark (issue 4): ops.batched_gemv over all heads, Pallas vs XLA.

Run by experiments/bench_gemv.py (fields as in its DEFAULTS): both absorbed products (wk_b:
K=128 -> C=512 and wv_b: C=512 -> V=128), bf16 and GGML-style quantized weights; µs, GB/s of
weight bytes and kernels launched per call, against XLA einsum (bf16) and XLA
dequantize-then-einsum (quantized).
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.kind = "batched_gemv"  # experiment: experiments/bench_gemv.run(config, workdir)
  config.heads = (16, 128)  # H: V2-Lite has 16, V3 128
  config.batch_sizes = (1, 8, 64)  # B rows per head
  config.products = ((128, 512), (512, 128))  # (K in, N out): q_nope·wk_b and o_latent·wv_b
  config.weight_formats = ("bf16", "q8_0", "iq4_nl")  # quant.quantize formats; bf16 is plain
  config.dtype = "bfloat16"  # activation dtype of x
  config.warmup = 2  # untimed calls before timing
  config.iters = 10  # enqueued calls per timed repeat
  config.repeats = 5  # timed repeats; the median is reported
  config.seed = 0  # seed of the random inputs and weights
  config.rotate_bytes = 192 << 20  # bytes of rotating input sets, several times the 50-60 MB L2
  config.max_chain = 48  # most calls chained inside one jit when timing small shapes
  config.sweep = False  # also time every gemv_gpu tuning in bench_gemv.SWEEP
  config.decode_step = True  # also time one V2-Lite layer's decode step (GEMVs + decode kernel)
  config.decode_len = 4096  # cache length S of that decode step
  config.time_budget_s = 420.0  # stop starting new shapes after this many seconds
  return config
