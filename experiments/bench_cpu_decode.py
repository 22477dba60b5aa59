"""CPU decode benchmark: whole-cache einsum vs head-parallel GEMVs vs the shard path, one process.

Three formulations of the absorbed MLA decode step (one layer, B=1, H=16, C=512, R=64):
  (a) einsum        ops.mla_decode(impl="xla"): three einsums over the whole cache;
  (b) head_parallel one GEMV per head over the whole cache (`head_parallel_decode` below), the
                    XLA analogue of llama.cpp's head split: a labelled baseline, not a product;
  (c) shard         ops.mla_decode(impl="cpu"): ops/decode/cpu.py.
Each is first checked against ops.reference.mla_decode. Timing: the harness's timer for a shared
host (one waited-for call at a time, on the next of a set of input copies that together exceed
rotate_bytes, so the cache comes from DRAM, not L3), in rounds of one block per formulation, the
order rotating every round (harness.interleave); every case is prepared first, and its rounds are
timed in `passes` spread over the run; the median per formulation is reported. The
memory floor is cache bytes over the read bandwidth of a large array sum timed in the same
process (before the cases and after each pass; the fastest is used); the compute floor is the
step's GEMM FLOPs over the rate of a large GEMM timed in the same process. The rate of the shard
path's own score product, a step's [H, C+R]·[C+R, shard] batched over its shards, is timed
beside it: what XLA CPU makes of the skinny products, against the large GEMM.
"""

from __future__ import annotations

import functools
import math
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax

from mla_jax import ops, quant
from mla_jax.ops import reference
from mla_jax.ops.decode import cpu

from experiments import harness

KIND = "cpu_decode"
f32 = jnp.float32
SM_SCALE = (128 + 64) ** -0.5
IMPLS = ("einsum", "head_parallel", "shard")


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


def cache_bytes(B, S, C, R, fmt):
  """Bytes one decode step must read: c_kv (+ int8 scales) and k_rope (bfloat16 beside int8)."""
  if fmt == "int8":
    return B * S * (C + 4 + 2 * R)
  return B * S * (C + R) * jnp.dtype(fmt).itemsize


def _input_sets(config, key, S, fmt, length):
  """Copies of one random decode input, enough to exceed rotate_bytes (at most max_sets)."""
  B, H, C, R = config.batch_size, config.num_heads, config.kv_lora_rank, config.rope_dim
  dtype = jnp.bfloat16 if fmt == "int8" else jnp.dtype(fmt)
  kq, kr, kc, kk = jax.random.split(key, 4)
  q_latent = jax.random.normal(kq, (B, H, C), dtype)
  q_rope = jax.random.normal(kr, (B, H, R), dtype)
  lengths = jnp.full((B,), length, jnp.int32)
  n = harness.num_sets(cache_bytes(B, S, C, R, fmt), config.rotate_bytes,
                       max_sets=config.max_sets)
  sets = []
  for i in range(n):
    c_kv = jax.random.normal(jax.random.fold_in(kc, i), (B, S, C), f32)
    c_kv = quant.quantize_rows(c_kv) if fmt == "int8" else c_kv.astype(dtype)
    k_rope = jax.random.normal(jax.random.fold_in(kk, i), (B, S, R), dtype)
    sets.append((q_latent, q_rope, c_kv, k_rope, lengths))
  return jax.block_until_ready(sets)


