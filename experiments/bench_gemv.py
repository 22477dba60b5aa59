"""Batched-GEMV benchmark: ops.batched_gemv's fused Pallas kernels vs XLA, then one decode step.

For every H, B, product (K -> N) and weight format: correctness against the float32 oracle first,
then the kernels each path launches (counted in the compiled HLO) and its time. x of the first
product is the strided view q[..., :K] of a [B,H,K+R] query, as in the module. Baseline "xla":
XLA einsum on bf16 weights, XLA dequantize-then-einsum on quantized ones. The timed variants are
config.timed, drawn from config.variants (and config.sweep, the tuning sweep); each row says
which kernel and tuning ran, as ops.gemv.plan reports them. The variant "xla_out_in" is XLA over
bf16 weights stored [N, K], layers.Linear's layout, where one row's product is a row reduction.

Timing (the harness's timer, ordered): one jitted chain of n calls over n distinct weight/input
copies (n·bytes >= rotate_bytes, so that weights come from HBM, not L2), each call ordered after
the last by an optimization barrier; `iters` chains enqueued and waited for once, the median over
`repeats`, per call; device time from a profiler trace of one chain. In the chain XLA may
materialize the slice x[..., :K] next to the barrier (a standalone call fuses it into its GEMM),
so device_us_standalone leaves those copies out. Also times the decode step of one V2-Lite layer
(B=1, S=decode_len): the wk_b product, ops.mla_decode and the wv_b product, fused vs XLA.
"""

from __future__ import annotations

import functools
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from mla_jax import MLAConfig, ops, quant
from mla_jax.ops import device, reference

from experiments import harness

KIND = "batched_gemv"
R = 64  # rope columns after q_nope in the query
# Kernels that XLA launches only inside the timed chain: a slice or transpose of x materialized
# next to the optimization barrier; a standalone call fuses both into its GEMM (its HLO has none).
_CHAIN_ARTIFACTS = ("wrapped_slice", "wrapped_transpose")
# Opcodes that launch no kernel of their own in XLA:GPU's compiled HLO.
_NO_KERNEL = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "opt-barrier",
              "after-all", "partition-id", "replica-id", "call", "while", "conditional"}
SHAPE_KEYS = ("H", "K", "N", "B", "fmt")  # what identifies a case; a row is a case and a path


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


def _variants(config, *, with_sweep: bool = True) -> dict:
  """name -> variant of every timed path, "xla" (the baseline) first; the tuning sweep's
  variants only while with_sweep."""
  table = {**config.variants.to_dict(), **config.sweep.to_dict()}
  unknown = [name for name in config.timed if name not in table]
  if unknown:
    raise ValueError(f"config.timed names {unknown}, which are in neither config.variants nor "
                     f"config.sweep")
  return {"xla": {"impl": "xla"}, **{name: table[name] for name in config.timed
                                    if with_sweep or name not in config.sweep}}


def _time(config, fn, args_list, row, nbytes):
  """Adds wall and device time of fn over the ordered chain of args_list to row."""
  timer = harness.Timer(fn, args_list, ordered=True)
  us, _ = timer.wall(reps=config.iters, trials=config.repeats, warmup=config.warmup)
  row["us"] = us
  if nbytes:
    row["GBps"] = nbytes / us / 1e3
  device = timer.device(config.profile_runs)
  if device is not None:
    copies_us = sum(t for k, t in device.kernels_us.items() if k.startswith(_CHAIN_ARTIFACTS))
    row.update(device_us=device.us, device_kernels=device.kernels,
               kernel_names=sorted(k[:80] for k in device.kernels_us),
               device_us_standalone=device.us - copies_us)
    if nbytes and device.us > 0:
      row["device_GBps"] = nbytes / device.us / 1e3


