"""What every benchmark shares: rotated input sets, the timer, the error measure, the environment
record and the results files.

Timer (one method for every benchmark):
- Input sets are rotated: `num_sets` copies of the inputs are made so that one pass over them
  touches more bytes than the last-level cache (GPU L2: 50-60 MB on an H100/H200; CPU L3), so each
  call reads its operands from memory, as a decode step does.
- Wall time: one AOT-compiled jitted call runs `fn` on every set (`ordered=True` puts each call
  after the previous one with an optimization barrier, so XLA can neither fuse nor reorder calls
  across sets); `reps` such calls are enqueued and waited for once; reps grows until a trial lasts
  `min_trial_s`; the median over `trials` of (trial time / calls) is the wall time of one call.
  A benchmark on a shared host (`fused=False`) calls `fn` on the next set, one call at a time,
  waiting for each, and `interleave` alternates several formulations round by round so that a
  change of load hits them all alike.
- Device time (GPU only): the same jitted call run under a jax.profiler trace; the durations of
  the GPU's kernels (stream events other than Memcpy/Memset) summed and divided by the number of
  calls. Launch gaps and host time are excluded; copies are reported apart.

Results files: a benchmark builds its results with `new_results` (name, kind, title, config,
environment) and rows, and `write` puts `<name>.json`, `<name>.md` (the environment and the
exact command above the benchmark's tables) and, where it plots, `<name>.png` into the workdir,
after every row so that an interrupted run keeps what it finished.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import glob
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mla_jax.ops import device

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root


class ConfigError(ValueError):
  """A config value that cannot run, found before anything runs: the runner prints the message
  as one line and exits with status 1."""


# ---------------------------------------------------------------------------- input rotation


def num_sets(set_bytes: int, rotate_bytes: int, *, min_sets: int = 1, max_sets: int) -> int:
  """How many copies of an input of `set_bytes` make one pass touch `rotate_bytes`, clipped to
  [min_sets, max_sets]."""
  return int(min(max_sets, max(min_sets, math.ceil(rotate_bytes / max(set_bytes, 1)))))


def copies(tree, n: int) -> list:
  """n distinct device copies of a pytree (distinct buffers, so that no call finds its operands
  in cache because the previous call read them)."""
  return [jax.tree.map(lambda a: jnp.array(a, copy=True), tree) for _ in range(n)]


# ---------------------------------------------------------------------------- timer


@dataclasses.dataclass
class DeviceTime:
  """Per call: summed GPU kernel time, kernel launches, {kernel name: µs}, and copies' µs."""
  us: float
  kernels: float
  kernels_us: dict[str, float]
  copies_us: float


@dataclasses.dataclass
class Timing:
  wall_us: float                # median over trials of one call's wall time
  wall_us_samples: list[float]  # every trial's per-call wall time
  device: DeviceTime | None     # None where there is no GPU

  @property
  def us(self) -> float:
    """The headline time: device time on a GPU, wall time elsewhere."""
    return self.device.us if self.device is not None else self.wall_us


