# The two README commands: `make demo` (the main job) and `make test`.
# Each prepares .venv on first use (scripts/setup_env.sh).

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ringattn-installed
NPROC ?= 4
PYTEST_ARGS ?=

.PHONY: demo test lint setup clean

$(STAMP): pyproject.toml scripts/setup_env.sh
	bash scripts/setup_env.sh $(VENV)
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) launch/demo.py

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
