"""Sweep results: results.json (schema below), table.md in llama.cpp's published form, plot.png.

results.json holds: config (the full ConfigDict), config_name, environment (device, JAX version,
git commit), mla_config, impls and pairs (the speedup columns: (candidate, baseline)), rows (one
per prompt length and implementation: status, pp/tg seconds and t/s), implementations (status,
reason and gate error of each), status ("running", "complete" or "interrupted") and elapsed_s.

`python -m experiments.report <workdir>` re-renders table.md and plot.png from results.json.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys

import jax

_MODEL_NAMES = {"deepseek_v2_lite": "DeepSeek-V2-Lite", "deepseek_v3": "DeepSeek-V3"}
_DTYPE_SHORT = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}


def parse_pairs(text: str, impl_names: list[str]) -> list[tuple[str, str]]:
  """"a vs b, c vs d" -> [(a, b), (c, d)]: a speedup column t/s(a) / t/s(b) for each pair."""
  pairs = []
  for item in filter(None, (s.strip() for s in text.split(","))):
    candidate, sep, baseline = (s.strip() for s in item.partition(" vs "))
    if not sep:
      raise ValueError(f"compare entry {item!r}: expected 'candidate vs baseline'")
    for name in (candidate, baseline):
      if name not in impl_names:
        raise ValueError(f"compare entry {item!r}: {name!r} is not in impls {impl_names}")
    pairs.append((candidate, baseline))
  return pairs


def environment() -> dict:
  """Where and with what the sweep ran. Outside a git checkout (a copy on a device machine) the
  commit comes from $MLA_JAX_GIT_COMMIT."""
  device = jax.devices()[0]
  commit = _git("rev-parse", "HEAD") or os.environ.get("MLA_JAX_GIT_COMMIT")
  return {
      "platform": device.platform,
      "device_kind": device.device_kind,
      "device_count": jax.device_count(),
      "jax": jax.__version__,
      "jaxlib": getattr(jax.lib, "__version__", None) or _version("jaxlib"),
      "flax": _version("flax"),
      "python": platform.python_version(),
      "host_cpus": os.cpu_count(),
      "git_commit": commit,
      "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")) if commit else None,
      "command": " ".join(sys.argv),
      "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


def new_results(config, config_name: str, mla_cfg, impl_names, pairs) -> dict:
  return {"config_name": config_name, "config": config.to_dict(), "environment": environment(),
          "mla_config": dataclasses.asdict(mla_cfg), "impls": list(impl_names),
          "pairs": [list(p) for p in pairs], "rows": [], "implementations": {},
          "status": "running"}


def model_label(results: dict) -> str:
  config, mla = results["config"], results["mla_config"]
  name = _MODEL_NAMES.get(config["preset"], config["preset"])
  if config.get("mla_overrides"):
    name += f" ({config['mla_overrides']})"
  dtype = _DTYPE_SHORT.get(config["dtype"], config["dtype"])
  return f"{name} attn×{mla['num_layers']} {dtype} B={config['batch_size']}"


def _cells(results: dict):
  """{(prompt_len, impl): row} and the ordered prompt lengths."""
  rows = {(r["prompt_len"], r["impl"]): r for r in results["rows"]}
  lengths = sorted({r["prompt_len"] for r in results["rows"]})
  return rows, lengths


def _tps(row, which: str) -> float | None:
  if row is None or row["status"] != "ok":
    return None
  return row["tg_tps_mean"] if which == "tg" else row["pp_tps"]


def _cell(row, which: str) -> str:
  if row is None:
    return ""
  if row["status"] != "ok":
    return row["status"]
  if which == "tg":
    return f"{row['tg_tps_mean']:.2f} ± {row['tg_tps_std']:.2f}"
  return f"{row['pp_tps']:.2f}"


def markdown(results: dict) -> str:
  """The tg table (one speedup column per pair), the pp table and footnotes."""
  impls, pairs = results["impls"], [tuple(p) for p in results["pairs"]]
  rows, lengths = _cells(results)
  model, n_gen = model_label(results), results["config"]["n_gen"]
  speedup_names = (["Speedup"] if len(pairs) == 1 else
                   [f"Speedup ({a} vs {b})" for a, b in pairs])
  lines = []
  for which in ("tg", "pp"):
    header = ["model", "test"] + [f"t/s ({name})" for name in impls]
    header += speedup_names if which == "tg" else []
    lines += ["| " + " | ".join(header) + " |",
              "| --- | --- |" + " ---: |" * (len(header) - 2)]
    for n in lengths:
      test = f"tg{n_gen}@pp{n}" if which == "tg" else f"pp{n}"
      cells = [model, test] + [_cell(rows.get((n, name)), which) for name in impls]
      if which == "tg":
        for a, b in pairs:
          ta, tb = _tps(rows.get((n, a)), "tg"), _tps(rows.get((n, b)), "tg")
          cells.append(f"{ta / tb:.2f}" if ta and tb else "")
      lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
  env = results["environment"]
  lines.append(f"Device: {env['device_kind']} ({env['platform']}), JAX {env['jax']}, commit "
               f"{(env['git_commit'] or 'unknown')[:10]}{' (dirty)' if env['git_dirty'] else ''};"
               f" t/s = B·tokens / seconds, tg mean ± std over {results['config']['reps']} reps;"
               f" sweep {results['status']}.")
  for name, info in results.get("implementations", {}).items():
    if info["state"] != "ok" or info.get("gate_rel_err") is not None:
      gate = (f"gate rel err {info['gate_rel_err']:.2e} (tolerance {info['gate_rtol']:.0e})"
              if info.get("gate_rel_err") is not None else "")
      reason = info["reason"] if info["state"] != "ok" else ""
      lines.append(f"- {name}: {info['state']}" + "".join(
          f"; {t}" for t in (gate, reason) if t))
  notes = sorted({r["note"] for r in results["rows"] if r["status"] == "skipped" and r["note"]})
  lines += [f"- skipped: {note}" for note in notes]
  return "\n".join(lines) + "\n"


def plot(results: dict, path: str):
  """t/s against prompt length per implementation (error bars: std), speedups below."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  rows, lengths = _cells(results)
  pairs = [tuple(p) for p in results["pairs"]]
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True,
                                    gridspec_kw={"height_ratios": [2, 1]})
  # One colour per implementation in both panels; a speedup takes its candidate's colour.
  colors = dict(zip(results["impls"], plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4))
  for name in results["impls"]:
    ok = [(n, rows[(n, name)]) for n in lengths if _tps(rows.get((n, name)), "tg")]
    if ok:
      top.errorbar([n for n, _ in ok], [r["tg_tps_mean"] for _, r in ok],
                   yerr=[r["tg_tps_std"] for _, r in ok], marker="o", capsize=3, label=name,
                   color=colors[name])
  top.set_ylabel(f"tg{results['config']['n_gen']} t/s")
  top.set_yscale("log")
  top.set_title(model_label(results) + f" — {results['environment']['device_kind']}")
  top.grid(True, which="both", alpha=0.3)
  for a, b in pairs:
    ok = [(n, _tps(rows.get((n, a)), "tg") / _tps(rows.get((n, b)), "tg")) for n in lengths
          if _tps(rows.get((n, a)), "tg") and _tps(rows.get((n, b)), "tg")]
    if ok:
      bottom.plot([n for n, _ in ok], [s for _, s in ok], marker="o", label=f"{a} / {b}",
                  color=colors.get(a))
  bottom.axhline(1.0, color="gray", lw=0.8)
  bottom.set_ylabel("speedup")
  bottom.set_xlabel("prompt length (tokens)")
  bottom.set_xscale("log", base=2)
  bottom.grid(True, which="both", alpha=0.3)
  for axes in (top, bottom):
    if axes.get_legend_handles_labels()[0]:
      axes.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write(workdir: str, results: dict, *, plot_too: bool = True):
  """Writes results.json and table.md (and plot.png when plot_too) atomically."""
  os.makedirs(workdir, exist_ok=True)
  _atomic_write(os.path.join(workdir, "results.json"), json.dumps(results, indent=1, default=str))
  _atomic_write(os.path.join(workdir, "table.md"), markdown(results))
  if plot_too:
    plot(results, os.path.join(workdir, "plot.png"))


def _atomic_write(path: str, text: str):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def _version(package: str) -> str | None:
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  try:
    return metadata.version(package)
  except metadata.PackageNotFoundError:
    return None


def _git(*args) -> str | None:
  try:
    out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                         cwd=os.path.dirname(os.path.abspath(__file__)), check=True)
    return out.stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None


if __name__ == "__main__":
  with open(os.path.join(sys.argv[1], "results.json")) as f:
    loaded = json.load(f)
  write(sys.argv[1], loaded)
  print(markdown(loaded))
