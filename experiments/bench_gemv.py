"""Batched-GEMV benchmark (issue 4): the fused Pallas kernel against XLA, then one decode step.

For every H, B, product (K -> N) and weight format: correctness against the float32 oracle first,
then the kernels each path launches (counted in the compiled HLO) and its time. x of the first
product is the strided view q[..., :K] of a [B,H,K+R] query, as in the module. Baselines: XLA
einsum on bf16 weights, XLA dequantize-then-einsum on quantized ones. Fused paths: "pallas" (the
default, the Triton kernel with default_config), "pallas_int8" (q8_0 with int8 activations) and,
on Hopper, "pallas_mosaic" (ops/gemv_mgpu.py, every format); goals are read for the default
and, separately, for the Mosaic kernel.

Timing (GPU.md, METHOD.md): one jitted chain of n calls over n distinct weight/input copies
(n·bytes >= rotate_bytes so that weights come from HBM, not L2), each call ordered after the
last by an optimization barrier; `iters` chains are enqueued and blocked once; the median over
`repeats` such runs, divided by n, is the time of one call. Also times the decode step of one
V2-Lite layer (B=1, S=4096): wk_b product, ops.mla_decode, wv_b product, fused vs XLA.

`python -m experiments.bench_gemv --out DIR` (no ml_collections needed); experiments/main.py
calls run(config, workdir) with configs/batched_gemv.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib.util
import json
import math
import os
import re
import shutil
import statistics
import tempfile
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from mla_jax import MLAConfig, ops, quant
from mla_jax.ops import decode_gpu, gemv_gpu, gemv_mgpu, reference, xla

R = 64  # rope columns after q_nope in the query
DEFAULTS = dict(
    heads=(16, 128), batch_sizes=(1, 8, 64), products=((128, 512), (512, 128)),
    weight_formats=("bf16", "q8_0", "iq4_nl"), dtype="bfloat16", warmup=2, iters=10, repeats=5,
    seed=0, rotate_bytes=192 << 20, max_chain=48, sweep=False, variants=None, decode_step=True,
    decode_len=4096,
    time_budget_s=420.0)
TOL = {"bf16": 2e-2, "q8_0": 2e-2, "iq4_nl": 2e-2, "int8": 2e-2}  # bf16 outputs vs the oracle
MOSAIC = "mosaic"  # the variant that runs the Mosaic GPU kernel (lowering="mosaic", Hopper only)
# Kernels that XLA launches only inside the timed chain: a slice or transpose of x materialized
# next to the optimization barrier; a standalone call fuses both into its GEMM (its HLO has none).
_CHAIN_ARTIFACTS = ("wrapped_slice", "wrapped_transpose")
# Opcodes that launch no kernel of their own in XLA:GPU's compiled HLO.
_NO_KERNEL = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "opt-barrier",
              "after-all", "partition-id", "replica-id", "call", "while", "conditional"}
SWEEP = {
    "fma32": gemv_gpu.GemvConfig(block_n=32, dot=False),
    "fma128": gemv_gpu.GemvConfig(block_n=128, dot=False),
    "fma32unr": gemv_gpu.GemvConfig(block_n=32, dot=False, unroll=True),
    "fma128unr": gemv_gpu.GemvConfig(block_n=128, dot=False, unroll=True),
    "dot16": gemv_gpu.GemvConfig(block_n=16),
    "dot64": gemv_gpu.GemvConfig(block_n=64),
    "dot32k4": gemv_gpu.GemvConfig(block_n=32, block_k=4),
    "dot16k4": gemv_gpu.GemvConfig(block_n=16, block_k=4),
    "dot32k2": gemv_gpu.GemvConfig(block_n=32, block_k=2),
    "dot64k4": gemv_gpu.GemvConfig(block_n=64, block_k=4),
    "dot128k4": gemv_gpu.GemvConfig(block_n=128, block_k=4),
    "dot128k4w8": gemv_gpu.GemvConfig(block_n=128, block_k=4, num_warps=8),
    "dot16k16": gemv_gpu.GemvConfig(block_n=16, block_k=16),
    "dot32k16": gemv_gpu.GemvConfig(block_n=32, block_k=16),
    "dot64k16w8": gemv_gpu.GemvConfig(block_n=64, block_k=16, num_warps=8),
    "fma64k4": gemv_gpu.GemvConfig(block_n=64, dot=False, block_k=4),
    "fma128k4": gemv_gpu.GemvConfig(block_n=128, dot=False, block_k=4),
    "fma32k16": gemv_gpu.GemvConfig(block_n=32, dot=False, block_k=16),
    "fma64k8": gemv_gpu.GemvConfig(block_n=64, dot=False, block_k=8),
    "fma64k16": gemv_gpu.GemvConfig(block_n=64, dot=False, block_k=16),
    "fma128k16": gemv_gpu.GemvConfig(block_n=128, dot=False, block_k=16),
    "dot64k8": gemv_gpu.GemvConfig(block_n=64, block_k=8),
    "dot32unr": gemv_gpu.GemvConfig(block_n=32, unroll=True),
    "dot64unr": gemv_gpu.GemvConfig(block_n=64, unroll=True),
    "int8_64": gemv_gpu.GemvConfig(block_n=64, int8=True),
}


def _settings(config) -> types.SimpleNamespace:
  get = config.get if hasattr(config, "get") else lambda k, d: getattr(config, k, d)
  return types.SimpleNamespace(**{k: get(k, v) for k, v in DEFAULTS.items()})


def count_kernels(hlo_text: str) -> int:
  """Kernel-launching instructions reachable from ENTRY through call ops (command buffers)."""
  comps, name, body = {}, None, []
  for line in hlo_text.splitlines():
    head = re.match(r"^(ENTRY\s+)?%?([\w\.\-]+)\s.*\{\s*$", line)
    if head and not line.startswith(" "):
      name, body = ("ENTRY" if head.group(1) else head.group(2)), []
      comps[name] = body
    elif name is not None and line.strip() and line.strip() != "}":
      body.append(line)

  def count(comp, depth=0):
    n = 0
    for line in comps.get(comp, []):
      m = re.search(r"=\s*(?:\(.*?\)|\S+)\s+([a-z][\w\-\.]*)\(", line)
      if not m:
        continue
      op = m.group(1)
      if op == "call" and depth < 4:
        called = re.search(r"(?:to_apply|calls)=%?([\w\.\-]+)", line)
        n += count(called.group(1), depth + 1) if called else 0
      elif op not in _NO_KERNEL:
        n += 1
    return n

  return count("ENTRY")


def _copies(tree, n):
  """n distinct device copies of a pytree (distinct buffers so that no call hits L2)."""
  return [jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), tree) for _ in range(n)]


def time_chain(fn, args_list, s):
  """(median seconds of one fn call over a barrier-ordered chain of len(args_list) calls, the
  jitted chain)."""

  def chain(all_args):
    prev, outs = None, []
    for args in all_args:
      if prev is not None:
        args, _ = jax.lax.optimization_barrier((args, prev))
      prev = fn(*args)
      outs.append(prev)
    return outs

  run = jax.jit(chain)
  for _ in range(s.warmup):
    jax.block_until_ready(run(args_list))
  samples = []
  for _ in range(s.repeats):
    t0 = time.perf_counter()
    outs = [run(args_list) for _ in range(s.iters)]
    jax.block_until_ready(outs)
    samples.append((time.perf_counter() - t0) / (s.iters * len(args_list)))
  return statistics.median(samples), run


def profile_chains(chains: dict) -> dict:
  """Device-side cross-check with jax.profiler: runs each chain once under a trace annotation
  and sums the GPU kernels that start inside its window.

  chains: {name: (jitted chain, args_list)} -> {name: {kernel_us, kernels, names}} per call, or
  {} when the trace has no GPU plane (CPU runs).
  """
  tmp = tempfile.mkdtemp(prefix="bench_gemv_prof_")
  jax.profiler.start_trace(tmp)
  try:
    for name, (run, args_list) in chains.items():
      with jax.profiler.TraceAnnotation(f"bench:{name}"):
        jax.block_until_ready(run(args_list))
  finally:
    jax.profiler.stop_trace()
  files = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
  data = jax.profiler.ProfileData.from_file(files[-1])
  gpu = data.find_plane_with_name("/device:GPU:0")
  host = data.find_plane_with_name("/host:CPU")
  shutil.rmtree(tmp, ignore_errors=True)
  if gpu is None or host is None:
    return {}
  windows = {ev.name[len("bench:"):]: (ev.start_ns, ev.end_ns)
             for line in host.lines for ev in line.events if ev.name.startswith("bench:")}
  kernels = [(ev.start_ns, ev.duration_ns, ev.name) for line in gpu.lines
             if line.name.startswith("Stream") for ev in line.events
             if not ev.name.startswith(("Memcpy", "Memset"))]
  out = {}
  for name, (start, end) in windows.items():
    mine = [k for k in kernels if start <= k[0] <= end]
    n = len(chains[name][1])
    x_copies = [k for k in mine if k[2].startswith(_CHAIN_ARTIFACTS)]
    out[name] = dict(kernel_us=sum(k[1] for k in mine) / n / 1e3, kernels=len(mine) / n,
                     names=sorted({k[2][:80] for k in mine}),
                     x_copy_us=sum(k[1] for k in x_copies) / n / 1e3)
  return out


def _chain_len(nbytes, s):
  return int(min(s.max_chain, max(4, math.ceil(s.rotate_bytes / max(nbytes, 1)))))


def _kernels(fn, *args) -> int:
  return count_kernels(jax.jit(fn).lower(*args).compile().as_text())


def _bench_shape(H, K, N, B, fmt, s, rng, interpret, variants, hlo_log=None):
  """Rows for one (H, K, N, B, fmt): xla, pallas (default config) and the sweep variants."""
  dtype = jnp.dtype(s.dtype)
  w32 = jnp.asarray(rng.standard_normal((H, K, N)) * K ** -0.5, jnp.float32)
  w = w32.astype(jnp.bfloat16) if fmt == "bf16" else quant.quantize(w32, fmt)
  width = K + R if K == 128 else K  # product 1 reads q_nope inside the whole query
  x = jnp.asarray(rng.standard_normal((B, H, width)), dtype)
  ref = reference.batched_gemv(x[..., :K], w)
  wbytes = w.nbytes if fmt != "bf16" else w.size * 2
  n = _chain_len(wbytes, s)
  args_list = list(zip(_copies(x, n), _copies(w, n)))
  paths = {"xla": (lambda x, w: xla.batched_gemv(x[..., :K], w), None)}
  for name, cfg in variants.items():
    if cfg == MOSAIC:
      if decode_gpu.is_hopper() and gemv_mgpu.unsupported(x, w) is None:
        paths[name] = (lambda x, w: gemv_gpu.batched_gemv(x, w, lowering="mosaic"), None)
      continue
    if (cfg.int8 and fmt != "q8_0") or (not cfg.dot and B > 1):
      continue
    paths[name] = ((lambda c: lambda x, w: gemv_gpu.batched_gemv(x, w, config=c,
                                                                  interpret=interpret))(cfg), cfg)
  rows, chains = [], {}
  for name, (fn, cfg) in paths.items():
    row = dict(H=H, K=K, N=N, B=B, fmt=fmt, path=name, chain=n, weight_bytes=int(wbytes))
    if cfg is not None:
      row["config"] = dataclasses.asdict(cfg)
    try:
      t0 = time.perf_counter()
      compiled = jax.jit(fn).lower(x, w).compile()
      row["compile_s"] = time.perf_counter() - t0
      y = compiled(x, w)
      ref_x = ref
      if cfg is not None and cfg.int8:
        ref_x = reference.batched_gemv(quant.quantize_q8_1(x[..., :K]).dequantize(), w)
      row["rel_err"] = float(np.linalg.norm(np.asarray(y, np.float64) - np.asarray(ref_x))
                             / np.linalg.norm(np.asarray(ref_x)))
      row["ok"] = bool(np.all(np.isfinite(np.asarray(y, np.float32)))
                       and row["rel_err"] <= TOL.get(fmt, 2e-2))
      hlo = compiled.as_text()
      row["kernels"] = count_kernels(hlo)
      if hlo_log is not None and H == 128 and B == 8 and name in ("xla", "pallas"):
        hlo_log.write(f"==== H={H} K={K} N={N} B={B} {fmt} {name}: {row['kernels']} kernels\n"
                      f"{hlo}\n")
      t, chains[name] = time_chain(fn, args_list, s)
      row["us"] = t * 1e6
      row["GBps"] = wbytes / t / 1e9
    except Exception as err:  # a variant that does not lower is a result, not a crash
      row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
    rows.append(row)
  _add_profile(rows, {k: (run, args_list) for k, run in chains.items()}, wbytes)
  return rows


def _add_profile(rows, chains, nbytes=None, key=lambda row: row["path"]):
  try:
    prof = profile_chains(chains) if chains else {}
  except Exception as err:  # the wall-clock numbers stand without the cross-check
    print(f"profiler failed: {type(err).__name__}: {err}", flush=True)
    prof = {}
  for row in rows:
    p = prof.get(key(row))
    if p:
      row.update(device_us=p["kernel_us"], device_kernels=p["kernels"], kernel_names=p["names"],
                 device_us_standalone=p["kernel_us"] - p["x_copy_us"])
      if nbytes and p["kernel_us"] > 0:
        row["device_GBps"] = nbytes / p["kernel_us"] / 1e3


def _decode_step(s, rng, interpret):
  """One V2-Lite layer's absorbed decode at B=1, S=decode_len: products + decode kernel."""
  cfg = MLAConfig.deepseek_v2_lite()
  H, K, C, V, S = cfg.num_heads, cfg.qk_nope_head_dim, cfg.kv_lora_rank, cfg.v_head_dim, \
      s.decode_len
  bf16 = jnp.bfloat16
  has_decode_kernel = importlib.util.find_spec("mla_jax.ops.decode_gpu") is not None
  decode_impl = "pallas" if has_decode_kernel else "xla"
  kernel_opts = {"interpret": True} if interpret and decode_impl == "pallas" else {}
  q = jnp.asarray(rng.standard_normal((1, H, K + cfg.qk_rope_head_dim)), bf16)
  c_kv = jnp.asarray(rng.standard_normal((1, S, C)), bf16)
  k_rope = jnp.asarray(rng.standard_normal((1, S, cfg.qk_rope_head_dim)), bf16)
  lengths = jnp.asarray([S], jnp.int32)
  scale = cfg.softmax_scale
  wk32 = jnp.asarray(rng.standard_normal((H, K, C)) * K ** -0.5, jnp.float32)
  wv32 = jnp.asarray(rng.standard_normal((H, C, V)) * C ** -0.5, jnp.float32)

  def step(gemv, impl, opts):
    def fn(q, c_kv, k_rope, wk, wv):
      q_latent = gemv(q, wk, K)
      o, _ = ops.mla_decode(q_latent, q[..., K:], c_kv, k_rope, lengths, sm_scale=scale,
                            impl=impl, **opts)
      return gemv(o.astype(bf16), wv, C)
    return fn

  fused = lambda x, w, k: gemv_gpu.batched_gemv(x, w, interpret=interpret)
  mosaic = lambda x, w, k: gemv_gpu.batched_gemv(
      x, w, lowering="mosaic" if gemv_mgpu.unsupported(x, w) is None else "triton")
  plain = lambda x, w, k: xla.batched_gemv(x[..., :k], w)
  paths = {"xla": step(plain, "xla", {}),
           f"xla_gemv+{decode_impl}_decode": step(plain, decode_impl, kernel_opts),
           f"fused_gemv+{decode_impl}_decode": step(fused, decode_impl, kernel_opts)}
  if not interpret and decode_gpu.is_hopper():
    paths[f"fused_mosaic_gemv+{decode_impl}_decode"] = step(mosaic, decode_impl, kernel_opts)
  rows, chains = [], {}
  for fmt in s.weight_formats:
    conv = (lambda a: a.astype(bf16)) if fmt == "bf16" else (lambda a: quant.quantize(a, fmt))
    wk, wv = conv(wk32), conv(wv32)
    nbytes = (c_kv.size + k_rope.size) * 2 + sum(
        a.nbytes if fmt != "bf16" else a.size * 2 for a in (wk, wv))
    n = _chain_len(nbytes, s)
    args_list = list(zip(*(_copies(a, n) for a in (q, c_kv, k_rope, wk, wv))))
    ref_o, _ = reference.mla_decode(reference.batched_gemv(q[..., :K], wk), q[..., K:], c_kv,
                                    k_rope, lengths, sm_scale=scale)
    ref = reference.batched_gemv(ref_o.astype(bf16), wv)
    for name, fn in paths.items():
      row = dict(fmt=fmt, path=name, B=1, S=S, H=H, chain=n, bytes=int(nbytes))
      try:
        y = jax.jit(fn)(q, c_kv, k_rope, wk, wv)
        row["rel_err"] = float(np.linalg.norm(np.asarray(y, np.float64) - np.asarray(ref))
                               / np.linalg.norm(np.asarray(ref)))
        row["kernels"] = _kernels(fn, q, c_kv, k_rope, wk, wv)
        t, run = time_chain(fn, args_list, s)
        row["us"] = t * 1e6
        chains[f"{fmt}/{name}"] = (run, args_list)
      except Exception as err:
        row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
      rows.append(row)
  _add_profile(rows, chains, key=lambda row: f"{row['fmt']}/{row['path']}")
  return rows, decode_impl


