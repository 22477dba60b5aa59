"""The tg sweep's report: its results file, the tables in llama.cpp's published form, the plot.

<name>.json holds, besides harness.new_results's name, kind, title, config, environment, status
and rows: mla_config, impls and pairs (the speedup columns: (candidate, baseline)), one row per
prompt length and implementation (status, pp/tg seconds and t/s per rep, the implementations
whose reps alternated with its own), implementations (status, reason and gate error of each),
elapsed_s and the host's load averages before and after.

`python -m experiments.publish --render=<workdir>` re-renders <name>.md and <name>.png from the
JSON file.
"""

from __future__ import annotations

import dataclasses
import math
import statistics

from experiments import harness

KIND = "tg_sweep"
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


def new_results(config, name: str, title: str, mla_cfg, impl_names, pairs) -> dict:
  results = harness.new_results(config, name, KIND, title)
  results.update(mla_config=dataclasses.asdict(mla_cfg), impls=list(impl_names),
                 pairs=[list(p) for p in pairs], implementations={})
  return results


def model_label(results: dict) -> str:
  """The table's model cell, llama.cpp style: "DeepSeek-V2-Lite attn×27 bf16 B=1"."""
  config, mla = results["config"], results["mla_config"]
  name = _MODEL_NAMES.get(config["preset"], config["preset"])
  if config.get("mla_overrides"):
    name += f" ({config['mla_overrides']})"
  dtype = _DTYPE_SHORT.get(config["dtype"], config["dtype"])
  return f"{name} attn×{mla['num_layers']} {dtype} B={config['batch_size']}"


def model_words(results: dict) -> str:
  """The model in words, for the plot's title."""
  config, mla = results["config"], results["mla_config"]
  name = _MODEL_NAMES.get(config["preset"], config["preset"])
  if config.get("mla_overrides"):
    name += f" ({config['mla_overrides']})"
  layers = mla["num_layers"]
  dtypes = (f"{config['dtype']} activations and weights" if config["dtype"] == config["param_dtype"]
            else f"{config['dtype']} activations, {config['param_dtype']} weights")
  return (f"{name} attention, {layers} layer{'s' if layers != 1 else ''} (random weights), "
          f"batch {config['batch_size']}\n{dtypes}, {config['cache_dtype']} cache "
          "(other where an implementation names one with :cache=)")


def _cells(results: dict):
  """{(prompt_len, impl): row} and the ordered prompt lengths."""
  rows = {(r["prompt_len"], r["impl"]): r for r in results["rows"]}
  lengths = sorted({r["prompt_len"] for r in results["rows"]})
  return rows, lengths


_TG_KEYS = {"tg": "tg_tps", "dispatch": "tg_dispatch_tps"}  # which -> a row's t/s key


def _tps(row, which: str) -> float | None:
  if row is None or row["status"] != "ok":
    return None
  return row["pp_tps"] if which == "pp" else row.get(f"{_TG_KEYS[which]}_mean")


def _cell(row, which: str) -> str:
  if row is None:
    return ""
  if row["status"] != "ok":
    return row["status"]
  if which == "pp":
    return f"{row['pp_tps']:.2f}"
  key = _TG_KEYS[which]
  return f"{row[key + '_mean']:.2f} ± {row[key + '_std']:.2f}" if key + "_mean" in row else ""


def speedup(a: dict | None, b: dict | None) -> tuple[float, float] | None:
  """tg t/s(a) / t/s(b) and its spread. The sweep alternates the reps of the implementations that
  share a prefill (a row's `alternated`), so rep i of a and of b ran side by side: their speedup
  is the median of the per-rep ratios and the spread the ratios' sample std, which a change in a
  shared host's load moves far less than the ratio of means. Other pairs (and older results)
  give the ratio of means and the two relative stds added in quadrature."""
  ta, tb = _tps(a, "tg"), _tps(b, "tg")
  if not ta or not tb:
    return None
  if b["impl"] in a.get("alternated", ()):
    ratios = [x / y for x, y in zip(a["tg_tps"], b["tg_tps"])]
    return statistics.median(ratios), harness.mean_std(ratios)[1]
  ratio = ta / tb
  return ratio, ratio * math.hypot(a["tg_tps_std"] / ta, b["tg_tps_std"] / tb)


