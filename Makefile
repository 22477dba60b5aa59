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

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV)