class Timer:
  """Runs `fn(*set)` over rotated input sets; see the module docstring for the method.

  fused: one jitted call runs fn on every set (GPU benchmarks); else each call runs fn on the
  next set. ordered (fused only): each call waits for the previous one (optimization barrier).
  """

  def __init__(self, fn: Callable, sets: Sequence, *, fused: bool = True, ordered: bool = False):
    self.sets = list(sets)
    self._next = 0
    if fused:
      def all_sets(sets):
        outs, prev = [], None
        for args in sets:
          if ordered and prev is not None:
            args, _ = jax.lax.optimization_barrier((args, prev))
          prev = fn(*args)
          outs.append(prev)
        return outs
      self.calls_per_run = len(self.sets)
      self.compiled = jax.jit(all_sets).lower(self.sets).compile()
      self._run = lambda: self.compiled(self.sets)
    else:
      self.calls_per_run = 1
      self.compiled = jax.jit(fn).lower(*self.sets[0]).compile()
      self._run = self._run_next

  def _run_next(self):
    args = self.sets[self._next % len(self.sets)]
    self._next += 1
    return self.compiled(*args)

  def sample(self, runs: int = 1, *, sync_each: bool = False) -> float:
    """Seconds per fn call of `runs` runs, enqueued (or waited for one by one) and blocked once."""
    start = time.perf_counter()
    for _ in range(runs):
      out = self._run()
      if sync_each:
        jax.block_until_ready(out)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / (runs * self.calls_per_run)

  def wall(self, *, reps: int, trials: int, warmup: int = 2,
           min_trial_s: float = 0.0) -> tuple[float, list[float]]:
    """(median µs per call, every trial's µs per call); reps grows until a trial lasts at least
    min_trial_s."""
    once = min(self.sample() for _ in range(max(1, warmup))) * self.calls_per_run
    reps = max(reps, math.ceil(min_trial_s / max(once, 1e-6)))
    samples = [self.sample(reps) * 1e6 for _ in range(trials)]
    return statistics.median(samples), samples

  def device(self, runs: int = 1) -> DeviceTime | None:
    """Device time per call from a jax.profiler trace of `runs` runs; None without a GPU."""
    if jax.default_backend() != "gpu":
      return None
    jax.block_until_ready(self._run())

    def run():
      for _ in range(runs):
        out = self._run()
      return out

    return device_trace(run, runs * self.calls_per_run)[0]


def device_trace(run: Callable[[], Any], calls: int = 1) -> tuple[DeviceTime | None, Any]:
  """(device time per call, run()'s result): run() once under a jax.profiler trace, then its
  GPU kernels' durations (stream events other than Memcpy/Memset, which are the copies) summed
  and divided by `calls`, the calls that run makes. Without a GPU: (None, run())."""
  if jax.default_backend() != "gpu":
    return None, run()
  with tempfile.TemporaryDirectory(prefix="mla_jax_trace_") as tmp:
    with jax.profiler.trace(tmp):
      out = jax.block_until_ready(run())
    paths = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
    profile = jax.profiler.ProfileData.from_file(paths[-1])
  per_kernel, launches, copies_us = collections.Counter(), 0, 0.0
  for plane in profile.planes:
    if not plane.name.startswith("/device:GPU"):
      continue
    for line in plane.lines:
      if "Stream" not in line.name:
        continue
      for event in line.events:
        us = event.duration_ns / 1e3 / calls
        if event.name.startswith(("Memcpy", "Memset")):
          copies_us += us
        else:
          per_kernel[event.name] += us
          launches += 1
  return DeviceTime(us=sum(per_kernel.values()), kernels=launches / calls,
                    kernels_us=dict(per_kernel.most_common()), copies_us=copies_us), out


def measure(fn: Callable, sets: Sequence, *, reps: int, trials: int, warmup: int = 2,
            min_trial_s: float = 0.0, profile_runs: int = 1, ordered: bool = False) -> Timing:
  """Wall and device time of one fn call over rotated `sets` (a GPU benchmark's timer)."""
  timer = Timer(fn, sets, ordered=ordered)
  wall_us, samples = timer.wall(reps=reps, trials=trials, warmup=warmup, min_trial_s=min_trial_s)
  return Timing(wall_us, samples, timer.device(profile_runs))


def interleave(timers: Mapping[str, Timer], *, rounds: int,
               calls_per_block: int) -> dict[str, list[float]]:
  """Seconds of single waited-for calls of each timer, in rounds of one block per timer with the
  order rotating every round; a block is one untimed call (it absorbs the switch from the
  previous formulation) and `calls_per_block` timed ones."""
  names = list(timers)
  samples = {name: [] for name in names}
  for r in range(rounds):
    for k in range(len(names)):
      name = names[(r + k) % len(names)]
      timers[name].sample(sync_each=True)
      samples[name] += [timers[name].sample(sync_each=True) for _ in range(calls_per_block)]
  return samples