def _goals(rows, fused="pallas"):
  """The issue's goals 1-3 on the rows of one fused path (the default: "pallas"), by wall clock
  and by profiled kernels (all of them, and without the chain's copies of x, as a standalone
  call would run)."""
  goals = {"1_one_launch": all(r.get("kernels") == 1 for r in rows if r["path"] == fused),
           "1_one_launch_profiled": all(r.get("device_kernels", 1) == 1 for r in rows
                                        if r["path"] == fused)}
  for clock in ("us", "device_us", "device_us_standalone"):
    by = {(r["H"], r["K"], r["B"], r["fmt"], r["path"]): r[clock] for r in rows if clock in r}
    speedups, bf16_ratio = {}, {}
    for (H, K, B, fmt, path), t in by.items():
      base = by.get((H, K, B, fmt, "xla"))
      if path != fused or not base:
        continue
      if fmt == "bf16":
        bf16_ratio[f"H{H}_K{K}_B{B}"] = t / base
      elif H == 128 and B in (1, 8):
        speedups[f"{fmt}_K{K}_B{B}"] = base / t
    goals[f"2_speedup_H128_B1_B8[{clock}]"] = speedups
    goals[f"2_holds[{clock}]"] = bool(speedups) and min(speedups.values()) >= 2.0
    goals[f"3_bf16_ratio[{clock}]"] = bf16_ratio
    goals[f"3_holds[{clock}]"] = bool(bf16_ratio) and max(bf16_ratio.values()) <= 1.05
  return goals


