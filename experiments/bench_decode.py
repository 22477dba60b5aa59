"""Decode-kernel benchmark: ops.mla_decode's Pallas kernels against the XLA absorbed einsum.

For every (H, B, S, cache format) each implementation is first checked against the float32
reference (ops.reference.mla_decode) on fresh random inputs, then timed with the harness's timer
over input sets rotated so that one pass reads more than config.rotate_bytes: device time per
call (the headline on a GPU) and wall time per call. TB/s counts the cache bytes that must be
read: c_kv (+ int8 scales) and k_rope of the valid rows. Each variant's row says which kernel
and tuning it ran, as ops.decode.plan reports them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mla_jax import ops, quant
from mla_jax.ops import reference

from experiments import harness

KIND = "decode_kernels"
C, R = 512, 64  # kv_lora_rank and rope dims of DeepSeek-V2/V3
SM_SCALE = (128 + 64) ** -0.5  # (K+R)^-0.5; the scale does not change the timing


def cache_bytes(B: int, S: int, fmt: str) -> int:
  """Bytes one decode call must read: c_kv (+ a float32 scale a row for int8) and k_rope."""
  per_token = (C + 4 if fmt == "int8" else 2 * C) + 2 * R
  return B * S * per_token


def _inputs(key, B, H, S, fmt):
  kq, kr, kc, kk = jax.random.split(key, 4)
  q_latent = jax.random.normal(kq, (B, H, C), jnp.bfloat16)
  q_rope = jax.random.normal(kr, (B, H, R), jnp.bfloat16)
  c_kv = jax.random.normal(kc, (B, S, C), jnp.bfloat16)
  if fmt == "int8":
    c_kv = quant.quantize_rows(c_kv)
  k_rope = jax.random.normal(kk, (B, S, R), jnp.bfloat16)
  lengths = jnp.full((B,), S, jnp.int32)
  return q_latent, q_rope, c_kv, k_rope, lengths


def _implementations(config) -> dict:
  """name -> variant; the XLA einsum first: every speedup is against it."""
  variants = {"xla": {"impl": "xla"}}
  variants.update({name: v for name, v in config.variants.items()})
  return variants


def _case(config, key, H, B, S, fmt) -> dict:
  nbytes = cache_bytes(B, S, fmt)
  n = harness.num_sets(nbytes, config.rotate_bytes, max_sets=config.max_sets)
  sets = [_inputs(k, B, H, S, fmt) for k in jax.random.split(key, n)]
  row = {"H": H, "B": B, "S": S, "format": fmt, "cache_bytes": nbytes, "input_sets": n}
  ref_out, ref_lse = (reference.mla_decode(*sets[0], sm_scale=SM_SCALE) if config.check
                      else (None, None))
  for name, variant in _implementations(config).items():
    try:
      plan, options = harness.plan_variant(ops.decode.plan, sets[0], variant,
                                           interpret=config.interpret)
      fn = lambda *a, options=options: ops.mla_decode(*a, sm_scale=SM_SCALE, **options)
      row[f"{name}_plan"] = str(plan)
      if config.check:
        out, lse = fn(*sets[0])
        row[f"{name}_rel_err"] = harness.rel_err(out, ref_out)
        row[f"{name}_lse_max_abs_err"] = float(jnp.max(jnp.abs(lse - ref_lse)))
      timing = harness.measure(fn, sets, reps=config.reps, trials=config.trials,
                               min_trial_s=config.min_trial_s, profile_runs=config.profile_runs)
    except Exception as err:  # pylint: disable=broad-except  # a variant that fails is a result
      row[f"{name}_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
      continue
    row[f"{name}_wall_us"] = timing.wall_us
    row[f"{name}_wall_us_samples"] = timing.wall_us_samples
    row[f"{name}_wall_tbps"] = nbytes / (timing.wall_us * 1e-6) / 1e12
    row[f"{name}_us"] = timing.us
    if timing.device is not None:
      row[f"{name}_kernels"] = timing.device.kernels
      row[f"{name}_kernels_us"] = dict(list(timing.device.kernels_us.items())[:4])
      row[f"{name}_copies_us"] = timing.device.copies_us
    row[f"{name}_tbps"] = nbytes / (row[f"{name}_us"] * 1e-6) / 1e12
  for name in config.variants:
    if f"{name}_us" in row and "xla_us" in row:
      row[f"{name}_speedup_vs_xla"] = row["xla_us"] / row[f"{name}_us"]
      row[f"{name}_wall_speedup_vs_xla"] = row["xla_wall_us"] / row[f"{name}_wall_us"]
  return row


def run(config, workdir: str, name: str = KIND, title: str = "") -> dict:
  """Checks and times every case of `config`; writes <name>.json and <name>.md to workdir."""
  results = harness.new_results(config, name, KIND, title)
  results["clock"] = "device" if jax.default_backend() == "gpu" else "wall"
  results["sm_scale"] = SM_SCALE
  key = jax.random.key(config.seed)
  with harness.run_status(results):
    for H in config.heads:
      for B, S in config.shapes:
        for fmt in config.formats:
          key, sub = jax.random.split(key)
          results["rows"].append(_case(config, sub, H, B, S, fmt))
          lines = table({**results, "rows": results["rows"][-1:]}).splitlines()
          print("\n".join(lines if len(results["rows"]) == 1 else lines[-1:]), flush=True)
          write(workdir, results)
  write(workdir, results)
  return results


def _variant_names(results: dict) -> list[str]:
  return list(results["config"].get("variants") or {"pallas": {}})


def table(results: dict) -> str:
  """One row per case: µs (device time on a GPU), wall µs and TB/s of the XLA einsum and of each
  variant, its speedup over XLA, its error against the reference and the kernel it ran."""
  header = ["H", "B", "S", "cache", "xla µs", "xla wall µs", "xla TB/s"]
  for name in _variant_names(results):
    header += [f"{name} µs", f"{name} wall µs", f"{name} TB/s", f"{name} × xla",
               f"{name} rel err", f"{name} kernel"]
  lines = []
  for r in results["rows"]:
    f = lambda k, spec=".1f": harness.fmt(r.get(k), spec)
    line = [r["H"], r["B"], r["S"], r["format"], f("xla_us"), f("xla_wall_us"),
            f("xla_tbps", ".2f")]
    for name in _variant_names(results):
      if f"{name}_error" in r:
        line += ["error", "", "", "", "", r[f"{name}_error"][:80]]
        continue
      line += [f(f"{name}_us"), f(f"{name}_wall_us"), f(f"{name}_tbps", ".2f"),
               f(f"{name}_speedup_vs_xla", ".2f"), f(f"{name}_rel_err", ".1e"),
               r.get(f"{name}_plan") or r.get("default_tuning", "")]
    lines.append(line)
  return harness.md_table(header, lines, "rrrl" + "r" * (len(header) - 5) + "l")


def markdown(results: dict) -> str:
  clock = ("device time per call (the GPU kernels of a profiler trace)"
           if results.get("clock", "device") == "device"
           else "wall time per call (no GPU, so no device trace)")
  lines = [table(results), "",
           f"µs: {clock}; wall µs: median over trials of enqueued jitted calls over rotated "
           "input sets; TB/s: cache bytes (c_kv, int8 scales, k_rope) over µs; rel err: "
           "‖out − ref‖/‖ref‖ against the float32 reference; device time excludes copies "
           "(<variant>_copies_us in the JSON)."]
  return harness.page(lines, results)


plot = None  # no plot: the tables are the result


def write(workdir: str, results: dict) -> list[str]:
  return harness.write(workdir, results, markdown=markdown)