def loadavg() -> list[float] | None:
  """The host's 1-, 5- and 15-minute load averages (Linux), or None where there are none: a run
  on a shared host records them, since other jobs move its timings."""
  try:
    with open("/proc/loadavg", encoding="ascii") as f:
      return [float(x) for x in f.read().split()[:3]]
  except OSError:
    return None


def mean_std(values) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for a single value)."""
  n = len(values)
  mean = sum(values) / n
  if n < 2:
    return mean, 0.0
  return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


# ---------------------------------------------------------------------------- variants


def plan_variant(plan_fn: Callable, args: Sequence, variant, *, interpret: bool = False):
  """(plan, options for the op) of a config's variant {"impl": ..., "lowering": ...,
  "tuning": {knob: value}} at these arguments (arrays or jax.ShapeDtypeStruct).

  plan_fn is ops.decode.plan or ops.gemv.plan. impl defaults to "pallas". The tuning knobs
  override the tuning that the family's plan picks for that lowering
  (dataclasses.replace(plan.tuning, **knobs)); without knobs the op decides as it would
  for any caller. Raises ValueError for a variant that cannot take these arguments: what the
  plan raises, and a Mosaic GPU kernel off a Hopper GPU outside interpret mode.
  """
  variant = variant.to_dict() if hasattr(variant, "to_dict") else dict(variant or {})
  impl = variant.get("impl", "pallas")
  options = {"impl": impl, "lowering": variant.get("lowering")}
  if impl == "pallas":
    options["interpret"] = interpret
  plan = plan_fn(*args, **options)
  knobs = dict(variant.get("tuning") or {})
  if knobs:
    if plan.tuning is None:
      raise ValueError(f"{variant}: {plan} has no tuning to override")
    options["tuning"] = dataclasses.replace(plan.tuning, **knobs)
    plan = plan_fn(*args, **options)
  if plan.kernel.startswith("mosaic") and not (interpret or device.is_hopper()):
    raise ValueError(f"{plan.kernel}: a Mosaic GPU kernel needs a Hopper GPU (or interpret mode)")
  return plan, options


# ---------------------------------------------------------------------------- error


def rel_err(x, ref) -> float:
  """‖x − ref‖ / ‖ref‖ in float64; NaN when x has a non-finite element (so `err <= tol` fails)."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  if not np.all(np.isfinite(x)):
    return float("nan")
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


# ---------------------------------------------------------------------------- goals

_COMPARE = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
            "<": lambda a, b: a < b}
_SYMBOL = {">=": "≥", "<=": "≤", ">": ">", "<": "<"}


def goal_value(expr: str, rows: Sequence[dict], keys: Sequence[str] = ()):
  """Evaluates a goal's value expression (a Python expression from a config file) over rows.

  Names: rows(**where) (the rows whose fields equal each value, or are in it when it is a
  tuple), row(**where) (the one such row), other(r, **changes) (the row that agrees with r on
  `keys` but for the changes, e.g. other(r, path="xla")), min, max, all, any, len, sum, abs.
  """
  def matches(r, where):
    return all(r.get(k) in v if isinstance(v, (tuple, list)) else r.get(k) == v
               for k, v in where.items())

  def select(**where):
    return [r for r in rows if matches(r, where)]

  def one(**where):
    found = select(**where)
    if len(found) != 1:
      raise LookupError(f"{len(found)} rows match {where}")
    return found[0]

  def other(r, **changes):
    return one(**{**{k: r.get(k) for k in keys}, **changes})

  names = {"rows": select, "row": one, "other": other, "min": min, "max": max, "all": all,
           "any": any, "len": len, "sum": sum, "abs": abs, "__builtins__": {}}
  return eval(expr, names)  # pylint: disable=eval-used


def page(lines: Sequence[str], results: dict, keys: Sequence[str] = ()) -> str:
  """A results page: lines, then the goals table of the run's config if it has goals."""
  goals = results["config"].get("goals")
  if goals:
    lines = [*lines, "", goals_table(goals, results["rows"], keys)]
  return "\n".join(lines) + "\n"


