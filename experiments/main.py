"""Experiment runner, from the repository root:

  python -m experiments.main --config=configs/<name>.py [--config.<field>=<value> ...]
      [--workdir=DIR] [--publish]

The config file holds every default; its `kind` picks the experiment. A run writes
<name>.json, <name>.md (and <name>.png where it plots) to --workdir, by default
results/<name>/<UTC time>/; --publish also copies them to docs/results/ and regenerates the
results index and the README's tables (experiments/publish.py).
"""

import logging
import sys


class _NoTpuProbe(logging.Filter):
  """Drops jax's log line about the TPU backend it probes and does not find on a GPU or CPU host
  ("Unable to initialize backend 'tpu'"); other backends' messages pass."""

  def filter(self, record):
    return "backend 'tpu'" not in record.getMessage()


logging.getLogger("jax._src.xla_bridge").addFilter(_NoTpuProbe())

# pylint: disable=wrong-import-position
import datetime
import importlib
import os
import signal

from absl import app, flags
from ml_collections import config_flags

from experiments import EXPERIMENTS, config_doc

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Python file with get_config() (configs/<name>.py); --help with it lists "
    "its fields.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder; default results/<name>/<time>/.")
_PUBLISH = flags.DEFINE_bool("publish", False, "After the run, copy its files to docs/results/ "
                             "and regenerate the results index and the README's tables.")
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  config = _CONFIG.value
  if config.kind not in EXPERIMENTS:
    raise app.UsageError(f"config.kind={config.kind!r}; expected one of {sorted(EXPERIMENTS)}")
  path = config_flags.get_config_filename(flags.FLAGS["config"])
  name = os.path.splitext(os.path.basename(path))[0]
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
  workdir = _WORKDIR.value or os.path.join("results", name, stamp)
  module = importlib.import_module(EXPERIMENTS[config.kind])
  from experiments import harness, publish  # pylint: disable=import-outside-toplevel
  signal.signal(signal.SIGTERM, signal.default_int_handler)  # a kill keeps finished rows too
  try:
    module.run(config, workdir, name=name, title=config_doc.title(path))
  except harness.ConfigError as err:
    print(f"error: {err}", file=sys.stderr, flush=True)
    return 1
  written = [p for p in harness.paths(workdir, name).values() if os.path.exists(p)]
  print(f"\nwritten: {', '.join(written)}", flush=True)
  if _PUBLISH.value:
    print(f"published: {', '.join(publish.publish(workdir, name))}", flush=True)
  return 0


if __name__ == "__main__":
  __doc__ = config_doc.usage(__doc__, sys.argv)
  app.run(main)