def read_bandwidth(nbytes: int, trials: int = 9) -> float:
  """Bytes/s of a jitted sum over an nbytes float32 array (median of trials)."""
  x = jax.random.normal(jax.random.key(1), (nbytes // 4,), f32)
  total = jax.jit(jnp.sum)
  jax.block_until_ready(total(x))
  samples = []
  for _ in range(trials):
    t0 = time.perf_counter()
    jax.block_until_ready(total(x))
    samples.append(time.perf_counter() - t0)
  return nbytes / statistics.median(samples)


def _rate(product, a, b, flops: int, trials: int = 3) -> float:
  """FLOP/s of product(a, b), `flops` each (best of trials; repeated inside one call, with a
  changed by each repeat so that XLA cannot hoist the product out of the loop)."""
  repeats = max(1, 2**31 // flops)
  out = jax.eval_shape(product, a, b)

  def products(a, b):
    body = lambda i, acc: acc + product(a + i.astype(a.dtype), b)
    return jax.lax.fori_loop(0, repeats, body, jnp.zeros(out.shape, out.dtype))

  timed = jax.jit(products)
  jax.block_until_ready(timed(a, b))
  best = math.inf
  for _ in range(trials):
    t0 = time.perf_counter()
    jax.block_until_ready(timed(a, b))
    best = min(best, time.perf_counter() - t0)
  return flops * repeats / best


def gemm_rate(dtype, m: int, k: int, n: int) -> float:
  """FLOP/s of an [m,k]·[k,n] XLA dot with float32 accumulation."""
  a = jax.random.normal(jax.random.key(2), (m, k), dtype)
  b = jax.random.normal(jax.random.key(3), (k, n), dtype)
  return _rate(functools.partial(jnp.dot, preferred_element_type=f32), a, b, 2 * m * k * n)


def _shard_gemm_gflops(config) -> dict:
  """GFLOP/s of the shard path's score product as a step runs it: the queries [H, C+R] against
  each of a step's shards [shard, C+R], batched over the shards, in the operand order the path
  uses (cpu.rows_left), with the default sizes; per compute dtype (float32 for a float32 cache,
  bfloat16 otherwise)."""
  H, K = config.num_heads, config.kv_lora_rank + config.rope_dim
  found = {}
  for dtype in ("float32", "bfloat16"):
    tuning = cpu.choose_tuning(H, config.kv_lora_rank, config.rope_dim, dtype)
    g, shard = tuning.shards_per_step, tuning.shard_size
    q = jax.random.normal(jax.random.key(2), (g, H, K), dtype)
    rows = jax.random.normal(jax.random.key(3), (g, shard, K), dtype)
    order = "rows·qᵀ" if cpu.rows_left(dtype) else "q·rowsᵀ"
    found[dtype] = {"shape": f"{g}× [{H},{K}]·[{K},{shard}], {order}",
                    "gflops": _rate(jax.vmap(cpu.score_product), q, rows,
                                    2 * g * H * K * shard) / 1e9}
  return found


class _Case:
  """One (format, S, length): its inputs, checked against the reference, and its timers.

  Every case of a run is prepared first and then timed in `passes` spread over the run, each pass
  a share of the case's alternating rounds: a spell of load from another job on the shared host
  then slows a few rounds of many cases, not all rounds of one.
  """

  def __init__(self, config, key, S, fmt, length=None):
    B, H, C, R = config.batch_size, config.num_heads, config.kv_lora_rank, config.rope_dim
    length = S if length is None else length
    sets = _input_sets(config, key, S, fmt, length)
    shard = {"impl": "cpu"}
    if config.shard_size is not None:
      shard["tuning"] = {"shard_size": config.shard_size}
    plan, shard_options = harness.plan_variant(ops.decode.plan, sets[0], shard)
    fns = {"einsum": lambda *a: ops.mla_decode(*a, sm_scale=SM_SCALE, impl="xla"),
           "head_parallel": lambda *a: head_parallel_decode(*a, sm_scale=SM_SCALE),
           "shard": lambda *a: ops.mla_decode(*a, sm_scale=SM_SCALE, **shard_options)}
    self.flops = 2 * B * H * length * (2 * C + R)
    self.row = {"format": fmt, "S": S, "length": length,
                "cache_bytes": cache_bytes(B, length, C, R, fmt), "input_sets": len(sets),
                "shard_size": getattr(plan.tuning, "shard_size", None), "plan": str(plan)}
    ref_out, ref_lse = reference.mla_decode(*sets[0], sm_scale=SM_SCALE)
    for name, fn in fns.items():
      out, lse = fn(*sets[0])
      self.row[f"{name}_rel_err"] = harness.rel_err(out, ref_out)
      self.row[f"{name}_lse_max_abs_err"] = float(jnp.max(jnp.abs(lse - ref_lse)))
    self.timers = {name: harness.Timer(fn, sets, fused=False) for name, fn in fns.items()}
    warm = {name: timer.sample(min(3, len(sets)), sync_each=True)
            for name, timer in self.timers.items()}
    rounds = int(config.seconds_per_case / ((config.calls_per_block + 1) * sum(warm.values())))
    self.rounds = max(config.min_rounds, min(config.max_rounds, rounds))
    self.samples = {name: [] for name in IMPLS}
    self.timed_rounds = 0

  def time(self, config, rounds: int):
    """`rounds` more alternating rounds of the three formulations."""
    found = harness.interleave(self.timers, rounds=rounds, calls_per_block=config.calls_per_block)
    for name, seconds in found.items():
      self.samples[name] += seconds
    self.timed_rounds += rounds

  def result(self, rates) -> dict:
    """The row: medians over all samples so far, ratios and the compute floor (the memory floor
    is set by run, from the fastest bandwidth of the run)."""
    row = dict(self.row, rounds=self.timed_rounds)
    row["compute_floor_ms"] = self.flops / rates["float32" if row["format"] == "float32"
                                                 else "bfloat16"] * 1e3
    for name in IMPLS:
      ms = statistics.median(self.samples[name]) * 1e3
      row[f"{name}_ms"] = ms
      row[f"{name}_ms_min"] = min(self.samples[name]) * 1e3
      row[f"{name}_gbps"] = row["cache_bytes"] / ms * 1e-6
    row["shard_over_compute_floor"] = row["shard_ms"] / row["compute_floor_ms"]
    row["einsum_over_compute_floor"] = row["einsum_ms"] / row["compute_floor_ms"]
    row["shard_vs_einsum"] = row["einsum_ms"] / row["shard_ms"]
    row["shard_vs_head_parallel"] = row["head_parallel_ms"] / row["shard_ms"]
    row["head_parallel_vs_einsum"] = row["einsum_ms"] / row["head_parallel_ms"]
    return row


def run(config, workdir: str, name: str = KIND, title: str = "") -> dict:
  """Checks and times every (format, S) of `config`; writes <name>.json, .md and .png."""
  results = harness.new_results(config, name, KIND, title)
  start = time.perf_counter()
  key = jax.random.key(config.seed)
  results["loadavg_before"] = harness.loadavg()
  bandwidths = [read_bandwidth(config.bandwidth_bytes)]
  n = config.gemm_size
  rates = {d: gemm_rate(d, n, n, n) for d in ("bfloat16", "float32")}
  results["gemm_gflops"] = {d: r / 1e9 for d, r in rates.items()}
  results["shard_gemm_gflops"] = _shard_gemm_gflops(config)
  print(f"load {results['loadavg_before']}  read bandwidth {bandwidths[0] / 1e9:.1f} GB/s  GEMM "
        + ", ".join(f"{d} {r / 1e9:.0f} GFLOP/s" for d, r in rates.items()) + "; shard GEMM "
        + ", ".join(f"{d} {g['gflops']:.0f} GFLOP/s ({g['shape']})"
                    for d, g in results["shard_gemm_gflops"].items()), flush=True)
  grid = [(S, fmt, None) for fmt in config.formats for S in config.seq_lens]
  grid += [(S, "bfloat16", length) for S, length in config.partial_fills]
  cases = []
  with harness.run_status(results):
    for S, fmt, length in grid:
      key, sub = jax.random.split(key)
      cases.append((length is not None, _Case(config, sub, S, fmt, length)))
      print(f"checked {fmt} S={S}" + (f" ({length} live)" if length else "") + ": "
            f"{cases[-1][1].rounds} rounds", flush=True)
    for p in range(config.passes):
      for _, case in cases:
        case.time(config, _share(case.rounds, config.passes, p))
      bandwidths.append(read_bandwidth(config.bandwidth_bytes))
      print(f"pass {p + 1}/{config.passes} timed ({time.perf_counter() - start:.0f} s)",
            flush=True)
  bandwidth = max(bandwidths)
  rows = [(partial, case.result(rates)) for partial, case in cases if case.timed_rounds]
  for _, r in rows:  # floors against the fastest bandwidth
    r["memory_floor_ms"] = r["cache_bytes"] / bandwidth * 1e3
    for impl in IMPLS:
      r[f"{impl}_over_floor"] = r[f"{impl}_ms"] / r["memory_floor_ms"]
  results["rows"] = [r for partial, r in rows if not partial]
  results["partial_fills"] = [r for partial, r in rows if partial]
  results["loadavg_after"] = harness.loadavg()
  results["read_bandwidth_gbps"] = {"before": bandwidths[0] / 1e9, "after": bandwidths[-1] / 1e9,
                                    "all": [b / 1e9 for b in bandwidths], "used": bandwidth / 1e9}
  results["elapsed_s"] = time.perf_counter() - start
  write(workdir, results, plot_too=config.plot)
  print(table(results))
  return results


def _share(rounds: int, passes: int, p: int) -> int:
  """Pass p's share of `rounds` rounds split over `passes` passes (they sum to `rounds`)."""
  return rounds * (p + 1) // passes - rounds * p // passes


def table(results: dict) -> str:
  """One row per (cache format, S): median ms of each formulation, the shard path's GB/s and
  speedups, the memory and compute floors."""
  lines = []
  for r in results["rows"] + results.get("partial_fills", []):
    size = str(r["S"]) if r["length"] == r["S"] else f"{r['S']} ({r['length']})"
    lines.append([r["format"], size, f"{r['einsum_ms']:.3f}", f"{r['head_parallel_ms']:.3f}",
                  f"{r['shard_ms']:.3f}", f"{r['shard_gbps']:.1f}",
                  f"{r['shard_vs_einsum']:.2f}x", f"{r['shard_vs_head_parallel']:.2f}x",
                  f"{r['memory_floor_ms']:.3f}", f"{r['shard_over_floor']:.2f}",
                  f"{r['compute_floor_ms']:.3f}",
                  harness.fmt(r.get("shard_over_compute_floor"), ".2f")])
  return harness.md_table(
      ["cache", "S (live)", "einsum ms", "head-par ms", "shard ms", "shard GB/s", "vs einsum",
       "vs head-par", "floor ms", "shard/floor", "compute floor ms", "shard/compute"], lines)


def markdown(results: dict) -> str:
  bw = results.get("read_bandwidth_gbps") or {}
  gemm = results.get("gemm_gflops") or {}
  lines = [table(results), "",
           "ms: median of single waited-for calls over alternating rounds of the three "
           f"formulations, timed in {results['config'].get('passes', 1)} passes over all cases, "
           "rotating input copies; floor ms: cache bytes over the fastest read "
           f"bandwidth measured in the run ({harness.fmt(bw.get('used'), '.1f')} GB/s); compute "
           "floor: the step's GEMM FLOPs at the rate of a large GEMM "
           + ", ".join(f"({d} {g:.0f} GFLOP/s)" for d, g in gemm.items())
           + "; the shard path's score GEMM alone runs at "
           + ", ".join(f"{d} {g['gflops']:.0f} GFLOP/s ({g['shape']})"
                       for d, g in (results.get("shard_gemm_gflops") or {}).items())
           + f"; host load {results.get('loadavg_before')} before, "
           f"{results.get('loadavg_after')} after."]
  return harness.page(lines, results)


def plot(results: dict, path: str):
  """Speedup of the shard path over (a) and (b) against context length, one line per format."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  rows, config = results["rows"], results["config"]
  rounds = sorted({r["rounds"] for r in rows}) or [0]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
  for ax, key, label in ((axes[0], "shard_vs_einsum", "(a) the whole-cache einsum"),
                         (axes[1], "shard_vs_head_parallel", "(b) head-parallel GEMVs")):
    for fmt in dict.fromkeys(r["format"] for r in rows):
      pts = sorted((r["S"], r[key]) for r in rows if r["format"] == fmt)
      ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{fmt} cache")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.axhline(3.0, color="gray", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length S (cached tokens)")
    ax.set_title(f"shard path over {label}", fontsize=10)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("speedup (ratio of median times per decode step)")
  axes[0].legend()
  fig.suptitle(
      f"Absorbed MLA decode, one layer: B={config['batch_size']}, {config['num_heads']} heads, "
      f"latent {config['kv_lora_rank']} + rope {config['rope_dim']}, on "
      f"{harness.run_info(results)['device']}\nmedian of single calls over "
      f"{rounds[0]}–{rounds[-1]} alternating rounds of {config['calls_per_block']} calls "
      f"in {config.get('passes', 1)} passes; "
      f"dashed: 3×; host load "
      f"{results.get('loadavg_before')} → {results.get('loadavg_after')}", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write(workdir: str, results: dict, *, plot_too: bool = True) -> list[str]:
  return harness.write(workdir, results, markdown=markdown, plot=plot if plot_too else None)
