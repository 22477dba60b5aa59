"""Experiment runner: `python -m experiments.main --config=configs/<name>.py [--config.<field>=<value>]
[--workdir=DIR]`. The config's `kind` picks the experiment; results go to --workdir, by default
results/<config name>/<UTC timestamp>/."""

import datetime
import importlib
import os
import signal

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python file with get_config().",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder; default results/<config>/<time>/.")
flags.mark_flags_as_required(["config"])

# kind -> module with run(config, workdir); the microbenchmarks live beside the sweep.
EXPERIMENTS = {
    "tg_sweep": "experiments.sweep",
    "decode_kernels": "experiments.bench_decode",
    "batched_gemv": "experiments.bench_gemv",
    "cpu_decode": "experiments.bench_cpu_decode",
}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  config = _CONFIG.value
  if config.kind not in EXPERIMENTS:
    raise app.UsageError(f"config.kind={config.kind!r}; expected one of {sorted(EXPERIMENTS)}")
  name = os.path.splitext(os.path.basename(config_flags.get_config_filename(flags.FLAGS["config"])))[0]
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
  workdir = _WORKDIR.value or os.path.join("results", name, stamp)
  module_name = EXPERIMENTS[config.kind]
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as err:
    if err.name != module_name:
      raise
    print(f"{config.kind}: not available yet ({module_name} does not exist in this checkout)")
    return 2
  signal.signal(signal.SIGTERM, signal.default_int_handler)  # a kill keeps finished rows too
  if config.kind == "tg_sweep":
    module.run(config, workdir, config_name=name)
  else:
    module.run(config, workdir)
  return 0


if __name__ == "__main__":
  app.run(main)