def goals_table(goals: Sequence[Sequence], rows: Sequence[dict], keys: Sequence[str] = ()) -> str:
  """Markdown table of goals (label, what, value expression, "<=" | ">=" | "<" | ">", target):
  each goal's measured value and whether it holds ("not measured" where the rows lack it)."""
  lines = []
  for label, what, expr, op, target in goals:
    try:
      value = goal_value(expr, rows, keys)
      holds = "yes" if _COMPARE[op](value, target) else "no"
      shown = (format(value, ".3g") if isinstance(value, float)
               else str(value))
    except KeyError as err:
      shown, holds = f"not measured ({err})", "-"
    except (LookupError, TypeError, ValueError, ZeroDivisionError):
      shown, holds = "not in this run", "-"
    lines.append([label, f"{what} {_SYMBOL[op]} {target}", shown, holds])
  return md_table(["goal", "target", "measured", "holds?"], lines, "llrl")


# ---------------------------------------------------------------------------- environment


def command_line(argv: Sequence[str] | None = None) -> str:
  """The command as typed: `python -m experiments.main ...` for the runner, else argv."""
  argv = list(sys.argv if argv is None else argv)
  if argv and os.path.abspath(argv[0]) == os.path.join(ROOT, "experiments", "main.py"):
    return shlex.join(["python", "-m", "experiments.main", *argv[1:]])
  return shlex.join(argv)


def environment() -> dict:
  """Where, when and with what a run ran. $MLA_JAX_GIT_COMMIT names the commit of a copied tree
  (a device machine's copy, whose git history may be absent or stale): it wins over git, and the
  dirty flag is then unknown (None)."""
  device = jax.devices()[0]
  copied = os.environ.get("MLA_JAX_GIT_COMMIT")
  commit = copied or _git("rev-parse", "HEAD")
  return {
      "platform": device.platform,
      "device_kind": device.device_kind,
      "device_name": device_name(device),
      "device_count": jax.device_count(),
      "host_cpus": os.cpu_count(),
      "jax": jax.__version__,
      "jaxlib": _version("jaxlib"),
      "flax": _version("flax"),
      "python": platform.python_version(),
      "git_commit": commit,
      "git_dirty": (bool(_git("status", "--porcelain", "--untracked-files=no"))
                    if commit and not copied else None),
      "command": command_line(),
      "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


def device_name(device=None) -> str:
  """A readable name: the GPU's kind ("NVIDIA H200"), or the CPU model and its core count."""
  device = device or jax.devices()[0]
  if device.platform != "cpu":
    count = jax.device_count()
    return device.device_kind if count == 1 else f"{count}× {device.device_kind}"
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      model = next((line.split(":", 1)[1].strip() for line in f
                    if line.startswith("model name")), model)
  except OSError:
    pass
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return f"CPU {model} ({cores} cores)"


def run_info(results: dict) -> dict:
  """device, commit (short), dirty, date, command of a results file; also reads the files that
  earlier versions of the benchmarks wrote (a device string, no commit)."""
  env = results.get("environment") or {}
  commit = env.get("git_commit")
  date = env.get("started_utc") or results.get("started_utc") or ""
  command = env.get("command") or results.get("command") or ""
  if command.split(" ", 1)[0].endswith("experiments/main.py"):
    command = "python -m experiments.main" + command[len(command.split(" ", 1)[0]):]
  return {
      "device": env.get("device_name") or env.get("device_kind") or results.get("device") or "?",
      "commit": commit[:10] if commit else "unknown",
      "dirty": bool(env.get("git_dirty")),
      "date": date[:10],
      "command": command,
  }


def _version(package: str) -> str | None:
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  try:
    return metadata.version(package)
  except metadata.PackageNotFoundError:
    return None


def _git(*args) -> str | None:
  try:
    out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=ROOT,
                         check=True)
    return out.stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None


