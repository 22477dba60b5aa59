"""Context-parallel decode benchmark: parallel.mla_decode_sharded against ops.mla_decode.

Two tables, on a mesh of config.mesh_size devices (0: all of them) along one "kv" axis:
- decode: for every (B, S, cache format), ops.mla_decode on one device ("single") and
  mla_decode_sharded with the cache split over the mesh, once per merge in config.combines; each
  first checked against the float32 reference (ops.reference.mla_decode);
- merge: the merges alone (parallel.MERGES under jax.shard_map) on random partials [B,H,C] and
  lse [B,H] per device, for every (B, H) of config.merge_shapes: what the choice of collective
  costs without the kernel around it.
Timing: harness.interleave's rounds of single waited-for calls over rotated input sets, the
order rotating every round; the median µs per call. On a one-device mesh (a single GPU) the
decode table is the cost of the shard_map wrapper; between devices it needs one host with
several GPUs (docs/parallel.md).
"""

from __future__ import annotations

import functools
import statistics

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from mla_jax import ops, parallel, quant
from mla_jax.ops import reference

from experiments import harness

KIND = "parallel_decode"
C, R = 512, 64  # kv_lora_rank and rope dims of DeepSeek-V2/V3
SM_SCALE = (128 + 64) ** -0.5  # (K+R)^-0.5; the scale does not change the timing


def _mesh(config):
  n = config.mesh_size or jax.device_count()
  if n > jax.device_count():
    raise harness.ConfigError(f"mesh_size={n}: only {jax.device_count()} devices")
  return jax.make_mesh((n,), ("kv",), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])


def _decode_sets(config, key, B, S, fmt):
  """Rotated input sets (q_latent, q_rope, c_kv, k_rope, lengths), full rows."""
  dtype = jnp.dtype(jnp.bfloat16 if fmt in ("bf16", "int8") else fmt)
  per_token = (C + 4 if fmt == "int8" else C * dtype.itemsize) + R * dtype.itemsize
  n = harness.num_sets(B * S * per_token, config.rotate_bytes, max_sets=config.max_sets)
  sets = []
  for k in jax.random.split(key, n):
    kq, kr, kc, kk = jax.random.split(k, 4)
    c_kv = jax.random.normal(kc, (B, S, C), dtype)
    sets.append((jax.random.normal(kq, (B, config.num_heads, C), dtype),
                 jax.random.normal(kr, (B, config.num_heads, R), dtype),
                 quant.quantize_rows(c_kv) if fmt == "int8" else c_kv,
                 jax.random.normal(kk, (B, S, R), dtype), jnp.full((B,), S, jnp.int32)))
  return sets


def _timed(fns: dict, sets: dict, config) -> dict[str, float]:
  """{"<name>_us": median wall µs per call of each fn over its own input sets, interleaved;
  on a GPU also "<name>_device_us": its kernels' time per call, summed over all devices}."""
  timers = {name: harness.Timer(fn, sets[name], fused=False) for name, fn in fns.items()}
  samples = harness.interleave(timers, rounds=config.rounds,
                               calls_per_block=config.calls_per_block)
  times = {f"{name}_us": statistics.median(s) * 1e6 for name, s in samples.items()}
  for name, timer in timers.items():
    device = timer.device(config.profile_runs)
    if device is not None:
      times[f"{name}_device_us"] = device.us
  return times


def _decode_case(config, key, mesh, B, S, fmt) -> dict:
  row = {"B": B, "H": config.num_heads, "S": S, "format": fmt, "devices": mesh.shape["kv"]}
  single = _decode_sets(config, key, B, S, fmt)
  cache = parallel.sequence_sharding(mesh)
  sharded = [(q, q_r, jax.device_put(c_kv, cache), jax.device_put(k_rope, cache), lengths)
             for q, q_r, c_kv, k_rope, lengths in single]
  fns = {"single": functools.partial(ops.mla_decode, sm_scale=SM_SCALE, impl=config.impl)}
  sets = {"single": single}
  for combine in config.combines:
    fns[combine] = functools.partial(parallel.mla_decode_sharded, sm_scale=SM_SCALE, mesh=mesh,
                                     impl=config.impl, combine=combine)
    sets[combine] = sharded
  ref_out, _ = reference.mla_decode(*single[0], sm_scale=SM_SCALE)
  for name, fn in fns.items():
    row[f"{name}_rel_err"] = harness.rel_err(fn(*sets[name][0])[0], ref_out)
  row.update(_timed(fns, sets, config))
  for combine in config.combines:
    row[f"{combine}_over_single"] = row[f"{combine}_us"] / row["single_us"]
  return row