def _shape(config, H, K, N, B, fmt, rng, hlo_log, with_sweep) -> list[dict]:
  """Rows of one (H, K, N, B, fmt): one per path that can take it. With config.experts = E,
  the weight has E heads and head h of x reads head_ids[h] of them (H distinct, at random)."""
  dtype = jnp.dtype(config.dtype)
  E = config.experts or H
  if E < H:
    raise harness.ConfigError(f"experts={E}: expected 0 or at least max(heads) (H={H})")
  w32 = jnp.asarray(rng.standard_normal((E, K, N)) * K ** -0.5, jnp.float32)
  w = w32.astype(jnp.bfloat16) if fmt == "bf16" else quant.quantize(w32, fmt)
  head_ids = jnp.asarray(rng.choice(E, H, replace=False), jnp.int32) if config.experts else None
  chosen = w if head_ids is None else jax.tree.map(lambda a: a[np.asarray(head_ids)], w)
  width = K + R if K == 128 else K  # product 1 reads q_nope inside the whole query
  x = jnp.asarray(rng.standard_normal((B, H, width)), dtype)
  ref = reference.batched_gemv(x[..., :K], chosen)
  wbytes = (w.nbytes if fmt != "bf16" else w.size * 2) // E * H  # the bytes a call reads
  n = harness.num_sets(wbytes, config.rotate_bytes, min_sets=4, max_sets=config.max_chain)
  args_list = list(zip(harness.copies(x, n), harness.copies(w, n)))
  rows = []
  case = dict(H=H, K=K, N=N, B=B, fmt=fmt)
  for name, variant in _variants(config, with_sweep=with_sweep).items():
    only = variant.get("only") or {}
    if any(case[k] not in (v if isinstance(v, (tuple, list)) else (v,)) for k, v in only.items()):
      continue  # a variant for other cases (e.g. int8 activations need q8_0 weights)
    row = dict(**case, path=name, chain=n, weight_bytes=int(wbytes),
               **({"E": E} if head_ids is not None else {}))
    operands, variant_args = (x, w), args_list
    try:
      if variant.get("layout") == "out_in":
        fn, operands, variant_args = _out_in(fmt, head_ids, x, w, args_list)
        plan, row["plan"] = None, "xla, weights [out, in]"
      else:
        plan, options = harness.plan_variant(
            functools.partial(ops.gemv.plan, head_ids=head_ids), (x, w), variant,
            interpret=config.interpret)
        row["plan"] = str(plan)
        fn = lambda x, w, options=options: ops.batched_gemv(x, w, head_ids=head_ids, **options)
    except (ValueError, NotImplementedError) as err:  # this variant does not take this case
      rows.append({**row, "unsupported": f"{type(err).__name__}: {str(err).splitlines()[0]}"})
      continue
    try:
      start = time.perf_counter()
      compiled = jax.jit(fn).lower(*operands).compile()
      row["compile_s"] = time.perf_counter() - start
      y = compiled(*operands)
      ref_x = ref
      if plan is not None and getattr(plan.tuning, "int8", False):
        # int8 activations: the oracle on quantized x
        ref_x = reference.batched_gemv(quant.quantize_q8_1(x[..., :K]).dequantize(), chosen)
      row["rel_err"] = harness.rel_err(y, ref_x)
      row["ok"] = bool(row["rel_err"] <= config.rtol[fmt])  # NaN fails
      hlo = compiled.as_text()
      row["kernels"] = count_kernels(hlo)
      if H == max(config.heads) and B == config.hlo_batch and name in ("xla", "pallas"):
        hlo_log.write(f"==== H={H} K={K} N={N} B={B} {fmt} {name}: {row['kernels']} kernels\n"
                      f"{hlo}\n")
      _time(config, fn, variant_args, row, wbytes)
    except Exception as err:  # pylint: disable=broad-except  # a variant that fails is a result
      row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
    rows.append(row)
  return rows