def _table(rows):
  lines = [f"{'H':>4} {'K->N':>8} {'B':>3} {'fmt':>6} {'path':>13} {'us':>7} {'GB/s':>6} "
           f"{'dev_us':>7} {'devGB/s':>7} {'kern':>4} {'err':>7}"]
  for r in rows:
    cell = lambda k, f: format(r[k], f) if k in r else "-"
    lines.append(f"{r['H']:>4} {r['K']:>3}->{r['N']:<4} {r['B']:>3} {r['fmt']:>6} "
                 f"{r['path']:>13} {cell('us', '7.2f'):>7} {cell('GBps', '6.0f'):>6} "
                 f"{cell('device_us', '7.2f'):>7} {cell('device_GBps', '7.0f'):>7} "
                 f"{r.get('kernels', '-'):>4} {cell('rel_err', '7.1e'):>7}"
                 + (f" {r['error'][:60]}" if "error" in r else ""))
  return "\n".join(lines)


def _write(result, workdir):
  with open(os.path.join(workdir, "batched_gemv.json"), "w") as f:
    json.dump(result, f, indent=1)


def run(config, workdir) -> dict:
  """Runs the benchmark; writes workdir/batched_gemv.json and returns its content."""
  s = _settings(config)
  interpret = jax.default_backend() != "gpu"
  rng = np.random.default_rng(s.seed)
  start = time.perf_counter()
  result = dict(device=str(jax.devices()[0].device_kind), backend=jax.default_backend(),
                jax=jax.__version__, interpret=interpret, settings=vars(s),
                rows=[])
  sweep = {k: v for k, v in SWEEP.items() if s.variants is None or k in s.variants}
  sweep = sweep if s.sweep else {}
  os.makedirs(workdir, exist_ok=True)
  hlo_log = open(os.path.join(workdir, "hlo_samples.txt"), "w")  # the HLO kernels are counted in
  for H in s.heads:
    for K, N in s.products:
      for B in s.batch_sizes:
        for fmt in s.weight_formats:
          cfg = gemv_gpu.default_config(B, H, K, N, None if fmt == "bf16" else fmt)
          shape_variants = {"pallas": cfg, "pallas_mosaic": MOSAIC}
          if fmt == "q8_0":
            shape_variants["pallas_int8"] = dataclasses.replace(cfg, int8=True, dot=True)
          if time.perf_counter() - start < s.time_budget_s:
            shape_variants.update(sweep)
          rows = _bench_shape(H, K, N, B, fmt, s, rng, interpret, shape_variants, hlo_log)
          result["rows"].extend(rows)
          _write(result, workdir)
          print(_table(rows).split("\n", 1)[1], f"  [{time.perf_counter() - start:.0f}s]",
                flush=True)
  hlo_log.close()
  if s.decode_step:
    result["decode_step"], result["decode_impl"] = _decode_step(s, rng, interpret)
    print(f"decode step, V2-Lite layer, B=1, S={s.decode_len} ({result['decode_impl']} decode):")
    for r in result["decode_step"]:
      print(f"  {r['fmt']:>6} {r['path']:>32} {r.get('us', float('nan')):8.2f} us "
            f"device {r.get('device_us', float('nan')):8.2f} us kernels {r.get('kernels', '-')} "
            f"err {r.get('rel_err', float('nan')):.1e} {r.get('error', '')[:80]}", flush=True)
  result["goals"] = _goals(result["rows"])
  if any(r["path"] == "pallas_mosaic" for r in result["rows"]):  # Hopper only
    result["goals_mosaic"] = _goals(result["rows"], "pallas_mosaic")
  result["elapsed_s"] = time.perf_counter() - start
  _write(result, workdir)
  print(json.dumps(result["goals"], indent=1))
  if "goals_mosaic" in result:
    print("Mosaic kernel (lowering='mosaic'):", json.dumps(result["goals_mosaic"], indent=1))
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="output folder for batched_gemv.json")
  parser.add_argument("--sweep", action="store_true", help="also time the GemvConfig variants")
  parser.add_argument("--variants", default=None,
                      help="comma-separated SWEEP names to time (implies --sweep)")
  parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke test)")
  parser.add_argument("--budget", type=float, default=DEFAULTS["time_budget_s"])
  args = parser.parse_args()
  config = dict(DEFAULTS, sweep=args.sweep or bool(args.variants), time_budget_s=args.budget,
                variants=tuple(args.variants.split(",")) if args.variants else None)
  if args.quick:
    config.update(heads=(2,), batch_sizes=(1, 3), products=((128, 64), (64, 32)), warmup=1,
                  iters=1, repeats=1, rotate_bytes=1, max_chain=2, decode_len=64)
  run(config, args.out)


if __name__ == "__main__":
  main()
