"""Benchmark of the split-KV decode kernel against the XLA absorbed einsum, in one device call.

For every (H, B, S, cache format) it first checks each implementation against the float32
reference (ops.reference.mla_decode) on fresh random inputs, then times it. Timing (METHOD.md):
input sets are rotated so that one pass touches more than ROTATE_BYTES (several times the 50 MB
L2), one jitted call runs every set, `reps` such calls are enqueued and waited for once (dispatch
overlaps the device work), and the median over `trials` such measurements is reported per
decode call. TB/s counts the cache bytes that must be read: c_kv (+ int8 scales) and k_rope of
the valid rows.

  python -m experiments.bench_decode --out DIR [--quick]

writes DIR/bench_decode.json. `run(config, workdir)` is the entry point for the experiment runner.
"""

from __future__ import annotations

import argparse
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

from mla_jax import ops, quant
from mla_jax.ops import decode_gpu, reference

C, R = 512, 64
SM_SCALE = (128 + 64) ** -0.5
ROTATE_BYTES = 256 << 20
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
  return lambda *a: decode_gpu.mla_decode(*a, sm_scale=SM_SCALE, **options)


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


def _bench_case(key, H, B, S, fmt, variants, reps, trials, check):
  nbytes = _cache_bytes(B, S, fmt)
  num_sets = max(1, math.ceil(ROTATE_BYTES / nbytes))
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
    row[f"{name}_us"] = us
    row[f"{name}_us_samples"] = samples
    row[f"{name}_tbps"] = nbytes / (us * 1e-6) / 1e12
  for name in variants:
    row[f"{name}_speedup_vs_xla"] = row["xla_us"] / row[f"{name}_us"]
  row["default_tuning"] = str(decode_gpu.choose_tuning(
      B, H, S, num_sms=decode_gpu.num_sms(), cache_itemsize=1 if fmt == "int8" else 2))
  return row


def _table(rows, variants):
  head = f"{'H':>4} {'B':>3} {'S':>7} {'fmt':>5} {'xla us':>8} {'TB/s':>5}"
  for name in variants:
    head += f" | {name[:14]:>14} {'us':>7} {'TB/s':>5} {'x':>5} {'err':>7}"
  lines = [head]
  for r in rows:
    line = (f"{r['H']:>4} {r['B']:>3} {r['S']:>7} {r['format']:>5} {r['xla_us']:>8.1f} "
            f"{r['xla_tbps']:>5.2f}")
    for name in variants:
      line += (f" | {'':>14} {r[f'{name}_us']:>7.1f} {r[f'{name}_tbps']:>5.2f} "
               f"{r[f'{name}_speedup_vs_xla']:>5.2f} {r.get(f'{name}_rel_err', float('nan')):>7.1e}")
    lines.append(line)
  return "\n".join(lines)


def run(config: Mapping[str, Any], workdir: str) -> dict:
  """Checks and times every case of `config` (fields as in FULL); writes bench_decode.json."""
  cfg = dict(FULL, **dict(config))
  variants = dict(cfg["variants"])
  key = jax.random.key(int(cfg.get("seed", time.time_ns() % (2**31))))
  rows = []
  for H in cfg["heads"]:
    for B, S in cfg["shapes"]:
      for fmt in cfg["formats"]:
        key, sub = jax.random.split(key)
        row = _bench_case(sub, H, B, S, fmt, variants, cfg["reps"], cfg["trials"], cfg["check"])
        rows.append(row)
        print(_table([row], variants).splitlines()[-1], flush=True)
  device = jax.devices()[0]
  result = {
      "device": device.device_kind,
      "platform": jax.default_backend(),
      "num_sms": decode_gpu.num_sms(),
      "jax": jax.__version__,
      "python": platform.python_version(),
      "sm_scale": SM_SCALE,
      "timing": "median over trials of reps enqueued jitted calls over rotated input sets",
      "config": {k: (v if not isinstance(v, tuple) else list(v)) for k, v in cfg.items()},
      "rows": rows,
  }
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "bench_decode.json"), "w") as f:
    json.dump(result, f, indent=1, default=str)
  print(_table(rows, variants))
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="folder for bench_decode.json")
  parser.add_argument("--quick", action="store_true", help="two shapes, H=16 only")
  parser.add_argument("--variants", default=None,
                      help='JSON {"name": {kernel options}} to time instead of the default')
  args = parser.parse_args()
  config = dict(QUICK if args.quick else FULL)
  if args.variants:
    config["variants"] = json.loads(args.variants)
  run(config, args.out)


if __name__ == "__main__":
  main()
