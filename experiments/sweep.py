"""Token-generation sweep (tg@pp), the test of llama.cpp's published tables, over implementations.

For each prompt length N: fill the caches with an N-token random prompt through the stack
(chunked; timed as pp t/s), then time `n_gen` decode steps, `reps` times, each rep restarting
generation at length N (tg t/s = B·n_gen / seconds): inside one jit (mla_jax.decode_loop_fn,
each step feeding its output back; the tg columns), and as n_gen single-step jitted calls, each
dispatched from Python (tg dispatched: what the host adds per token). Implementations that
decode the same prefilled caches (e.g. absorbed/xla and absorbed/cpu) are timed in alternating
reps, the order rotating, so that a change in a shared host's load falls on all of them.

Correctness gate: at the first prompt length, before any timing, each implementation's decode
step is compared with the gate reference (standard/xla) on the same weights and prompt: the
relative error of the per-layer attention outputs must stay under the tolerance of its least
precise dtype. The residual stream is left out of that comparison because it would hide the
attention output under the rounding of x. An implementation that fails gets failed rows.

Results (<config name>.json, .md, .png; schema in experiments/report.py) are written to the
workdir after every row, so an interrupted sweep keeps its rows.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from experiments import harness, model, report
from experiments.progress import Progress, format_seconds
from experiments.report import markdown, plot, table  # pylint: disable=unused-import

# Least to most lossy: the gate tolerance is that of the least precise dtype an implementation uses.
_PRECISION_ORDER = ("float32", "float16", "bfloat16", "int8")


@dataclasses.dataclass
class Status:
  """Why an implementation has no numbers: state in {"ok", "not available", "unsupported",
  "failed", "error"}; once not ok it is skipped at every later prompt length."""
  state: str = "ok"
  reason: str = ""
  gate_rel_err: float | None = None
  gate_rtol: float | None = None


def _gate_rtol(config, impl: model.Implementation) -> tuple[str, float]:
  names = [jnp.dtype(config.dtype).name, jnp.dtype(impl.cache_dtype).name]
  key = max(names, key=lambda n: _PRECISION_ORDER.index(n) if n in _PRECISION_ORDER else 0)
  return key, float(config.gate_rtol[key])


def _is_oom(err: Exception) -> bool:
  text = str(err)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def _prefill_chunk(config, cfg, max_len: int, prompt_len: int) -> int:
  """Largest chunk ≤ config.prefill_chunk whose [B,T,H,S] float32 scores fit the byte budget."""
  chunk = min(config.prefill_chunk, prompt_len)
  per_token = config.batch_size * cfg.num_heads * max_len * 4
  while chunk > 1 and chunk * per_token > config.prefill_scores_bytes:
    chunk //= 2
  return chunk


def _prompt(config, cfg, prompt_len: int, chunk: int, dtype):
  """Random prompt embeddings as chunks [B,chunk,D]; the last chunk is padded (position -1)."""
  B, D = config.batch_size, cfg.hidden_size
  n_chunks = -(-prompt_len // chunk)
  key = jax.random.fold_in(jax.random.key(config.seed), prompt_len)
  x = jax.random.normal(key, (B, n_chunks * chunk, D), dtype)
  pos = np.arange(n_chunks * chunk, dtype=np.int32)
  pos = np.where(pos < prompt_len, pos, -1)
  positions = jnp.asarray(np.broadcast_to(pos, (B, pos.size)))
  return [(x[:, i * chunk:(i + 1) * chunk], positions[:, i * chunk:(i + 1) * chunk])
          for i in range(n_chunks)]


def _decode_inputs(config, cfg, prompt_len: int, dtype):
  """n_gen random token embeddings [B,1,D] and their positions N, N+1, ... as separate arrays,
  so the timed loop dispatches nothing but the steps."""
  B, D = config.batch_size, cfg.hidden_size
  key = jax.random.fold_in(jax.random.key(config.seed + 1), prompt_len)
  xs = jax.random.normal(key, (config.n_gen, B, 1, D), dtype)
  xs = [xs[t] for t in range(config.n_gen)]
  positions = [jnp.full((B, 1), prompt_len + t, jnp.int32) for t in range(config.n_gen)]
  return jax.block_until_ready((xs, positions))


class Sweep:
  """State of one tg sweep; `run()` fills `self.results` (see report.py for its schema)."""

  def __init__(self, config, workdir: str, name: str, title: str = ""):
    self.config, self.workdir = config, workdir
    self.dtype = jnp.dtype(config.dtype)
    self.param_dtype = jnp.dtype(config.param_dtype)
    self.cfg = model.mla_config(config.preset, config.num_layers, config.mla_overrides)
    _check_sizes(config)
    parse = lambda spec: model.Implementation.parse(spec, config.cache_dtype)
    self.impls = [parse(s) for s in config.impls.split(",") if s.strip()]
    self.reference = parse(config.gate_reference)
    self.pairs = report.parse_pairs(config.compare, [i.name for i in self.impls])
    self.status: dict[str, Status] = {}
    self.stacks: dict[str, model.AttentionStack] = {}
    self.gate_outputs = None
    self.rounded_outputs: dict[str, np.ndarray] = {}  # weight format -> its reference's outputs
    self.results = report.new_results(config, name, title, self.cfg, [i.name for i in self.impls],
                                      self.pairs)

  def run(self) -> dict:
    prompt_lengths = [int(n) for n in self.config.prompt_lengths]
    progress = Progress(prompt_lengths, self.config.n_gen)
    self.results["loadavg_before"] = harness.loadavg()
    try:
      self._build()
      for i, prompt_len in enumerate(prompt_lengths):
        budget = self.config.time_budget_s
        predicted = progress.predict(prompt_len)
        if budget and predicted is not None and progress.elapsed() + predicted > budget:
          self._skip(prompt_lengths[i:], f"time budget {budget}s: pp{prompt_len} would take "
                                         f"~{format_seconds(predicted)}")
          break
        progress.begin(prompt_len)
        compile_s, prefill_s = self._prompt_length(prompt_len, gate=(i == 0), progress=progress)
        progress.finish(prompt_len, compile_s, prefill_s)
        self._write(partial=True)
      self.results["status"] = "complete"
    except KeyboardInterrupt:
      self.results["status"] = "interrupted"
      print("\ninterrupted: keeping the rows finished so far", flush=True)
    self.results["elapsed_s"] = progress.elapsed()
    self.results["loadavg_after"] = harness.loadavg()
    self._write(partial=False)
    return self.results

  def _build(self):
    for impl in self._all_impls():
      try:
        self.stacks[impl.name] = model.AttentionStack(impl, self.cfg, dtype=self.dtype,
                                                      param_dtype=self.param_dtype,
                                                      seed=self.config.seed)
        self.status[impl.name] = Status()
      except (TypeError, ValueError) as err:
        self.status[impl.name] = Status("unsupported", f"{type(err).__name__}: {err}")
      except (ImportError, NotImplementedError) as err:
        self.status[impl.name] = Status("not available", f"{type(err).__name__}: {err}")
      if self.status[impl.name].state != "ok":
        print(f"{impl.name}: {self.status[impl.name].state} ({self.status[impl.name].reason})",
              flush=True)

  def _all_impls(self):
    """The timed implementations, with the gate reference first (added if not timed)."""
    others = [i for i in self.impls if i.name != self.reference.name]
    return [self.reference] + others

  def _prompt_length(self, prompt_len: int, *, gate: bool, progress: Progress) -> float:
    """Runs every implementation at one prompt length: (seconds compiling, seconds prefilling)."""
    config, cfg = self.config, self.cfg
    max_len = prompt_len + config.n_gen
    chunk = _prefill_chunk(config, cfg, max_len, prompt_len)
    prompt = _prompt(config, cfg, prompt_len, chunk, self.dtype)
    decode_inputs = _decode_inputs(config, cfg, prompt_len, self.dtype)
    timed_names = {i.name for i in self.impls}
    groups: dict[tuple, list[model.Implementation]] = {}
    for impl in self._all_impls():
      if impl.name in timed_names or gate:
        groups.setdefault(impl.prefill_key, []).append(impl)
    compile_total = prefill_total = 0.0
    for group in groups.values():
      live = [i for i in group if self.status[i.name].state == "ok"]
      for impl in group:
        if impl not in live and impl.name in timed_names:
          self._row(prompt_len, impl, self.status[impl.name].state, progress)
      if not live:
        continue
      leader = self.stacks[live[0].name]
      try:
        caches, pp_s, compile_s = self._prefill(leader, prompt, max_len)
      except Exception as err:  # pylint: disable=broad-except
        state = "oom" if _is_oom(err) else "error"
        if state == "error":
          traceback.print_exc()
        for impl in live:
          if impl.name in timed_names:
            self._row(prompt_len, impl, state, progress, note=f"prefill: {_short(err)}")
        continue
      compile_total += compile_s
      prefill_total += pp_s
      timed = []
      for impl in live:
        caches, spent, generators = self._prepare(impl, caches, prompt_len, decode_inputs,
                                                  gate=(prompt, max_len) if gate else None,
                                                  timed=impl.name in timed_names,
                                                  progress=progress)
        compile_total += spent
        if generators:
          timed.append((impl, generators, spent))
      caches = self._time(timed, caches, prompt_len, decode_inputs, pp_s, chunk, progress)
      del caches
    return compile_total, prefill_total

  def _prefill(self, stack, prompt, max_len):
    """Fills fresh caches with the prompt: (caches, seconds, compile seconds)."""
    caches = stack.init_caches(self.config.batch_size, max_len)
    x0, p0 = prompt[0]
    compiled, compile_s = _compile(stack.compile_prefill, x0, p0, caches)
    start = time.perf_counter()
    for x, positions in prompt:
      _, caches = compiled(stack.params, x, positions, caches)
    jax.block_until_ready(caches)
    return caches, time.perf_counter() - start, compile_s

  def _prepare(self, impl, caches, prompt_len, decode_inputs, *, gate, timed, progress):
    """Compiles, gates (at the first length; gate = (prompt, max_len), else None) and warms up
    one implementation: (caches, compile s, its generators {"loop", "dispatch"} or None when it
    is not timed or failed, its row then written)."""
    config, stack = self.config, self.stacks[impl.name]
    xs, positions = decode_inputs
    caches = model.with_lengths(caches, prompt_len)
    try:
      step, compile_s = _compile(stack.compile_decode, xs[0], positions[0], caches)
    except (ImportError, NotImplementedError) as err:
      self._mark(impl, "not available", f"{type(err).__name__}: {err}")
      if timed:
        self._row(prompt_len, impl, "not available", progress)
      return caches, 0.0, None
    except Exception as err:  # pylint: disable=broad-except
      if not _is_oom(err):
        traceback.print_exc()
        self._mark(impl, "error", f"compile: {_short(err)}")
      if timed:
        self._row(prompt_len, impl, "oom" if _is_oom(err) else "error", progress,
                  note=_short(err))
      return caches, 0.0, None
    try:
      if gate:
        _, attn_outs, caches = step(stack.params, xs[0], positions[0], caches)
        caches = model.with_lengths(caches, prompt_len)
        if not self._gate(impl, attn_outs, *gate, prompt_len, decode_inputs):
          if timed:
            self._row(prompt_len, impl, "failed", progress)
          return caches, compile_s, None
      if not timed:
        return caches, compile_s, None
      loop = stack.decode_loop(config.n_gen)
      start = time.perf_counter()
      caches = self._generate_in_jit(loop, caches, prompt_len, decode_inputs)[0]  # compiles
      compile_s += time.perf_counter() - start
      generators = {"loop": functools.partial(self._generate_in_jit, loop),
                    "dispatch": functools.partial(self._generate, step, stack)}
      for _ in range(config.warmup_reps):
        for generate in generators.values():
          caches = generate(caches, prompt_len, decode_inputs)[0]
    except Exception as err:  # pylint: disable=broad-except
      if not _is_oom(err):
        traceback.print_exc()
      self._row(prompt_len, impl, "oom" if _is_oom(err) else "error", progress, note=_short(err))
      return caches, compile_s, None
    return caches, compile_s, generators

  def _time(self, timed, caches, prompt_len, decode_inputs, pp_s, chunk, progress):
    """Times the implementations of one prefill group (they decode the same caches) in
    alternating reps, the order rotating every rep, so that a change in the host's load falls
    on all of them; each rep runs n_gen steps inside one jit, then dispatched. Writes their
    rows; returns the caches."""
    config = self.config
    if not timed:
      return caches
    timings = {impl.name: {"loop": [], "dispatch": []} for impl, _, _ in timed}
    failed = {}
    for rep in range(config.reps):
      for impl, generators, _ in timed[rep % len(timed):] + timed[:rep % len(timed)]:
        if impl.name in failed:
          continue
        try:
          for name, generate in generators.items():
            caches, seconds, x_out = generate(caches, prompt_len, decode_inputs)
            if not np.all(np.isfinite(np.asarray(x_out, np.float32))):
              raise FloatingPointError("non-finite decode output")
            timings[impl.name][name].append(seconds)
        except Exception as err:  # pylint: disable=broad-except
          if not _is_oom(err) and not isinstance(err, FloatingPointError):
            traceback.print_exc()
          failed[impl.name] = ("oom" if _is_oom(err) else "error", _short(err))
    caches[0].check()
    tokens = config.batch_size * config.n_gen
    names = [impl.name for impl, _, _ in timed]  # their reps alternated
    for impl, _, compile_s in timed:
      if impl.name in failed:
        state, note = failed[impl.name]
        self._row(prompt_len, impl, state, progress, note=note)
        continue
      loop, dispatch = timings[impl.name]["loop"], timings[impl.name]["dispatch"]
      self._row(prompt_len, impl, "ok", progress, pp_s=pp_s, alternated=names,
                pp_tps=config.batch_size * prompt_len / pp_s, tg_s=loop,
                tg_tps=[tokens / t for t in loop], tg_dispatch_s=dispatch,
                tg_dispatch_tps=[tokens / t for t in dispatch], compile_decode_s=compile_s,
                prefill_chunk=chunk)
    return caches

  @staticmethod
  def _generate_in_jit(loop, caches, prompt_len, decode_inputs):
    """n_gen decode steps from length prompt_len in one call of the stack's decode loop:
    (caches, seconds, the outputs)."""
    xs, positions = decode_inputs
    caches = jax.block_until_ready(model.with_lengths(caches, prompt_len))
    start = time.perf_counter()
    x_outs, caches = loop(xs[0], positions[0], caches)
    jax.block_until_ready((x_outs, caches))
    return caches, time.perf_counter() - start, x_outs

  def _generate(self, step, stack, caches, prompt_len, decode_inputs):
    """n_gen decode steps from length prompt_len: (caches, seconds, last x_out)."""
    xs, positions = decode_inputs
    caches = jax.block_until_ready(model.with_lengths(caches, prompt_len))
    start = time.perf_counter()
    for x, pos in zip(xs, positions):
      x_out, _, caches = step(stack.params, x, pos, caches)
    jax.block_until_ready((x_out, caches))
    return caches, time.perf_counter() - start, x_out

  def _gate(self, impl, attn_outs, prompt, max_len, prompt_len, decode_inputs) -> bool:
    """Records the reference's outputs, or compares against them; False marks impl failed.

    An implementation with quantized weights (option weight_format) is compared with the
    reference holding the same weights, rounded through that format (_rounded_reference), so
    that the tolerance measures the implementation, not the quantization."""
    if impl.name == self.reference.name:
      self.gate_outputs = np.asarray(attn_outs, np.float64)
      if not np.all(np.isfinite(self.gate_outputs)):
        self._mark(impl, "failed", "gate: the reference's decode output is not finite")
        return False
      return True
    if self.gate_outputs is None:
      self._mark(impl, "failed", f"no gate reference: {self.reference.name} did not run")
      return False
    weight_format = dict(impl.options).get("weight_format")
    reference = self.gate_outputs
    if weight_format is not None:
      reference = self._rounded_reference(weight_format, prompt, max_len, prompt_len,
                                          decode_inputs)
    err = harness.rel_err(attn_outs, reference)
    key, rtol = _gate_rtol(self.config, impl)
    status = self.status[impl.name]
    status.gate_rel_err, status.gate_rtol = err, rtol
    ok = bool(err <= rtol)  # NaN fails
    verdict = "ok" if ok else "FAILED"
    print(f"gate {impl.name}: rel err {err:.2e} vs {self.reference.name} "
          f"(tolerance {rtol:.0e} for {key}) {verdict}", flush=True)
    if not ok:
      self._mark(impl, "failed", f"gate: rel err {err:.3g} > {rtol:.0e} ({key}) "
                                 f"vs {self.reference.name}")
    return ok

  def _rounded_reference(self, weight_format, prompt, max_len, prompt_len, decode_inputs):
    """The reference's gate outputs with wk_b and wv_b rounded through weight_format (computed
    once per format)."""
    if weight_format not in self.rounded_outputs:
      twin = model.AttentionStack(self.reference, self.cfg, dtype=self.dtype,
                                  param_dtype=self.param_dtype, seed=self.config.seed,
                                  rounded_through=weight_format)
      caches, _, _ = self._prefill(twin, prompt, max_len)
      xs, positions = decode_inputs
      caches = model.with_lengths(caches, prompt_len)
      step, _ = _compile(twin.compile_decode, xs[0], positions[0], caches)
      _, attn_outs, _ = step(twin.params, xs[0], positions[0], caches)
      self.rounded_outputs[weight_format] = np.asarray(attn_outs, np.float64)
    return self.rounded_outputs[weight_format]

  def _mark(self, impl, state, reason):
    status = self.status[impl.name]
    status.state, status.reason = state, reason
    print(f"{impl.name}: {state} ({reason})", flush=True)

  def _row(self, prompt_len, impl, state, progress, note="", **numbers):
    row = {"prompt_len": prompt_len, "n_gen": self.config.n_gen, "impl": impl.name,
           "status": state, "note": note or self.status[impl.name].reason, **numbers}
    for key in ("tg_tps", "tg_dispatch_tps"):
      if numbers.get(key):
        row[f"{key}_mean"], row[f"{key}_std"] = harness.mean_std(numbers[key])
    self.results["rows"].append(row)
    self._write(partial=True)
    label = f"tg{self.config.n_gen}@pp{prompt_len} {impl.name}"
    if state == "ok":
      text = (f"tg {row['tg_tps_mean']:.2f} ± {row['tg_tps_std']:.2f} t/s "
              f"(dispatched {row['tg_dispatch_tps_mean']:.2f}), pp {row['pp_tps']:.1f} t/s")
    else:
      text = f"{state}{': ' + row['note'] if row['note'] else ''}"
    print(f"[{len(self.results['rows'])}] {label}: {text} | {progress.line()}", flush=True)

  def _skip(self, prompt_lengths, reason):
    print(f"skipping pp{','.join(map(str, prompt_lengths))}: {reason}", flush=True)
    for prompt_len in prompt_lengths:
      for impl in self.impls:
        self.results["rows"].append({"prompt_len": prompt_len, "n_gen": self.config.n_gen,
                                     "impl": impl.name, "status": "skipped", "note": reason})

  def _write(self, partial: bool):
    self.results["implementations"] = {
        name: dataclasses.asdict(s) for name, s in self.status.items()}
    report.write(self.workdir, self.results, plot_too=self.config.plot and not partial)


def _check_sizes(config):
  """Refuses a config whose sizes cannot run, naming the field, before anything is built."""
  lengths = list(config.prompt_lengths)
  if not lengths or any(int(n) != n or n < 1 for n in lengths):
    raise harness.ConfigError(f"config.prompt_lengths={tuple(lengths)}: expected positive "
                              "integers")
  for field in ("n_gen", "reps", "batch_size", "num_layers"):
    if int(config[field]) < 1:
      raise harness.ConfigError(f"config.{field}={config[field]}: expected >= 1")


def _compile(compile_fn, *args):
  """(compiled step, seconds spent compiling)."""
  start = time.perf_counter()
  compiled = compile_fn(*args)
  return compiled, time.perf_counter() - start


def _short(err: Exception, limit: int = 200) -> str:
  text = f"{type(err).__name__}: {err}".splitlines()[0]
  return text if len(text) <= limit else text[:limit] + "…"


def run(config, workdir: str, name: str = "tg_sweep", title: str = "") -> dict:
  """Runs the sweep; writes <name>.json, <name>.md and <name>.png to workdir; returns the
  results."""
  sweep = Sweep(config, workdir, name, title)
  results = sweep.run()
  print()
  print(report.markdown(results))
  return results