def _out_in(fmt, head_ids, x, w, args_list):
  """(product, operands, operand copies) of the "out_in" layout: y[b,h] = x[b,h,:K] · w[h] with
  each w[h] stored transposed, [N, K], as layers.Linear stores its weight ([out, in]), so that
  XLA GPU runs one row's product as a row reduction (docs/decode_step.md). bf16, all heads."""
  if fmt != "bf16" or head_ids is not None:
    raise ValueError(f"fmt={fmt}, experts={head_ids is not None}: the [out, in] layout is timed "
                     "for bf16 weights of H heads only")
  product = lambda x, w: jnp.einsum("bhk,hnk->bhn", x[..., :w.shape[2]], w)
  transposed = [(xc, jnp.swapaxes(wc, 1, 2)) for xc, wc in args_list]
  return product, transposed[0], transposed


def _decode_step(config, rng) -> list[dict]:
  """One V2-Lite layer's absorbed decode at B=1, S=decode_len: products + decode kernel."""
  cfg = MLAConfig.deepseek_v2_lite()
  H, K, C, V = cfg.num_heads, cfg.qk_nope_head_dim, cfg.kv_lora_rank, cfg.v_head_dim
  S, bf16, interpret = config.decode_len, jnp.bfloat16, config.interpret
  q = jnp.asarray(rng.standard_normal((1, H, K + cfg.qk_rope_head_dim)), bf16)
  c_kv = jnp.asarray(rng.standard_normal((1, S, C)), bf16)
  k_rope = jnp.asarray(rng.standard_normal((1, S, cfg.qk_rope_head_dim)), bf16)
  lengths = jnp.asarray([S], jnp.int32)
  scale = cfg.softmax_scale
  wk32 = jnp.asarray(rng.standard_normal((H, K, C)) * K ** -0.5, jnp.float32)
  wv32 = jnp.asarray(rng.standard_normal((H, C, V)) * C ** -0.5, jnp.float32)
  q_latent = jax.ShapeDtypeStruct((1, H, C), bf16)  # also the decode output's shape
  xla, pallas = {"impl": "xla"}, {"impl": "pallas", "interpret": interpret}
  mosaic = {**pallas, "lowering": "mosaic"}
  # path -> (GEMV options, decode options); the Mosaic GEMVs where they take the product (the
  # Triton ones elsewhere), on a Hopper GPU only.
  paths = {"xla": (xla, xla), "xla_gemv+pallas_decode": (xla, pallas),
           "fused_gemv+pallas_decode": (pallas, pallas)}
  if not interpret and device.is_hopper():
    paths["fused_mosaic_gemv+pallas_decode"] = (mosaic, pallas)

  def plans(gemv_options, decode_options, wk, wv):
    """(plans of the step's three ops, the GEMV options of each product)."""
    def gemv(x, w):
      try:
        return ops.gemv.plan(x, w, **gemv_options), gemv_options
      except ValueError:
        if gemv_options is not mosaic:
          raise
        return ops.gemv.plan(x, w, **pallas), pallas
    (plan_k, options_k), (plan_v, options_v) = gemv(q, wk), gemv(q_latent, wv)
    plan_d = ops.decode.plan(q_latent, q[..., K:], c_kv, k_rope, lengths, **decode_options)
    return f"wk_b {plan_k}; decode {plan_d}; wv_b {plan_v}", options_k, options_v

  def step(options_k, options_v, decode_options):
    def fn(q, c_kv, k_rope, wk, wv):
      q_latent = ops.batched_gemv(q, wk, **options_k)
      o, _ = ops.mla_decode(q_latent, q[..., K:], c_kv, k_rope, lengths, sm_scale=scale,
                            **decode_options)
      return ops.batched_gemv(o.astype(bf16), wv, **options_v)
    return fn

  rows = []
  for fmt in config.weight_formats:
    conv = (lambda a: a.astype(bf16)) if fmt == "bf16" else (lambda a: quant.quantize(a, fmt))
    wk, wv = conv(wk32), conv(wv32)
    nbytes = (c_kv.size + k_rope.size) * 2 + sum(
        a.nbytes if fmt != "bf16" else a.size * 2 for a in (wk, wv))
    n = harness.num_sets(nbytes, config.rotate_bytes, min_sets=4, max_sets=config.max_chain)
    args_list = list(zip(*(harness.copies(a, n) for a in (q, c_kv, k_rope, wk, wv))))
    ref_o, _ = reference.mla_decode(reference.batched_gemv(q[..., :K], wk), q[..., K:], c_kv,
                                    k_rope, lengths, sm_scale=scale)
    ref = reference.batched_gemv(ref_o.astype(bf16), wv)
    for name, (gemv_options, decode_options) in paths.items():
      row = dict(fmt=fmt, path=name, B=1, S=S, H=H, chain=n, bytes=int(nbytes))
      try:
        row["plan"], options_k, options_v = plans(gemv_options, decode_options, wk, wv)
      except (ValueError, NotImplementedError) as err:
        rows.append({**row, "unsupported": f"{type(err).__name__}: {str(err).splitlines()[0]}"})
        continue
      fn = step(options_k, options_v, decode_options)
      try:
        row["rel_err"] = harness.rel_err(jax.jit(fn)(q, c_kv, k_rope, wk, wv), ref)
        row["kernels"] = count_kernels(jax.jit(fn).lower(q, c_kv, k_rope, wk, wv).compile()
                                       .as_text())
        _time(config, fn, args_list, row, None)
      except Exception as err:  # pylint: disable=broad-except
        row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
      rows.append(row)
  return rows


