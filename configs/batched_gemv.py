"""Batched-GEMV benchmark: ops.batched_gemv's fused Pallas kernels vs XLA, all heads in one call.

experiments/bench_gemv.py: both absorbed products (wk_b: K=128 -> C=512 and wv_b: C=512 -> V=128),
bf16 and GGML-style quantized weights; µs, GB/s of weight bytes and kernels launched per call,
against XLA einsum (bf16) and XLA dequantize-then-einsum (quantized); then one V2-Lite layer's
decode step. The Triton kernel's tuning sweep: --config.timed='("pallas","fma32","dot16")' (any
names of `sweep`). A MoE layer's chosen experts: --config.experts=64 --config.heads='(6,)'. Without
a GPU: --config.interpret=True with tiny shapes, e.g.
--config.heads='(2,)' --config.batch_sizes='(1,3)' --config.products='((128,64),(64,32))'.
"""

import ml_collections

# The Triton kernel's knobs at their dataclass defaults: a sweep entry sets all of them, so that
# it names one tuning whatever the default tuning of a shape is.
_TRITON = dict(block_n=128, block_b=None, dot=True, int8=False, num_warps=4, num_stages=3,
               unroll=False, block_k=1, split_k=1, lookup="poly")


def _triton(**knobs):
  only = {"B": (1,)} if knobs.get("dot") is False else {}  # FMA: one program per batch row
  if knobs.get("int8"):
    only["fmt"] = ("q8_0",)
  return {"lowering": "triton", "tuning": {**_TRITON, **knobs}, "only": only}


