"""Benchmark of the split-KV decode kernel against the XLA absorbed einsum, in one device call.

For every (H, B, S, cache format) it first checks each implementation against the float32
reference (ops.reference.mla_decode) on fresh random inputs, then times it two ways (METHOD.md).
Input sets are rotated so that one pass touches more than ROTATE_BYTES (several times the 50 MB
L2) and one jitted call runs every set. Wall time: `reps` such calls are enqueued and waited for
once, median over `trials`, per decode call. Device time (the headline number, on a GPU): the
GPU kernel durations of a jax.profiler trace of such calls, summed per decode call. TB/s counts
the cache bytes that must be read: c_kv (+ int8 scales) and k_rope of the valid rows.

  python -m experiments.bench_decode --out DIR [--quick] [--heads 16 --shapes 1x131072,8x16384
      --formats bf16 --variants '{"p128": {"num_splits": 128}}']

writes DIR/bench_decode.json. `run(config, workdir)` is the entry point for the experiment runner.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import math
import os
import platform
import statistics
import tempfile
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mla_jax import ops, quant
from mla_jax.ops import decode_gpu, decode_mgpu, decode_mgpu_heads, reference

C, R = 512, 64
SM_SCALE = (128 + 64) ** -0.5
ROTATE_BYTES = 256 << 20
MAX_SETS = 64  # at least 150 MB (3x L2) for the smallest benchmark case
MIN_TRIAL_S = 0.03  # each timed trial enqueues at least this much device work

FULL = {
    "heads": (16, 128),
    "shapes": ((1, 4096), (1, 16384), (1, 131072), (8, 16384), (64, 4096), (64, 16384)),
    "formats": ("bf16", "int8"),
    "variants": {"pallas": {}},
    "reps": 10,
    "trials": 5,
    "check": True,
}
QUICK = dict(FULL, heads=(16,), shapes=((1, 16384), (8, 16384)), reps=5, trials=3)


def _cache_bytes(B, S, fmt):
  per_token = (C + 4 if fmt == "int8" else 2 * C) + 2 * R
  return B * S * per_token


def _make_inputs(key, B, H, S, fmt):
  kq, kr, kc, kk = jax.random.split(key, 4)
  q_latent = jax.random.normal(kq, (B, H, C), jnp.bfloat16)
  q_rope = jax.random.normal(kr, (B, H, R), jnp.bfloat16)
  c_kv = jax.random.normal(kc, (B, S, C), jnp.bfloat16)
  if fmt == "int8":
    c_kv = quant.quantize_rows(c_kv)
  k_rope = jax.random.normal(kk, (B, S, R), jnp.bfloat16)
  lengths = jnp.full((B,), S, jnp.int32)
  return q_latent, q_rope, c_kv, k_rope, lengths


def _impl_fn(name, options):
  if name == "xla":
    return lambda *a: ops.mla_decode(*a, sm_scale=SM_SCALE, impl="xla")
  interpret = jax.default_backend() != "gpu"  # a CPU smoke run goes through interpret mode
  return lambda *a: decode_gpu.mla_decode(*a, sm_scale=SM_SCALE, interpret=interpret, **options)


def _rel_err(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  if not np.all(np.isfinite(x)):
    return float("nan")
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def _time_us(fn, sets, reps, trials):
  """Median over trials of (time of `reps` enqueued calls over all sets) / (reps · len(sets)).

  reps grows until one trial lasts MIN_TRIAL_S, so that dispatch and clock ramps do not count.
  """
  many = jax.jit(lambda sets: [fn(*s) for s in sets])
  t0 = time.perf_counter()
  jax.block_until_ready(many(sets))
  jax.block_until_ready(many(sets))
  once = (time.perf_counter() - t0) / 2
  reps = max(reps, math.ceil(MIN_TRIAL_S / max(once, 1e-6)))
  samples = []
  for _ in range(trials):
    t0 = time.perf_counter()
    for _ in range(reps):
      outs = many(sets)
    jax.block_until_ready(outs)
    samples.append((time.perf_counter() - t0) / (reps * len(sets)) * 1e6)
  return statistics.median(samples), samples


def _device_us(fn, sets, calls):
  """Device time per call from a jax.profiler trace: summed durations of the GPU's stream events
  (kernels and copies; launch gaps excluded). Returns (µs per call, {kernel: µs per call})."""
  many = jax.jit(lambda sets: [fn(*s) for s in sets])
  jax.block_until_ready(many(sets))
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      for _ in range(calls):
        outs = many(sets)
      jax.block_until_ready(outs)
    [path] = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
    profile = jax.profiler.ProfileData.from_file(path)
  per_kernel = collections.Counter()
  for plane in profile.planes:
    if not plane.name.startswith("/device:GPU"):
      continue
    for line in plane.lines:
      if "Stream" in line.name:
        for event in line.events:
          per_kernel[event.name] += event.duration_ns / 1e3 / (calls * len(sets))
  return sum(per_kernel.values()), dict(per_kernel.most_common(4))


def _bench_case(key, H, B, S, fmt, variants, reps, trials, check):
  nbytes = _cache_bytes(B, S, fmt)
  num_sets = min(MAX_SETS, max(1, math.ceil(ROTATE_BYTES / nbytes)))
  keys = jax.random.split(key, num_sets)
  sets = [_make_inputs(k, B, H, S, fmt) for k in keys]
  row = {"H": H, "B": B, "S": S, "format": fmt, "cache_bytes": nbytes, "input_sets": num_sets}
  impls = {"xla": {}, **variants}
  if check:
    ref_out, ref_lse = reference.mla_decode(*sets[0], sm_scale=SM_SCALE)
    for name, options in impls.items():
      out, lse = _impl_fn(name, options)(*sets[0])
      row[f"{name}_rel_err"] = _rel_err(out, ref_out)
      row[f"{name}_lse_max_abs_err"] = float(jnp.max(jnp.abs(lse - ref_lse)))
    del ref_out, ref_lse
  for name, options in impls.items():
    us, samples = _time_us(_impl_fn(name, options), sets, reps, trials)
    row[f"{name}_wall_us"] = us
    row[f"{name}_wall_us_samples"] = samples
    row[f"{name}_wall_tbps"] = nbytes / (us * 1e-6) / 1e12
    if jax.default_backend() == "gpu":
      dev_us, kernels = _device_us(_impl_fn(name, options), sets, max(1, reps // 2))
      row[f"{name}_us"] = dev_us
      row[f"{name}_kernels_us"] = kernels
    else:
      row[f"{name}_us"] = us
    row[f"{name}_tbps"] = nbytes / (row[f"{name}_us"] * 1e-6) / 1e12
  for name in variants:
    row[f"{name}_speedup_vs_xla"] = row["xla_us"] / row[f"{name}_us"]
    row[f"{name}_wall_speedup_vs_xla"] = row["xla_wall_us"] / row[f"{name}_wall_us"]
  q_latent, _, c_kv, k_rope, _ = sets[0]
  mosaic, unsupported = decode_gpu.mosaic_kernel(q_latent, c_kv, k_rope)
  if decode_gpu.is_hopper() and unsupported is None:
    P = (decode_mgpu_heads.choose_splits(B, H, S, decode_gpu.num_sms())
         if mosaic is decode_mgpu_heads else decode_mgpu.choose_splits(B, S, decode_gpu.num_sms()))
    row["default_tuning"] = f"{mosaic.__name__.rsplit('.', 1)[-1]} P={P}"
  else:
    row["default_tuning"] = "triton " + str(decode_gpu.choose_tuning(
        B, H, S, num_sms=decode_gpu.num_sms(), cache_itemsize=1 if fmt == "int8" else 2))
  return row


def _table(rows, variants):
  """Device µs (profiler) and wall µs (enqueued calls) per decode call, TB/s on device time."""
  head = f"{'H':>4} {'B':>3} {'S':>7} {'fmt':>5} {'xla dev':>8} {'wall':>7} {'TB/s':>5}"
  for name in variants:
    head += f" | {name[:10]:>10} {'dev':>7} {'wall':>7} {'TB/s':>5} {'x':>5} {'err':>7}"
  lines = [head]
  for r in rows:
    line = (f"{r['H']:>4} {r['B']:>3} {r['S']:>7} {r['format']:>5} {r['xla_us']:>8.1f} "
            f"{r['xla_wall_us']:>7.1f} {r['xla_tbps']:>5.2f}")
    for name in variants:
      line += (f" | {'':>10} {r[f'{name}_us']:>7.1f} {r[f'{name}_wall_us']:>7.1f} "
               f"{r[f'{name}_tbps']:>5.2f} {r[f'{name}_speedup_vs_xla']:>5.2f} "
               f"{r.get(f'{name}_rel_err', float('nan')):>7.1e}")
    lines.append(line)
  return "\n".join(lines)


def run(config: Mapping[str, Any], workdir: str) -> dict:
  """Checks and times every case of `config` (fields as in FULL); writes bench_decode.json."""
  cfg = dict(FULL, **dict(config))
  variants = dict(cfg["variants"])
  key = jax.random.key(int(cfg.get("seed", time.time_ns() % (2**31))))
  rows = []
  device = jax.devices()[0]
  result = {
      "device": device.device_kind,
      "platform": jax.default_backend(),
      "num_sms": decode_gpu.num_sms(),
      "jax": jax.__version__,
      "python": platform.python_version(),
      "sm_scale": SM_SCALE,
      "timing": ("*_us: device time per call, summed GPU stream events of a jax.profiler trace; "
                 "*_wall_us: median over trials of reps enqueued jitted calls over rotated input "
                 "sets (launch gaps and host overhead included)"),
      "config": {k: (v if not isinstance(v, tuple) else list(v)) for k, v in cfg.items()},
      "rows": rows,
  }
  os.makedirs(workdir, exist_ok=True)
  for H in cfg["heads"]:
    for B, S in cfg["shapes"]:
      for fmt in cfg["formats"]:
        key, sub = jax.random.split(key)
        rows.append(_bench_case(sub, H, B, S, fmt, variants, cfg["reps"], cfg["trials"],
                                cfg["check"]))
        print(_table(rows[-1:], variants).splitlines()[-1], flush=True)
        with open(os.path.join(workdir, "bench_decode.json"), "w") as f:  # after every case
          json.dump(result, f, indent=1, default=str)
  print(_table(rows, variants))
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="folder for bench_decode.json")
  parser.add_argument("--quick", action="store_true", help="two shapes, H=16 only")
  parser.add_argument("--variants", default=None,
                      help='JSON {"name": {kernel options}} to time instead of the default')
  parser.add_argument("--heads", default=None, help="comma-separated H values, e.g. 16,128")
  parser.add_argument("--shapes", default=None, help="comma-separated BxS, e.g. 1x131072,8x16384")
  parser.add_argument("--formats", default=None, help="comma-separated cache formats: bf16,int8")
  args = parser.parse_args()
  config = dict(QUICK if args.quick else FULL)
  if args.variants:
    config["variants"] = json.loads(args.variants)
  if args.heads:
    config["heads"] = tuple(int(h) for h in args.heads.split(","))
  if args.shapes:
    config["shapes"] = tuple(tuple(int(n) for n in bs.split("x")) for bs in args.shapes.split(","))
  if args.formats:
    config["formats"] = tuple(args.formats.split(","))
  run(config, args.out)


if __name__ == "__main__":
  main()
