"""Publishing results: docs/results/<config name>.{json,md,png}, its index and the README tables.

docs/results holds one current results file per benchmark, each from one run of one commit.
`publish(workdir, name)` (the runner's --publish) copies a run's files there, then regenerates
- docs/results/README.md: one line per benchmark: what it is, the command, device, date, commit;
- README.md's tables: between `<!-- results:<name> -->` and `<!-- /results:<name> -->` goes the
  line "<device>, commit <sha>, <date>: `<command>`" and the table of docs/results/<name>.json.
  A pair whose results file does not exist is left as it is.

`python -m experiments.publish` regenerates the index and the README tables from the JSON files
in docs/results; with --render=<workdir or results dir> it first re-renders the .md (and .png)
files there from their JSON.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil

from experiments import EXPERIMENTS, config_doc, harness

RESULTS_DIR = os.path.join(harness.ROOT, "docs", "results")
README = os.path.join(harness.ROOT, "README.md")
INDEX = "README.md"
_MARKERS = re.compile(
    r"(<!-- results:(?P<name>[\w.-]+) -->)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.DOTALL)


def load(path: str) -> dict:
  """A results file; name, kind and title are filled in from the config of the same name for
  files written before they were recorded."""
  with open(path, encoding="utf-8") as f:
    results = json.load(f)
  name = results.get("name") or results.get("config_name") or \
      os.path.splitext(os.path.basename(path))[0]
  results["name"] = name
  config_file = os.path.join(config_doc.CONFIGS_DIR, f"{name}.py")
  if not results.get("kind"):
    results["kind"] = (results.get("config") or {}).get("kind") or _config_kind(config_file)
  if not results.get("title") and os.path.exists(config_file):
    results["title"] = config_doc.title(config_file)
  return results


def _config_kind(config_file: str) -> str | None:
  if not os.path.exists(config_file):
    return None
  with open(config_file, encoding="utf-8") as f:
    match = re.search(r"config\.kind\s*=\s*[\"'](\w+)[\"']", f.read())
  return match.group(1) if match else None


def module(results: dict):
  """The experiment module that wrote (and renders) these results."""
  if results.get("kind") not in EXPERIMENTS:
    raise ValueError(f"{results.get('name')}: unknown kind {results.get('kind')!r}; expected one "
                     f"of {sorted(EXPERIMENTS)}")
  return importlib.import_module(EXPERIMENTS[results["kind"]])


def render(results: dict, directory: str) -> list[str]:
  """Re-renders <name>.md (and <name>.png where the benchmark plots) from the results."""
  mod = module(results)
  out = harness.paths(directory, results["name"])
  harness.atomic_write(out["md"], harness.document(results, mod.markdown(results)))
  written = [out["md"]]
  if mod.plot is not None and (results.get("config") or {}).get("plot", True):
    mod.plot(results, out["png"])
    written.append(out["png"])
  return written


def results_files(results_dir: str) -> list[str]:
  """The benchmarks with a results file in results_dir, by name."""
  return sorted(p[:-5] for p in os.listdir(results_dir) if p.endswith(".json"))


def write_index(results_dir: str = RESULTS_DIR) -> str:
  """docs/results/README.md: one line per benchmark."""
  rows = []
  for name in results_files(results_dir):
    results = load(os.path.join(results_dir, f"{name}.json"))
    info = harness.run_info(results)
    dirty = " (dirty)" if info["dirty"] else ""
    link = (f"[{name}]({name}.md)" if os.path.exists(os.path.join(results_dir, f"{name}.md"))
            else name)
    rows.append([link, results.get("title", ""),
                 f"`{info['command']}`" if info["command"] else "-", info["device"],
                 info["date"] or "-", info["commit"] + dirty])
  text = "\n".join([
      "# Results", "",
      "One current results file per benchmark, each from one run of one commit: "
      "`<name>.json` (rows, environment, config), `<name>.md` (the tables, with the environment "
      "and the exact command above them) and `<name>.png` where the benchmark plots. "
      "Run a benchmark with `python -m experiments.main --config=configs/<name>.py --publish` "
      "to replace its files here and its table in the README; `python -m experiments.publish` "
      "regenerates this index and the README tables from the JSON files.", "",
      harness.md_table(["benchmark", "what", "command", "device", "date", "commit"], rows,
                       "llllll"), ""])
  path = os.path.join(results_dir, INDEX)
  harness.atomic_write(path, text)
  return path


def readme_block(results: dict) -> str:
  """What goes between a benchmark's README markers: the run line and its table."""
  return f"\n{harness.run_line(results)}\n\n{module(results).table(results).rstrip()}\n"


def update_readme(readme_path: str = README, results_dir: str = RESULTS_DIR) -> list[str]:
  """Replaces the body of every marker pair whose results file exists; returns their names."""
  with open(readme_path, encoding="utf-8") as f:
    text = f.read()
  updated = []

  def replace(match):
    path = os.path.join(results_dir, f"{match['name']}.json")
    if not os.path.exists(path):
      return match.group(0)
    updated.append(match["name"])
    return match.group(1) + readme_block(load(path)) + match.group(4)

  new_text = _MARKERS.sub(replace, text)
  if new_text != text:
    harness.atomic_write(readme_path, new_text)
  return updated


def publish(workdir: str, name: str, results_dir: str = RESULTS_DIR,
            readme_path: str = README) -> list[str]:
  """Copies the run's <name>.{json,md,png} to results_dir (removing a plot the run did not
  make), then regenerates the index and the README tables; returns the files written."""
  os.makedirs(results_dir, exist_ok=True)
  src, dst = harness.paths(workdir, name), harness.paths(results_dir, name)
  written = []
  for ext in ("json", "md", "png"):
    if os.path.exists(src[ext]):
      shutil.copyfile(src[ext], dst[ext])
      written.append(dst[ext])
    elif os.path.exists(dst[ext]):
      os.remove(dst[ext])
  written.append(write_index(results_dir))
  if os.path.exists(readme_path) and update_readme(readme_path, results_dir):
    written.append(readme_path)
  return written


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if _RENDER.value:
    target = _RENDER.value
    files = [target] if target.endswith(".json") else [
        os.path.join(target, p) for p in sorted(os.listdir(target)) if p.endswith(".json")]
    for path in files:
      print("\n".join(render(load(path), os.path.dirname(os.path.abspath(path)))))
  print(write_index(_RESULTS_DIR.value))
  names = update_readme(_README.value, _RESULTS_DIR.value)
  print(f"{_README.value}: tables of {', '.join(names) if names else 'no benchmark'} updated")


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=ungrouped-imports
  _RESULTS_DIR = flags.DEFINE_string("results_dir", RESULTS_DIR, "Folder of the results files.")
  _README = flags.DEFINE_string("readme", README, "README with <!-- results:<name> --> markers.")
  _RENDER = flags.DEFINE_string("render", None, "Also re-render the .md/.png of the JSON files "
                                "in this folder (or this .json file) first.")
  app.run(main)
