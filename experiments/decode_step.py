"""The whole decode step: a token through an AttentionStack, against the bytes it must move.

For every implementation (experiments/model.py's spec grammar) the stack is built once with
random weights. A correctness gate runs first: a real prefill of gate_prompt_len tokens, then
one decode step, compared with the same weights in float32 on standard/xla. Then, for every
(batch, prompt length), the caches are filled with random entries at that length (a prefill of
65536 tokens through 27 layers would take longer than the timing) and:
- us_per_token: generate.decode_loop_fn's n_gen steps inside one jit, median over reps;
- device_us_per_token and kernel_us_per_token (GPU only): one more loop call under the profiler,
  the GPU kernels' summed time and its longest kernels by name, over the steps;
- us_per_token_dispatch: one jitted step a call (mla_jax.jit_step), dispatch_steps calls
  enqueued and waited for once, median over reps such rounds;
- floor_us: (weight bytes + cache bytes one step reads) / floor_tbps;
- kernels_per_layer: the kernels the compiled single step launches (fusions, custom calls and
  other non-trivial instructions of its entry computation), over the layers.
"""

from __future__ import annotations

import collections
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import mla_jax
from mla_jax import quant
from mla_jax.stack import fill_caches

from experiments import harness, model

KIND = "decode_step"
# Instructions of an optimised HLO entry computation that launch nothing.
_NO_KERNEL = {"parameter", "tuple", "get-tuple-element", "bitcast", "constant"}


TRACED_KERNELS = 24  # kernels a traced row keeps in its results, by time
LISTED_KERNELS = 8  # of which the markdown lists


def _stack(impl: model.Implementation, cfg, *, dtype, param_dtype, seed: int):
  return mla_jax.AttentionStack(cfg, mode=impl.layer, backend=impl.backend, dtype=dtype,
                                param_dtype=param_dtype, rngs=nnx.Rngs(seed),
                                **dict(impl.options))


def _as_float32(stack, cfg, seed):
  """A float32 standard/xla stack holding `stack`'s weights (dequantized): the gate's oracle."""
  ref = mla_jax.AttentionStack(cfg, mode="standard", backend="xla", dtype=jnp.float32,
                               param_dtype=jnp.float32, rngs=nnx.Rngs(seed))
  is_q = lambda v: isinstance(v, quant.QuantizedTensor)
  state = jax.tree.map(lambda v: quant.dequantize(v, jnp.float32),
                       nnx.state(stack, nnx.Param), is_leaf=is_q)
  nnx.update(ref, state)
  return ref


def weight_bytes(stack) -> int:
  leaves = jax.tree.leaves(nnx.state(stack, nnx.Param))
  return sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize for leaf in leaves)


def cache_read_bytes(caches, length: int) -> int:
  """Bytes one decode step reads from the caches: `length` valid rows of every array."""
  total = 0
  for cache in caches:
    arrays = [a for a in jax.tree.leaves(cache) if a.ndim >= 2]
    for a in arrays:
      seq_axis = 2 if isinstance(cache, mla_jax.KVCache) else 1
      total += int(np.prod(a.shape)) // a.shape[seq_axis] * length * a.dtype.itemsize
  return total