def table(results: dict, which: str = "tg") -> str:
  """The tg table (one speedup column per pair), the tg table of dispatched steps
  (which="dispatch") or the pp table (which="pp")."""
  impls, pairs = results["impls"], [tuple(p) for p in results["pairs"]]
  rows, lengths = _cells(results)
  model, n_gen = model_label(results), results["config"]["n_gen"]
  header = ["model", "test"] + [f"t/s ({name})" for name in impls]
  if which == "tg":
    header += (["Speedup"] if len(pairs) == 1 else
               [f"Speedup ({a} vs {b})" for a, b in pairs])
  lines = []
  for n in lengths:
    test = f"pp{n}" if which == "pp" else f"tg{n_gen}@pp{n}"
    cells = [model, test] + [_cell(rows.get((n, name)), which) for name in impls]
    if which == "tg":
      for a, b in pairs:
        s = speedup(rows.get((n, a)), rows.get((n, b)))
        cells.append(f"{s[0]:.2f}" if s else "")
    lines.append(cells)
  return harness.md_table(header, lines, "ll" + "r" * (len(header) - 2))


def markdown(results: dict) -> str:
  """The tg table, the pp table and footnotes."""
  lines = [table(results, "tg"), "", "Dispatched: each decode step its own jitted call.", "",
           table(results, "dispatch"), "", table(results, "pp"), ""]
  lines.append(f"t/s = B·tokens / seconds; tg: mean ± sample std over "
               f"{results['config']['reps']} reps of {results['config']['n_gen']} decode steps "
               f"inside one jit (mla_jax.decode_loop_fn); dispatched: the same steps as "
               f"single-step calls; speedup: the median of the per-rep ratios where the two "
               f"implementations' reps alternated (they share a prefill), else the ratio of the "
               f"means; pp: the prompt's prefill, compile excluded; sweep {results['status']}"
               + (f"; host load {results['loadavg_before']} before, "
                  f"{results.get('loadavg_after')} after" if results.get("loadavg_before") else "")
               + ".")
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
  """Decode throughput against prompt length per implementation (error bars: std over the
  reps), and below it each compared pair's speedup (its std propagated)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  from matplotlib import ticker  # pylint: disable=import-outside-toplevel

  rows, lengths = _cells(results)
  pairs = [tuple(p) for p in results["pairs"]]
  config = results["config"]
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(8.5, 7.5), sharex=True,
                                    gridspec_kw={"height_ratios": [2, 1]})
  # One colour per implementation in both panels; a speedup takes its candidate's colour.
  colors = dict(zip(results["impls"], plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4))
  for name in results["impls"]:
    ok = [(n, rows[(n, name)]) for n in lengths if _tps(rows.get((n, name)), "tg")]
    if ok:
      top.errorbar([n for n, _ in ok], [r["tg_tps_mean"] for _, r in ok],
                   yerr=[r["tg_tps_std"] for _, r in ok], marker="o", capsize=3, label=name,
                   color=colors[name])
  top.set_ylabel("decode throughput (tokens/s)")
  top.set_yscale("log")
  top.set_title(f"{model_words(results)}\non {harness.run_info(results)['device']}",
                fontsize=10)
  top.grid(True, which="both", alpha=0.3)
  for a, b in pairs:
    ok = [(n, speedup(rows.get((n, a)), rows.get((n, b)))) for n in lengths]
    ok = [(n, s) for n, s in ok if s]
    if ok:
      bottom.errorbar([n for n, _ in ok], [s for _, (s, _) in ok],
                      yerr=[e for _, (_, e) in ok], marker="o", capsize=3,
                      label=f"{a} over {b}", color=colors.get(a))
  bottom.axhline(1.0, color="gray", lw=0.8)
  bottom.set_ylabel("decode speedup (×)")
  bottom.set_xlabel("prompt length (tokens)")
  bottom.set_xscale("log", base=2)
  bottom.set_xticks(lengths, [str(n) for n in lengths], rotation=45 if len(lengths) > 6 else 0)
  bottom.xaxis.set_minor_locator(ticker.NullLocator())
  plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
  top.yaxis.set_major_formatter(plain)
  top.yaxis.set_minor_formatter(plain)
  top.tick_params(axis="y", which="minor", labelsize=7)
  bottom.grid(True, which="both", alpha=0.3)
  for axes in (top, bottom):
    if axes.get_legend_handles_labels()[0]:
      axes.legend(fontsize=8)
  fig.text(0.5, 0.005,
           f"Each point: {config['n_gen']} decode steps after a prompt of that length, mean over "
           f"{config['reps']} timed reps; error bars: ± one standard deviation over the "
           f"{config['reps']} reps (speedups: relative errors added in quadrature).",
           ha="center", va="bottom", fontsize=7.5, wrap=True)
  fig.tight_layout(rect=(0, 0.03, 1, 1))
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write(workdir: str, results: dict, *, plot_too: bool = True) -> list[str]:
  """Writes <name>.json and <name>.md (and <name>.png when plot_too) atomically."""
  return harness.write(workdir, results, markdown=markdown, plot=plot if plot_too else None)
