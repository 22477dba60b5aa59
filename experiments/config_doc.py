"""The runner's help text: the fields of a config file with the comment written next to each, or,
without a config, the configs there are with the first line of each one's docstring.

A field's comment is the comment at the end of its assignment (`config.reps = 5  # timed reps`),
after the comment lines right above it, if any. A config built on another one
(`from configs import tg_sweep`) also shows the fields it inherits, with their comments.
"""

from __future__ import annotations

import ast
import importlib.util
import io
import os
import sys
import tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
CONFIGS_DIR = os.path.join(ROOT, "configs")

GRAMMAR = """\
Implementations of a tg sweep (config.impls, comma-separated): layer/backend[:key=value...]
  layer    standard | absorbed (MLAttention's modes), or a name given to
           experiments.model.register_layer
  backend  xla | pallas | cpu | auto (MLAttention's backend)
  :cache=<dtype>  the cache dtype (default config.cache_dtype), e.g. absorbed/pallas:cache=int8
  :key=value      any other option goes to the layer, e.g. absorbed/pallas:weight_format=q8_0
Kernel benchmarks (decode_kernels, batched_gemv) name variants in config.variants:
  name -> {"impl": "pallas", "lowering": "triton" | "mosaic" | None, "tuning": {knob: value}}
"""


def title(path: str) -> str:
  """The first line of a config file's docstring."""
  with open(path, encoding="utf-8") as f:
    doc = ast.get_docstring(ast.parse(f.read())) or ""
  return doc.strip().splitlines()[0] if doc.strip() else ""


def available(configs_dir: str = CONFIGS_DIR) -> list[tuple[str, str]]:
  """(name, first docstring line) of every config file."""
  names = sorted(p[:-3] for p in os.listdir(configs_dir)
                 if p.endswith(".py") and not p.startswith("_"))
  return [(name, title(os.path.join(configs_dir, f"{name}.py"))) for name in names]


def field_comments(path: str) -> dict[str, str]:
  """{field: comment} of a config file, the fields of the configs it builds on first."""
  with open(path, encoding="utf-8") as f:
    source = f.read()
  tree = ast.parse(source)
  lines = source.splitlines()
  comments = {}  # line -> (column, text)
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      comments[tok.start[0]] = (tok.start[1], tok.string.lstrip("#").strip())
  fields, bases = {}, []
  nodes = sorted((n for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.ImportFrom))),
                 key=lambda n: n.lineno)
  for node in nodes:
    if isinstance(node, ast.ImportFrom):
      if node.module == "configs":
        bases += [alias.name for alias in node.names]
      continue
    name = _config_field(node.targets[0]) if len(node.targets) == 1 else None
    if name is None:
      continue
    above, line = [], node.lineno - 1
    while line in comments and not lines[line - 1][:comments[line][0]].strip():
      above.insert(0, comments[line][1])
      line -= 1
    after = [comments[l][1] for l in dict.fromkeys((node.lineno, node.end_lineno))
             if l in comments and lines[l - 1][:comments[l][0]].strip()]
    fields[name] = " ".join(above + after)
  inherited = {}
  for base in bases:
    base_path = os.path.join(os.path.dirname(path), f"{base}.py")
    if os.path.exists(base_path):
      inherited.update(field_comments(base_path))
  for name, comment in fields.items():
    inherited[name] = comment or inherited.get(name, "")
  return inherited


def _config_field(target) -> str | None:
  """"a.b" for an assignment to config.a.b, else None."""
  parts = []
  while isinstance(target, ast.Attribute):
    parts.insert(0, target.attr)
    target = target.value
  return ".".join(parts) if isinstance(target, ast.Name) and target.id == "config" and parts \
      else None


def _values(path: str) -> dict:
  """The config's field values, or {} if it does not load."""
  try:
    if ROOT not in sys.path:
      sys.path.insert(0, ROOT)
    spec = importlib.util.spec_from_file_location("_config_for_help", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config().to_dict()
  except Exception:  # pylint: disable=broad-except  # help must print whatever the config does
    return {}


def describe(path: str, width: int = 100) -> str:
  """The fields of a config file: `--config.<field>` with its default and comment."""
  values = _values(path)
  lines = [f"Fields of {os.path.relpath(path, os.getcwd())} (override any with "
           f"--config.<field>=<value>; tuples as --config.<field>='(1,2)'):"]
  for name, comment in field_comments(path).items():
    value = values.get(name.split(".")[0], "?") if "." not in name else "?"
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    lines.append(f"  --config.{name} (default {shown})")
    for text in _wrap(comment, width - 6):
      lines.append(f"      {text}")
  return "\n".join(lines)


def _wrap(text: str, width: int) -> list[str]:
  import textwrap  # pylint: disable=import-outside-toplevel
  return textwrap.wrap(text, width) or [""]


def config_path(argv) -> str | None:
  """The file named by --config in argv, if any."""
  for i, arg in enumerate(argv):
    if arg.startswith(("--config=", "-config=")):
      return arg.split("=", 1)[1]
    if arg in ("--config", "-config") and i + 1 < len(argv):
      return argv[i + 1]
  return None


def usage(doc: str, argv) -> str:
  """The runner's docstring followed by the config's fields (or the list of configs) and the
  implementation grammar; '%' is escaped for absl's usage()."""
  path = config_path(argv)
  if path and os.path.exists(path):
    middle = describe(path)
  else:
    configs = [(f"configs/{name}.py", what) for name, what in available()]
    width = max(len(path) for path, _ in configs) + 2
    middle = "Configs (run one with --config=configs/<name>.py; add it to --help to see its " \
             "fields):\n" + "\n".join(f"  {path:<{width}}{what}" for path, what in configs)
  text = f"{doc.rstrip()}\n\n{middle}\n\n{GRAMMAR}"
  return text.replace("%", "%%")