def run(config, workdir: str, name: str = KIND, title: str = "") -> dict:
  """Runs the benchmark; writes <name>.json, <name>.md and hlo_samples.txt to workdir."""
  results = harness.new_results(config, name, KIND, title)
  results["clock"] = "device" if jax.default_backend() == "gpu" else "wall"
  results["decode_step"] = []
  rng = np.random.default_rng(config.seed)
  start = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  try:
    with open(os.path.join(workdir, "hlo_samples.txt"), "w", encoding="utf-8") as hlo_log:
      for H in config.heads:
        for K, N in config.products:
          for B in config.batch_sizes:
            for fmt in config.weight_formats:
              with_sweep = time.perf_counter() - start < config.time_budget_s
              rows = _shape(config, H, K, N, B, fmt, rng, hlo_log, with_sweep)
              results["rows"].extend(rows)
              write(workdir, results)
              print(_rows_text(rows), f"  [{time.perf_counter() - start:.0f}s]", flush=True)
  except KeyboardInterrupt:
    results["status"] = "interrupted"
  if config.decode_step and results["status"] == "running":
    results["decode_step"] = _decode_step(config, rng)
    print(f"decode step, V2-Lite layer, B=1, S={config.decode_len}:")
    print(decode_step_table(results), flush=True)
  if results["status"] == "running":
    results["status"] = "complete"
  results["elapsed_s"] = time.perf_counter() - start
  write(workdir, results)
  return results


def _rows_text(rows) -> str:
  return "\n".join(
      f"{r['H']:>4} {r['K']:>3}->{r['N']:<4} {r['B']:>3} {r['fmt']:>6} {r['path']:>14} "
      + ("unsupported" if "unsupported" in r else
         f"{harness.fmt(r.get('us'), '7.2f'):>7} us  "
         f"device {harness.fmt(r.get('device_us'), '7.2f'):>7} us  "
         f"kernels {r.get('kernels', '-')}  err {harness.fmt(r.get('rel_err'), '.1e')}"
         + (f"  {r['error'][:60]}" if "error" in r else ""))
      for r in rows)


def _paths(results: dict) -> list[str]:
  return list(dict.fromkeys(r["path"] for r in results["rows"] if "unsupported" not in r))


def _clock(row) -> float | None:
  """A row's headline time: a standalone call's device time, else the wall time."""
  return row.get("device_us_standalone", row.get("us"))


