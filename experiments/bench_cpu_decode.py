"""CPU decode benchmark: whole-cache einsum vs head-parallel GEMVs vs the shard path, one process.

Three formulations of the absorbed MLA decode step (one layer, B=1, H=16, C=512, R=64):
  (a) einsum        ops.mla_decode(impl="xla"): three einsums over the whole cache;
  (b) head_parallel one GEMV per head over the whole cache (`head_parallel_decode` below), the
                    XLA analogue of llama.cpp's head split: a labelled baseline, not a product;
  (c) shard         ops.mla_decode(impl="cpu"): ops/decode_cpu.py.
Each is first checked against ops.reference.mla_decode. Timing: rounds of one block per
formulation, the order rotating every round; a block is one untimed call (the first call after
another formulation runs ~2 ms slower at S=16384, for each of them) and `calls_per_block` timed
calls (block_until_ready each), every call on the next of a set of input copies that together
exceed ROTATE_BYTES (so the cache comes from DRAM, not L3); the median per formulation is
reported. The memory floor is cache bytes over the read bandwidth of a
large array sum timed in the same process (before the cases and after each format; the fastest
is used); the compute floor is the step's GEMM FLOPs over the rate of a large GEMM timed in the
same process.

  python -m experiments.bench_cpu_decode --out DIR [--quick]

writes DIR/cpu_decode.json and DIR/cpu_decode.png (speedup vs context). `run(config, workdir)` is
the experiment runner's entry point; config fields as in FULL.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mla_jax import ops, quant
from mla_jax.ops import decode_cpu, reference

f32 = jnp.float32
SM_SCALE = (128 + 64) ** -0.5
ROTATE_BYTES = 80 << 20  # > the 32 MB L3 of the 2-core machines
BANDWIDTH_BYTES = 256 << 20
IMPLS = ("einsum", "head_parallel", "shard")

FULL = {
    "batch_size": 1,
    "num_heads": 16,
    "kv_lora_rank": 512,
    "rope_dim": 64,
    "seq_lens": (128, 512, 2048, 8192, 16384, 65536),
    "formats": ("bfloat16", "float32", "int8"),
    "seconds_per_case": 3.0,  # budget per (format, S); rounds = budget / time of a round
    "calls_per_block": 3,  # timed calls per formulation per round, after one untimed call
    "min_rounds": 5,
    "max_rounds": 101,
    "shard_size": None,  # None: decode_cpu.default_shard_size
    # (S, length) cases in bfloat16: a long cache holding a short sequence, as MLAttention's cache
    # is during generation; bytes and floors count the live rows only.
    "partial_fills": ((65536, 4096),),
    "plot": True,
}
QUICK = dict(FULL, seq_lens=(128, 2048, 16384), formats=("bfloat16", "int8"),
             seconds_per_case=0.7, partial_fills=())


@functools.partial(jax.jit, static_argnames="sm_scale")
def head_parallel_decode(q_latent, q_rope, c_kv, k_rope, lengths, *, sm_scale):
  """Baseline (b): heads one after another, each a GEMV pair over the whole cache.

  Every head reads the whole cache (H passes); an Int8Rows cache is dequantized first, as
  impl="xla" does. Returns out [B,H,C] in q_latent.dtype and lse [B,H].
  """
  dtype = q_latent.dtype
  c_kv = quant.dequantize(c_kv, dtype)
  k_rope = k_rope.astype(dtype)
  visible = jnp.arange(c_kv.shape[1])[None, :] < lengths[:, None]  # [B,S]

  def head(q):
    q_latent_BC, q_rope_BR = q
    scores = (jnp.einsum("bsc,bc->bs", c_kv, q_latent_BC, preferred_element_type=f32)
              + jnp.einsum("bsr,br->bs", k_rope, q_rope_BR, preferred_element_type=f32))
    scores = jnp.where(visible, scores * sm_scale, -jnp.inf)
    m = jnp.max(scores, axis=1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(scores - m)
    l = jnp.sum(p, axis=1, keepdims=True)
    o = jnp.einsum("bs,bsc->bc", p.astype(dtype), c_kv, preferred_element_type=f32)
    l_safe = jnp.where(l > 0, l, 1.0)
    return o / l_safe, jnp.where(l > 0, m + jnp.log(l_safe), -jnp.inf)[:, 0]

  o, lse = lax.map(head, (jnp.moveaxis(q_latent, 1, 0), jnp.moveaxis(q_rope.astype(dtype), 1, 0)))
  return jnp.moveaxis(o, 0, 1).astype(dtype), jnp.moveaxis(lse, 0, 1)


def _impl(name, shard_size):
  if name == "einsum":
    return lambda *a: ops.mla_decode(*a, sm_scale=SM_SCALE, impl="xla")
  if name == "head_parallel":
    return lambda *a: head_parallel_decode(*a, sm_scale=SM_SCALE)
  options = {} if shard_size is None else {"shard_size": shard_size}
  return lambda *a: ops.mla_decode(*a, sm_scale=SM_SCALE, impl="cpu", **options)


def cache_bytes(B, S, C, R, fmt):
  """Bytes one decode step must read: c_kv (+ int8 scales) and k_rope (bfloat16 beside int8)."""
  if fmt == "int8":
    return B * S * (C + 4 + 2 * R)
  return B * S * (C + R) * jnp.dtype(fmt).itemsize


def _input_sets(key, cfg, S, fmt, length):
  """Copies of one random decode input, enough to exceed ROTATE_BYTES (at most 256)."""
  B, H, C, R = cfg["batch_size"], cfg["num_heads"], cfg["kv_lora_rank"], cfg["rope_dim"]
  dtype = jnp.bfloat16 if fmt == "int8" else jnp.dtype(fmt)
  kq, kr, kc, kk = jax.random.split(key, 4)
  q_latent = jax.random.normal(kq, (B, H, C), dtype)
  q_rope = jax.random.normal(kr, (B, H, R), dtype)
  lengths = jnp.full((B,), length, jnp.int32)
  num_sets = max(1, min(256, math.ceil(ROTATE_BYTES / cache_bytes(B, S, C, R, fmt))))
  sets = []
  for i in range(num_sets):
    c_kv = jax.random.normal(jax.random.fold_in(kc, i), (B, S, C), f32)
    c_kv = quant.quantize_rows(c_kv) if fmt == "int8" else c_kv.astype(dtype)
    k_rope = jax.random.normal(jax.random.fold_in(kk, i), (B, S, R), dtype)
    sets.append((q_latent, q_rope, c_kv, k_rope, lengths))
  return jax.block_until_ready(sets)


def read_bandwidth(trials=9) -> float:
  """Bytes/s of a jitted sum over a BANDWIDTH_BYTES float32 array (median of trials)."""
  x = jax.random.normal(jax.random.key(1), (BANDWIDTH_BYTES // 4,), f32)
  total = jax.jit(jnp.sum)
  jax.block_until_ready(total(x))
  samples = []
  for _ in range(trials):
    t0 = time.perf_counter()
    jax.block_until_ready(total(x))
    samples.append(time.perf_counter() - t0)
  return BANDWIDTH_BYTES / statistics.median(samples)


def gemm_rate(dtype, n=2048, trials=3) -> float:
  """FLOP/s of an [n,n]·[n,n] XLA dot with float32 accumulation (best of trials)."""
  a = jax.random.normal(jax.random.key(2), (n, n), dtype)
  dot = jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=f32))
  jax.block_until_ready(dot(a))
  best = math.inf
  for _ in range(trials):
    t0 = time.perf_counter()
    jax.block_until_ready(dot(a))
    best = min(best, time.perf_counter() - t0)
  return 2 * n**3 / best


def _loadavg():
  try:
    return [float(x) for x in open("/proc/loadavg", encoding="ascii").read().split()[:3]]
  except OSError:
    return None


def _rel_err(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  if not np.all(np.isfinite(x)):
    return float("nan")
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def _bench_case(key, cfg, S, fmt, bandwidth, rates, length=None):
  B, H, C, R = cfg["batch_size"], cfg["num_heads"], cfg["kv_lora_rank"], cfg["rope_dim"]
  length = S if length is None else length
  sets = _input_sets(key, cfg, S, fmt, length)
  fns = {name: _impl(name, cfg["shard_size"]) for name in IMPLS}
  nbytes = cache_bytes(B, length, C, R, fmt)
  flops = 2 * B * H * length * (2 * C + R)
  row = {"format": fmt, "S": S, "length": length, "cache_bytes": nbytes, "input_sets": len(sets),
         "shard_size": cfg["shard_size"] or decode_cpu.default_shard_size(H, C, R, jnp.dtype(fmt))}
  ref_out, ref_lse = reference.mla_decode(*sets[0], sm_scale=SM_SCALE)
  for name, fn in fns.items():
    out, lse = fn(*sets[0])
    row[f"{name}_rel_err"] = _rel_err(out, ref_out)
    row[f"{name}_lse_max_abs_err"] = float(jnp.max(jnp.abs(lse - ref_lse)))
  warm = {}
  for name, fn in fns.items():
    t0 = time.perf_counter()
    for s in sets[:3]:
      jax.block_until_ready(fn(*s))
    warm[name] = (time.perf_counter() - t0) / min(3, len(sets))
  per_block = cfg["calls_per_block"]
  rounds = int(cfg["seconds_per_case"] / ((per_block + 1) * sum(warm.values())))
  rounds = max(cfg["min_rounds"], min(cfg["max_rounds"], rounds))
  samples = {name: [] for name in IMPLS}
  call = 0
  for r in range(rounds):
    for k in range(len(IMPLS)):
      name = IMPLS[(r + k) % len(IMPLS)]
      for j in range(per_block + 1):
        call += 1
        t0 = time.perf_counter()
        jax.block_until_ready(fns[name](*sets[call % len(sets)]))
        if j:  # the block's first call absorbs the switch from the previous formulation
          samples[name].append(time.perf_counter() - t0)
  row["rounds"] = rounds
  floor_ms = nbytes / bandwidth * 1e3
  rate = rates["float32" if fmt == "float32" else "bfloat16"]
  row["memory_floor_ms"] = floor_ms
  row["compute_floor_ms"] = flops / rate * 1e3
  for name in IMPLS:
    ms = statistics.median(samples[name]) * 1e3
    row[f"{name}_ms"] = ms
    row[f"{name}_ms_min"] = min(samples[name]) * 1e3
    row[f"{name}_gbps"] = nbytes / ms * 1e-6
    row[f"{name}_over_floor"] = ms / floor_ms
  row["shard_vs_einsum"] = row["einsum_ms"] / row["shard_ms"]
  row["shard_vs_head_parallel"] = row["head_parallel_ms"] / row["shard_ms"]
  row["head_parallel_vs_einsum"] = row["einsum_ms"] / row["head_parallel_ms"]
  return row


def table(rows) -> str:
  """Markdown table of the rows."""
  lines = ["| cache | S (live) | einsum ms | head-par ms | shard ms | shard GB/s | vs einsum | "
           "vs head-par | floor ms | shard/floor | compute floor ms |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    size = str(r["S"]) if r["length"] == r["S"] else f"{r['S']} ({r['length']})"
    lines.append(
        f"| {r['format']} | {size} | {r['einsum_ms']:.3f} | {r['head_parallel_ms']:.3f} | "
        f"{r['shard_ms']:.3f} | {r['shard_gbps']:.1f} | {r['shard_vs_einsum']:.2f}x | "
        f"{r['shard_vs_head_parallel']:.2f}x | {r['memory_floor_ms']:.3f} | "
        f"{r['shard_over_floor']:.2f} | {r['compute_floor_ms']:.3f} |")
  return "\n".join(lines)


def plot(rows, path: str, title: str):
  """Speedup of the shard path over (a) and (b) against context length, one line per format."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for ax, key, label in ((axes[0], "shard_vs_einsum", "(a) whole-cache einsum"),
                         (axes[1], "shard_vs_head_parallel", "(b) head-parallel GEMVs")):
    for fmt in dict.fromkeys(r["format"] for r in rows):
      pts = sorted((r["S"], r[key]) for r in rows if r["format"] == fmt)
      ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=fmt)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.axhline(3.0, color="gray", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context S (cache entries)")
    ax.set_title(f"shard path speedup over {label}", fontsize=10)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("speedup (median time ratio)")
  axes[0].legend(title="cache")
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run(config: Mapping[str, Any], workdir: str) -> dict:
  """Checks and times every (format, S) of `config`; writes cpu_decode.json and .png."""
  cfg = dict(FULL, **dict(config))
  key = jax.random.key(int(cfg.get("seed", time.time_ns() % (2**31))))
  load_before = _loadavg()
  bandwidth_before = read_bandwidth()
  rates = {d: gemm_rate(d) for d in ("bfloat16", "float32")}
  print(f"load {load_before}  read bandwidth {bandwidth_before / 1e9:.1f} GB/s  GEMM "
        + ", ".join(f"{d} {r / 1e9:.0f} GFLOP/s" for d, r in rates.items()), flush=True)
  rows = []
  bandwidths = [bandwidth_before]
  for fmt in cfg["formats"]:
    for S in cfg["seq_lens"]:
      key, sub = jax.random.split(key)
      rows.append(_bench_case(sub, cfg, S, fmt, bandwidth_before, rates))
      print(table(rows[-1:]).splitlines()[-1], flush=True)
    bandwidths.append(read_bandwidth())
  partial = []
  for S, length in cfg["partial_fills"]:
    key, sub = jax.random.split(key)
    partial.append(_bench_case(sub, cfg, S, "bfloat16", bandwidth_before, rates, length))
    print(table(partial[-1:]).splitlines()[-1], flush=True)
  bandwidth_after = bandwidths[-1]
  bandwidth = max(bandwidths)
  for r in rows + partial:  # floors against the fastest bandwidth measurement
    r["memory_floor_ms"] = r["cache_bytes"] / bandwidth * 1e3
    for name in IMPLS:
      r[f"{name}_over_floor"] = r[f"{name}_ms"] / r["memory_floor_ms"]
  load_after = _loadavg()
  result = {
      "benchmark": "cpu_decode",
      "device": platform.processor() or platform.machine(),
      "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
      "l2_bytes": decode_cpu.L2_BYTES,
      "jax": jax.__version__,
      "python": platform.python_version(),
      "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      "loadavg_before": load_before,
      "loadavg_after": load_after,
      "read_bandwidth_gbps": {"before": bandwidth_before / 1e9, "after": bandwidth_after / 1e9,
                              "all": [b / 1e9 for b in bandwidths], "used": bandwidth / 1e9},
      "gemm_gflops": {d: r / 1e9 for d, r in rates.items()},
      "sm_scale": SM_SCALE,
      "timing": ("median over alternating rounds of single block_until_ready calls, rotating "
                 f"input copies >= {ROTATE_BYTES >> 20} MiB"),
      "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
      "rows": rows,
      "partial_fills": partial,
  }
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "cpu_decode.json"), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1, default=str)
  if cfg["plot"]:
    plot(rows, os.path.join(workdir, "cpu_decode.png"),
         f"B={cfg['batch_size']}, H={cfg['num_heads']}, C={cfg['kv_lora_rank']}, "
         f"R={cfg['rope_dim']}; {result['cpus']} CPUs; load {load_before} -> {load_after}")
  print(table(rows + partial))
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="folder for cpu_decode.json and .png")
  parser.add_argument("--quick", action="store_true", help="three lengths, bf16 and int8")
  parser.add_argument("--seq-lens", default=None, help="comma-separated S values")
  parser.add_argument("--formats", default=None, help="comma-separated: bfloat16,float32,int8")
  parser.add_argument("--shard-size", type=int, default=None)
  args = parser.parse_args()
  config = dict(QUICK if args.quick else FULL)
  if args.seq_lens:
    config["seq_lens"] = tuple(int(s) for s in args.seq_lens.split(","))
  if args.formats:
    config["formats"] = tuple(args.formats.split(","))
  config["shard_size"] = args.shard_size
  run(config, args.out)


if __name__ == "__main__":
  main()