def get_config():
  config = ml_collections.ConfigDict()
  config.kind = "batched_gemv"  # experiment: experiments/bench_gemv.py
  config.heads = (16, 128)  # H: V2-Lite has 16, V3 128
  # E > 0: the weight holds E heads and each of the H heads of x reads a distinct one of them,
  # drawn at random (head_ids: a MoE layer's chosen experts, E=64 in V2-Lite); 0: H heads
  config.experts = 0
  config.batch_sizes = (1, 8, 64)  # B rows per head
  config.products = ((128, 512), (512, 128))  # (K in, N out): q_nope·wk_b and o_latent·wv_b
  config.weight_formats = ("bf16", "q8_0", "iq4_nl")  # quant.quantize formats; bf16 is plain
  config.dtype = "bfloat16"  # activation dtype of x
  # Variants timed against XLA: name -> {"impl": "pallas" (default) | "xla", "lowering": None
  # (the dispatcher's choice) | "triton" | "mosaic", "tuning": {knob: value} overriding that
  # lowering's planned tuning, "only": {case field: values} to time it on those cases only,
  # "layout": "out_in" for XLA over weights stored [N, K] as layers.Linear stores them}; a
  # variant whose plan refuses a case is left out of it
  config.variants = ml_collections.ConfigDict({
      "pallas": {},  # what ops.batched_gemv(impl="pallas") runs
      "pallas_mosaic": {"lowering": "mosaic"},  # the Hopper kernel (TMA + wgmma)
      # the module's one-row Linears (one head): XLA's row reduction over [out, in] weights
      "xla_out_in": {"impl": "xla", "layout": "out_in", "only": {"fmt": ("bf16",)}},
      "pallas_int8": {"lowering": "triton", "tuning": {"int8": True, "dot": True},
                      "only": {"fmt": ("q8_0",)}},  # int8 activations: q8_0 weights only
  })
  # The Triton kernel's tuning sweep (name -> variant, as above); none is timed unless named in
  # `timed`
  config.sweep = ml_collections.ConfigDict({
      "fma32": _triton(block_n=32, dot=False),
      "fma128": _triton(block_n=128, dot=False),
      "fma32unr": _triton(block_n=32, dot=False, unroll=True),
      "fma128unr": _triton(block_n=128, dot=False, unroll=True),
      "dot16": _triton(block_n=16),
      "dot64": _triton(block_n=64),
      "dot32k4": _triton(block_n=32, block_k=4),
      "dot16k4": _triton(block_n=16, block_k=4),
      "dot32k2": _triton(block_n=32, block_k=2),
      "dot64k4": _triton(block_n=64, block_k=4),
      "dot128k4": _triton(block_n=128, block_k=4),
      "dot128k4w8": _triton(block_n=128, block_k=4, num_warps=8),
      "dot16k16": _triton(block_n=16, block_k=16),
      "dot32k16": _triton(block_n=32, block_k=16),
      "dot64k16w8": _triton(block_n=64, block_k=16, num_warps=8),
      "fma64k4": _triton(block_n=64, dot=False, block_k=4),
      "fma128k4": _triton(block_n=128, dot=False, block_k=4),
      "fma32k16": _triton(block_n=32, dot=False, block_k=16),
      "fma64k8": _triton(block_n=64, dot=False, block_k=8),
      "fma64k16": _triton(block_n=64, dot=False, block_k=16),
      "fma128k16": _triton(block_n=128, dot=False, block_k=16),
      "dot64k8": _triton(block_n=64, block_k=8),
      "dot32unr": _triton(block_n=32, unroll=True),
      "dot64unr": _triton(block_n=64, unroll=True),
      "int8_64": _triton(block_n=64, int8=True),
      "fma32k8s8": _triton(block_n=32, dot=False, block_k=8, split_k=8),
      "fma32k4s8": _triton(block_n=32, dot=False, block_k=4, split_k=8),
      "fma64k8s8": _triton(block_n=64, dot=False, block_k=8, split_k=8),
      "fma32k16s4": _triton(block_n=32, dot=False, block_k=16, split_k=4),
      "fma32k4s16": _triton(block_n=32, dot=False, block_k=4, split_k=16),
      # IQ4_NL's table by byte permutes (lookup="prmt"; the others use the polynomial)
      "fma32k4s16p": _triton(block_n=32, dot=False, block_k=4, split_k=16, lookup="prmt"),
      "fma64k4s16p": _triton(block_n=64, dot=False, block_k=4, split_k=16, lookup="prmt"),
      "fma128k4s16p": _triton(block_n=128, dot=False, block_k=4, split_k=16, lookup="prmt"),
      "fma64k4s8p": _triton(block_n=64, dot=False, block_k=4, split_k=8, lookup="prmt"),
      "dot32k8s8": _triton(block_n=32, block_k=8, split_k=8),
      "dot32k4s8": _triton(block_n=32, block_k=4, split_k=8),
      "fma32k4s16w2": _triton(block_n=32, dot=False, block_k=4, split_k=16, num_warps=2),
      "fma32k4s16w1": _triton(block_n=32, dot=False, block_k=4, split_k=16, num_warps=1),
      "fma64k4s16w2": _triton(block_n=64, dot=False, block_k=4, split_k=16, num_warps=2),
      "fma128k4s8": _triton(block_n=128, dot=False, block_k=4, split_k=8),
  })
  config.timed = ("pallas", "pallas_mosaic", "pallas_int8")  # names in variants or sweep to time
  config.interpret = False  # run the Pallas kernels in interpret mode (no GPU needed; slow)
  config.rtol = ml_collections.ConfigDict(  # ‖y − oracle‖/‖oracle‖ a correct row stays under
      {"bf16": 2e-2, "q8_0": 2e-2, "iq4_nl": 2e-2})
  config.warmup = 2  # untimed chains before timing
  config.iters = 10  # enqueued chains per timed repeat
  config.repeats = 5  # timed repeats; the median is reported
  config.profile_runs = 1  # chains run under the profiler for the device time
  config.seed = 0  # seed of the random inputs and weights
  config.rotate_bytes = 192 << 20  # bytes of rotating input sets, several times the 50-60 MB L2
  config.max_chain = 48  # most calls chained inside one jit when timing small shapes
  config.hlo_batch = 8  # B of the cases whose HLO (at the largest H) goes to hlo_samples.txt
  config.decode_step = True  # also time one V2-Lite layer's decode step (GEMVs + decode kernel)
  config.decode_len = 4096  # cache length S of that decode step
  config.time_budget_s = 420.0  # start no more sweep variants after this many seconds
  quantized_h128 = "rows(path='{}', H=128, B=(1, 8), fmt=('q8_0', 'iq4_nl'))"
  bf16_all = "rows(path='{}', fmt='bf16')"
  speedup = "min(other(r, path='xla')['{c}'] / r['{c}'] for r in {rows})"
  ratio = "max(r['{c}'] / other(r, path='xla')['{c}'] for r in {rows})"
  # Goals, checked in the report: (label, what, value expression over the rows, "<=" | ">=",
  # target); experiments/harness.goal_value says what the expressions may use. Device time of a
  # standalone call (device_us_standalone); "us" is the wall time.
  config.goals = (
      ("1", "Triton kernel: launches per call, worst case", "max(r['kernels'] for r in "
       "rows(path='pallas'))", "<=", 1),
      ("2", "Triton kernel, quantized, H=128, B∈{1,8}: speedup over XLA, worst case",
       speedup.format(c="device_us_standalone", rows=quantized_h128.format("pallas")), ">=", 2.0),
      ("2m", "Mosaic kernel, quantized, H=128, B∈{1,8}: speedup over XLA, worst case",
       speedup.format(c="device_us_standalone", rows=quantized_h128.format("pallas_mosaic")),
       ">=", 2.0),
      ("2w", "Triton kernel, as 2 on wall time",
       speedup.format(c="us", rows=quantized_h128.format("pallas")), ">=", 2.0),
      ("3", "Triton kernel, bf16: time over XLA's, worst case",
       ratio.format(c="device_us_standalone", rows=bf16_all.format("pallas")), "<=", 1.05),
      ("3m", "Mosaic kernel, bf16: time over XLA's, worst case",
       ratio.format(c="device_us_standalone", rows=bf16_all.format("pallas_mosaic")), "<=", 1.05),
      ("3w", "Triton kernel, as 3 on wall time",
       ratio.format(c="us", rows=bf16_all.format("pallas")), "<=", 1.05),
  )
  return config