def table(results: dict) -> str:
  """One row per case: µs of each path (device time of a standalone call on a GPU, else wall
  time) and, for the fused paths, the speedup over XLA."""
  paths = _paths(results)
  cases = {}
  for r in results["rows"]:
    if "unsupported" not in r:
      cases.setdefault(tuple(r[k] for k in SHAPE_KEYS), {})[r["path"]] = r
  header = ["H", "K→N", "B", "weights"] + [
      h for p in paths for h in ([f"{p} µs"] if p == "xla" else [f"{p} µs", f"{p} × xla"])]
  lines = []
  for (H, K, N, B, fmt), by_path in cases.items():
    base = _clock(by_path.get("xla", {}))
    line = [H, f"{K}→{N}", B, fmt]
    for p in paths:
      t = _clock(by_path.get(p, {}))
      line.append(harness.fmt(t) if "error" not in by_path.get(p, {}) else "error")
      if p != "xla":
        line.append(harness.fmt(base / t) if t and base else "-")
    lines.append(line)
  return harness.md_table(header, lines, "rrrl" + "r" * (len(header) - 4))


def detail_table(results: dict) -> str:
  """One row per case and path: wall µs, GB/s of weight bytes, device µs (a standalone call's)
  and GB/s, kernels launched (HLO), error against the oracle and the kernel that ran."""
  header = ["H", "K→N", "B", "weights", "path", "µs", "GB/s", "device µs", "device GB/s",
            "kernels", "rel err", "kernel"]
  lines = []
  for r in results["rows"]:
    if "unsupported" in r:
      continue
    f = lambda k, spec=".2f": harness.fmt(r.get(k), spec)
    lines.append([r["H"], f"{r['K']}→{r['N']}", r["B"], r["fmt"], r["path"], f("us"),
                  f("GBps", ".0f"), f("device_us_standalone"), f("device_GBps", ".0f"),
                  r.get("kernels", "-"), f("rel_err", ".1e"),
                  r.get("plan", "") or r.get("error", "")[:80]])
  return harness.md_table(header, lines, "rrrll" + "r" * 6 + "l")


def decode_step_table(results: dict) -> str:
  lines = [[r["fmt"], r["path"], harness.fmt(r.get("us")), harness.fmt(r.get("device_us")),
            r.get("kernels", "-"), harness.fmt(r.get("rel_err"), ".1e"),
            r.get("plan", "") or r.get("error", r.get("unsupported", ""))[:80]]
           for r in results.get("decode_step", [])]
  header = ["weights", "path", "µs", "device µs", "kernels", "rel err", "ops run"]
  return harness.md_table(header, lines, "llrrrrl")


def markdown(results: dict) -> str:
  config = results.get("config") or results.get("settings") or {}
  unsupported = sum("unsupported" in r for r in results["rows"])
  lines = [table(results), "", detail_table(results), "",
           "µs: wall time per call in an ordered chain over rotated weight copies; device µs: the "
           "GPU kernels of one chain in a profiler trace, less the chain-only copies of x; GB/s: "
           "weight bytes over the time; kernels: launches in the compiled HLO of one call."
           + (f" Each of the H heads reads a distinct one of {config['experts']} expert weights "
              "(head_ids, drawn at random): a MoE layer's chosen experts."
              if config.get("experts") else "")
           + (f" {unsupported} (case, variant) pairs the variant does not take are left out."
              if unsupported else "")]
  if results.get("decode_step"):
    lines += ["", f"Decode step of one V2-Lite layer, B=1, S={config.get('decode_len')}:", "",
              decode_step_table(results)]
  if config.get("goals"):
    lines += ["", harness.goals_table(config["goals"], results["rows"], SHAPE_KEYS)]
  return "\n".join(lines) + "\n"


plot = None  # no plot: the tables are the result


def write(workdir: str, results: dict) -> list[str]:
  return harness.write(workdir, results, markdown=markdown)
