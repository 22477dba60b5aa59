# The front door: `make run` runs the main experiment on its CPU-sized default config,
# `make test` runs the test suite. Both bootstrap .venv first (scripts/bootstrap.sh).
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: run test bootstrap clean

bootstrap: $(STAMP)

$(STAMP): pyproject.toml scripts/bootstrap.sh
	bash scripts/bootstrap.sh
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/python -m experiments.main --config=configs/tg_sweep.py

# Both passes run one pytest process a core (pytest-xdist; on a 2-core machine the first took
# 13 minutes instead of 21, the second 2 instead of 3). The first compiles for the CPU without
# LLVM's optimisations (XLA's backend level 0): its programs are small, compiling them is most
# of its time, and its tests check results, not speed (on 2 cores, 697 → 601 s). The tests
# marked aot compile for an H200 without one, through jax's CUDA plugin in .aot
# (scripts/bootstrap.sh); JAX_PLATFORMS=cpu keeps the plugin from looking for a GPU.
test: $(STAMP)
	XLA_FLAGS="--xla_backend_optimization_level=0 $$XLA_FLAGS" \
	  $(VENV)/bin/python -m pytest -q -n auto -m "not aot"
	JAX_PLATFORMS=cpu PYTHONPATH=.aot $(VENV)/bin/python -m pytest -q -n auto -m aot

clean:
	rm -rf $(VENV) .aot