# An HLO instruction line, "%name = <type> <opcode>(...": the type is one shape, or a tuple of
# shapes in parentheses (a kernel with several outputs, e.g. a Pallas call).
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%\S+ = (?:\([^()]*\)|\S+) ([a-z][\w-]*)\(", re.MULTILINE)


def kernels(compiled_text: str) -> collections.Counter:
  """Instruction kinds of the compiled entry computation that launch a kernel."""
  entry = compiled_text[compiled_text.index("\nENTRY"):]
  body = entry[:entry.index("\n}")]
  ops = _INSTRUCTION.findall(body)
  return collections.Counter(op for op in ops if op not in _NO_KERNEL)


def _gate(config, stack, cfg, impl, references: dict) -> dict:
  """One decode step after a gate_prompt_len prefill, against float32 standard/xla holding the
  same weights. The inputs come from the seed alone and every implementation draws the same
  weights but for their storage format, so the reference runs once per weight_format
  (`references`)."""
  B, P = config.batch_sizes[0], config.gate_prompt_len
  kx, kt = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), 1))
  dtype = jnp.dtype(config.dtype)
  x = jax.random.normal(kx, (B, P, cfg.hidden_size), jnp.float32)
  tok = jax.random.normal(kt, (B, 1, cfg.hidden_size), jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
  tok_pos = jnp.full((B, 1), P, jnp.int32)

  def run(module, x, tok, cache_dtype):  # caches sized as the timing's: the same kernels
    caches = module.init_cache(B, mla_jax.cache.round_slots(P + 1), dtype=cache_dtype)
    _, caches = jax.jit(lambda x, p, c: module(x, p, c))(x, pos, caches)
    y, _ = jax.jit(lambda x, p, c: module(x, p, c))(tok, tok_pos, caches)
    return y

  y = run(stack, x.astype(dtype), tok.astype(dtype), jnp.dtype(impl.cache_dtype))
  weights = dict(impl.options).get("weight_format")
  if weights not in references:
    references[weights] = run(_as_float32(stack, cfg, config.seed), x, tok, jnp.float32)
  tol_key = "int8" if impl.cache_dtype == "int8" else config.dtype
  err = harness.rel_err(y, references[weights])
  return {"gate_rel_err": err, "gate_rtol": config.gate_rtol[tol_key],
          "gate_ok": bool(err <= config.gate_rtol[tol_key])}


def _time(config, stack, impl, B, S, key, floor_bytes_w) -> dict:
  cfg = stack.cfg
  dtype = jnp.dtype(config.dtype)
  max_len = _slots(config, S)
  empty = jax.eval_shape(lambda: stack.init_cache(B, max_len, dtype=jnp.dtype(impl.cache_dtype)))
  caches = fill_caches(empty, S, key)
  x = jax.random.normal(key, (B, 1, cfg.hidden_size), jnp.float32).astype(dtype)
  pos = jnp.full((B, 1), S, jnp.int32)
  row = {"impl": impl.name, "batch": B, "prompt_len": S}

  graphdef, state = nnx.split(stack)
  step = jax.jit(lambda state, x, p, c: nnx.merge(graphdef, state)(x, p, c), donate_argnums=(3,))
  compiled = step.lower(state, x, pos, caches).compile()
  counts = kernels(compiled.as_text())
  row["kernels_per_layer"] = sum(counts.values()) / cfg.num_layers
  row["kernel_kinds"] = dict(counts)

  loop = mla_jax.decode_loop_fn(stack, config.n_gen)
  _, caches = loop(x, pos, model.with_lengths(caches, S))  # compiles
  samples = []
  for _ in range(config.reps):
    caches = model.with_lengths(caches, S)
    jax.block_until_ready(caches)
    start = time.perf_counter()
    ys, caches = loop(x, pos, caches)
    jax.block_until_ready((ys, caches))
    samples.append((time.perf_counter() - start) / config.n_gen * 1e6)
  row["us_per_token"] = float(np.median(samples))
  row["us_per_token_samples"] = samples
  traced, caches = _traced(config, loop, x, pos, caches, S)
  row.update(traced)

  samples, caches = _dispatched(config, compiled, state, x, pos, caches, S)
  row["us_per_token_dispatch"] = float(np.median(samples))
  row["us_per_token_dispatch_samples"] = samples

  row["weight_bytes"] = floor_bytes_w
  row["cache_bytes"] = cache_read_bytes(caches, S)
  row["floor_us"] = (floor_bytes_w + row["cache_bytes"]) / config.floor_tbps / 1e6
  row["x_floor"] = row["us_per_token"] / row["floor_us"]
  return row


def _dispatched(config, compiled, state, x, pos, caches, S) -> tuple[list, list]:
  """µs a token with each step its own call of the compiled single step: reps rounds of
  dispatch_steps calls, each round enqueued back to back and waited for once, after one untimed
  call; a round's time over its steps, for each round. A single round of a few calls was once
  7× the others (the first row of a run), which the median of rounds leaves out."""
  caches = model.with_lengths(caches, S)
  y, caches = compiled(state, x, pos, caches)  # warm
  samples = []
  for _ in range(config.reps):
    caches = model.with_lengths(caches, S)
    jax.block_until_ready((y, caches))
    start = time.perf_counter()
    p = pos
    for _ in range(config.dispatch_steps):
      y, caches = compiled(state, y, p, caches)
      p = p + 1
    jax.block_until_ready((y, caches))
    samples.append((time.perf_counter() - start) / config.dispatch_steps * 1e6)
  return samples, caches


def _traced(config, loop, x, pos, caches, S) -> tuple[dict, list]:
  """({device_us_per_token: the kernels' summed time, kernel_us_per_token: {kernel: µs} of the
  TRACED_KERNELS longest}, or {} without a GPU; the caches) of one more loop call under the
  profiler."""
  device, (_, caches) = harness.device_trace(
      lambda: loop(x, pos, model.with_lengths(caches, S)), calls=config.n_gen)
  return ({} if device is None else traced_fields(device)), caches


def traced_fields(device: harness.DeviceTime) -> dict:
  """A row's fields from a trace's device time per token: device_us_per_token, the kernels'
  summed time, and kernel_us_per_token, {kernel: µs} of the TRACED_KERNELS longest."""
  return {"device_us_per_token": device.us,
          "kernel_us_per_token": dict(list(device.kernels_us.items())[:TRACED_KERNELS])}


def _slots(config, S: int) -> int:
  """The caches' slots for prompt length S: room for the timed steps, rounded up to a count that
  every decode kernel takes (the Mosaic kernels need a multiple of 8; S + 65 slots would run the
  split on Triton)."""
  return mla_jax.cache.round_slots(S + config.n_gen + 1)


def shapes(config) -> list[tuple[int, int]]:
  """The (batch, prompt length) pairs timed: config.shapes, or every batch × prompt length."""
  if config.shapes:
    return [tuple(shape) for shape in config.shapes]
  return [(B, S) for B in config.batch_sizes for S in config.prompt_lengths]


def _fits(config, cfg, impl, B, S) -> str | None:
  """Why (impl, B, S) is not run, or None: caches larger than config.max_cache_gb."""
  if impl.layer == "standard":
    per_token = cfg.num_heads * (cfg.qk_head_dim + cfg.v_head_dim) * 2
  else:
    per_token = cfg.kv_lora_rank + cfg.qk_rope_head_dim * 2 + (
        4 if impl.cache_dtype == "int8" else cfg.kv_lora_rank)
  gb = cfg.num_layers * B * _slots(config, S) * per_token / 1e9
  if gb > config.max_cache_gb:
    return f"caches of {gb:.0f} GB exceed max_cache_gb={config.max_cache_gb}"
  return None


def run(config, workdir: str, name: str = KIND, title: str = "") -> dict:
  """Gates and times every (implementation, batch, prompt length); writes <name>.json/.md."""
  results = harness.new_results(config, name, KIND, title)
  cfg = model.mla_config(config.preset, config.num_layers, config.mla_overrides)
  dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
  key = jax.random.key(config.seed)
  references = {}  # the gate's float32 outputs, by weight format
  start = time.perf_counter()
  with harness.run_status(results):
    for spec in config.impls.split(","):
      impl = model.Implementation.parse(spec, config.cache_dtype)
      stack = _stack(impl, cfg, dtype=dtype, param_dtype=param_dtype, seed=config.seed)
      gate = _gate(config, stack, cfg, impl, references)
      print(f"[{time.perf_counter() - start:.0f} s] {impl.name}: gate rel err "
            f"{gate['gate_rel_err']:.2e} ({'ok' if gate['gate_ok'] else 'FAILED'})", flush=True)
      w_bytes = weight_bytes(stack)
      for B, S in shapes(config):
        row = {"impl": impl.name, "batch": B, "prompt_len": S, **gate}
        reason = _fits(config, cfg, impl, B, S) or (None if gate["gate_ok"] else
                                                     "failed the correctness gate")
        if reason is None:
          key, sub = jax.random.split(key)
          try:
            row.update(_time(config, stack, impl, B, S, sub, w_bytes))
          except Exception as err:  # pylint: disable=broad-except  # a failure is a result
            reason = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
        if reason is not None:
          row["skipped"] = reason
        results["rows"].append(row)
        print(f"[{time.perf_counter() - start:.0f} s] {_line(row)}", flush=True)
        write(workdir, results)
      del stack
  write(workdir, results)
  return results


def _line(r: dict) -> str:
  if "skipped" in r:
    return f"{r['impl']} B={r['batch']} pp{r['prompt_len']}: skipped ({r['skipped']})"
  return (f"{r['impl']} B={r['batch']} pp{r['prompt_len']}: {r['us_per_token']:.1f} µs/token "
          f"(floor {r['floor_us']:.1f}, {r['x_floor']:.2f}x), dispatched "
          f"{r['us_per_token_dispatch']:.1f}, {r['kernels_per_layer']:.1f} kernels/layer")


def table(results: dict) -> str:
  """The rows; the device time column where a row has one (a run on a GPU)."""
  traced = any("device_us_per_token" in r for r in results["rows"])
  header = ["impl", "B", "prompt", "µs/token", *(["device µs/token"] if traced else []),
            "floor µs", "× floor", "kernels/layer", "µs/token dispatched", "gate rel err"]
  rows = []
  for r in results["rows"]:
    f = lambda k, spec=".1f": harness.fmt(r.get(k), spec)
    if "skipped" in r:
      rows.append([r["impl"], r["batch"], r["prompt_len"], "skipped: " + r["skipped"][:60],
                   *[""] * (len(header) - 5), f("gate_rel_err", ".1e")])
      continue
    rows.append([r["impl"], r["batch"], r["prompt_len"], f("us_per_token"),
                 *([f("device_us_per_token")] if traced else []), f("floor_us"),
                 f("x_floor", ".2f"), f("kernels_per_layer"), f("us_per_token_dispatch"),
                 f("gate_rel_err", ".1e")])
  return harness.md_table(header, rows, "lrr" + "r" * (len(header) - 3))


def markdown(results: dict) -> str:
  c = results["config"]
  longest = kernel_lines(results["rows"])
  rounds = (f", median of {c['reps']} such rounds"
            if any("us_per_token_dispatch_samples" in r for r in results["rows"]) else "")
  lines = [table(results), "",
           f"µs/token: wall time of {c['n_gen']} decode steps inside one jit "
           f"(generate.decode_loop_fn), median of {c['reps']} reps, over {c['n_gen']}; "
           f"dispatched: {c['dispatch_steps']} single-step jitted calls enqueued, over "
           f"{c['dispatch_steps']}{rounds}; floor: (weight bytes + cache bytes read) / "
           f"{c['floor_tbps']} TB/s; kernels/layer: kernels of the compiled single step over "
           f"{c['num_layers']} layers; gate: one decode step after a {c['gate_prompt_len']}-token "
           "prefill against the same weights in float32 on standard/xla" +
           ("; device: the GPU kernels' summed time in a profiler trace of one more loop call, "
            "over its steps." if longest else "."),
           *longest]
  return harness.page(lines, results, ("impl", "batch", "prompt_len"))


def kernel_lines(rows) -> list[str]:
  """Where each traced row's device time goes: its longest kernels, µs a token."""
  traced = [r for r in rows if r.get("kernel_us_per_token")]
  if not traced:
    return []
  lines = ["", f"The {LISTED_KERNELS} longest kernels of each traced loop, µs a token:"]
  for r in traced:
    kernels = list(r["kernel_us_per_token"].items())[:LISTED_KERNELS]
    lines.append(f"- {r['impl']} B={r['batch']} pp{r['prompt_len']}: " +
                 ", ".join(f"{name} {us:.1f}" for name, us in kernels))
  return lines


plot = None  # no plot: the table is the result


def write(workdir: str, results: dict) -> list[str]:
  return harness.write(workdir, results, markdown=markdown)