def _merge_case(config, key, mesh, B, H) -> dict:
  n = mesh.shape["kv"]
  split = NamedSharding(mesh, P("kv"))
  sets = []
  for k in jax.random.split(key, config.merge_sets):
    ko, kl = jax.random.split(k)
    sets.append(jax.device_put((jax.random.normal(ko, (n * B, H, C), jnp.float32),
                                jax.random.normal(kl, (n * B, H), jnp.float32)), split))
  fns = {combine: jax.shard_map(functools.partial(parallel.MERGES[combine], axis="kv"),
                                mesh=mesh, in_specs=(P("kv"), P("kv")), out_specs=(P(), P()),
                                check_vma=False)
         for combine in config.combines}
  return {"B": B, "H": H, "devices": n, **_timed(fns, {c: sets for c in fns}, config)}


def run(config, workdir: str, name: str = KIND, title: str = "") -> dict:
  """Checks and times every decode and merge case of `config`; writes <name>.json and .md."""
  unknown = set(config.combines) - set(parallel.MERGES)
  if unknown:
    raise harness.ConfigError(f"combines: {sorted(unknown)}; expected some of "
                              f"{tuple(parallel.MERGES)}")
  mesh = _mesh(config)
  results = harness.new_results(config, name, KIND, title)
  results["devices"] = mesh.shape["kv"]
  results["merge_rows"] = []
  key = jax.random.key(config.seed)
  with harness.run_status(results):
    for B, S in config.shapes:
      for fmt in config.formats:
        key, sub = jax.random.split(key)
        results["rows"].append(_decode_case(config, sub, mesh, B, S, fmt))
        lines = table({**results, "rows": results["rows"][-1:]}).splitlines()
        print("\n".join(lines if len(results["rows"]) == 1 else lines[-1:]), flush=True)
        write(workdir, results)
    for B, H in config.merge_shapes:
      key, sub = jax.random.split(key)
      results["merge_rows"].append(_merge_case(config, sub, mesh, B, H))
      write(workdir, results)
  write(workdir, results)
  print(markdown(results))
  return results


def table(results: dict) -> str:
  """One row per decode case: µs of the single-device call and of each merge on the mesh."""
  combines = results["config"]["combines"]
  header = ["B", "H", "S", "cache", "devices", "single µs"]
  for c in combines:
    header += [f"{c} µs", f"{c} / single", f"{c} rel err"]
  lines = []
  for r in results["rows"]:
    line = [r["B"], r["H"], r["S"], r["format"], r["devices"],
            harness.fmt(r["single_us"], ".1f")]
    for c in combines:
      line += [harness.fmt(r[f"{c}_us"], ".1f"), harness.fmt(r[f"{c}_over_single"]),
               harness.fmt(r[f"{c}_rel_err"], ".1e")]
    lines.append(line)
  return harness.md_table(header, lines, "rrrlr" + "r" * (len(header) - 5))


def merge_table(results: dict) -> str:
  combines = results["config"]["combines"]
  lines = [[r["B"], r["H"], r["devices"]] + [harness.fmt(r[f"{c}_us"], ".1f") for c in combines]
           for r in results["merge_rows"]]
  return harness.md_table(["B", "H", "devices"] + [f"{c} µs" for c in combines], lines,
                          "r" * (3 + len(combines)))


def markdown(results: dict) -> str:
  lines = [table(results), "", merge_table(results), "",
           "µs: median wall time of single waited-for calls, in rounds alternating the "
           "formulations, over rotated input sets; rel err: ‖out − ref‖/‖ref‖ against the "
           "float32 reference; the second table times the merge alone on [B,H,C] partials. "
           "On a GPU the JSON also holds <name>_device_us, the kernels' time per call summed "
           "over all devices."]
  return harness.page(lines, results)


plot = None  # no plot: the tables are the result


def write(workdir: str, results: dict) -> list[str]:
  return harness.write(workdir, results, markdown=markdown)