# ---------------------------------------------------------------------------- results files


def new_results(config, name: str, kind: str, title: str = "") -> dict:
  """The common part of every results file; a benchmark adds "rows" and its own fields."""
  return {"name": name, "kind": kind, "title": title, "environment": environment(),
          "config": config.to_dict() if hasattr(config, "to_dict") else dict(config),
          "status": "running", "rows": []}


@contextlib.contextmanager
def run_status(results: dict):
  """Around a benchmark's loop: results["status"] becomes "complete", or "interrupted" on a
  KeyboardInterrupt (Ctrl-C, or SIGTERM, which main.py turns into one), which stops there;
  results["elapsed_s"] is the seconds spent inside. The rows finished stay in the results."""
  start = time.perf_counter()
  try:
    yield
    results["status"] = "complete"
  except KeyboardInterrupt:
    results["status"] = "interrupted"
  finally:
    results["elapsed_s"] = time.perf_counter() - start


def md_table(header: Sequence[str], rows: Sequence[Sequence], align: str | None = None) -> str:
  """A markdown table; align has one letter per column, "l" or "r" (default: the first column
  left, the others right)."""
  align = align or "l" + "r" * (len(header) - 1)
  rule = ["---" if a == "l" else "---:" for a in align]
  lines = [header, rule] + [[str(c) for c in row] for row in rows]
  return "\n".join("| " + " | ".join(map(str, line)) + " |" for line in lines)


def fmt(value, spec: str = ".2f", missing: str = "-") -> str:
  """format(value, spec), or `missing` for None/NaN."""
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return missing
  return format(value, spec)


def run_line(results: dict) -> str:
  """"<device>, commit <sha>, <date>: `<command>`": the line above a published table."""
  info = run_info(results)
  line = f"{info['device']}, commit {info['commit']}" + (" (dirty)" if info["dirty"] else "")
  line += f", {info['date']}" if info["date"] else ""
  return line + (f": `{info['command']}`" if info["command"] else "")


def document(results: dict, body: str) -> str:
  """<name>.md: a title, the environment, the exact command, then the benchmark's body."""
  env, info = results.get("environment") or {}, run_info(results)
  title = f"# {results.get('name', '')}" + (f": {results['title']}" if results.get("title") else "")
  versions = ", ".join(f"{k} {env[k]}" for k in ("jax", "jaxlib", "flax", "python") if env.get(k))
  dirty = " (uncommitted changes)" if info["dirty"] else ""
  lines = [title, "",
           f"{info['device']}; commit {info['commit']}{dirty}; {env.get('started_utc', '')}; "
           f"{versions}; run {results.get('status', '?')}"
           + (f" in {results['elapsed_s']:.0f} s" if results.get("elapsed_s") else "") + ".",
           "", "```sh", info["command"], "```", "", body.rstrip(), ""]
  return "\n".join(lines)


def paths(workdir: str, name: str) -> dict[str, str]:
  return {ext: os.path.join(workdir, f"{name}.{ext}") for ext in ("json", "md", "png")}


def write(workdir: str, results: dict, *, markdown: Callable[[dict], str],
          plot: Callable[[dict, str], None] | None = None) -> list[str]:
  """Writes <name>.json and <name>.md (and <name>.png with `plot`) atomically; returns the paths
  written."""
  os.makedirs(workdir, exist_ok=True)
  out = paths(workdir, results["name"])
  atomic_write(out["json"], json.dumps(results, indent=1, default=_json_default))
  atomic_write(out["md"], document(results, markdown(results)))
  written = [out["json"], out["md"]]
  if plot is not None:
    plot(results, out["png"])
    written.append(out["png"])
  return written


def atomic_write(path: str, text: str):
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def _json_default(value):
  if isinstance(value, (np.integer, np.floating)):
    return value.item()
  if dataclasses.is_dataclass(value):
    return dataclasses.asdict(value)
  return str(value)
