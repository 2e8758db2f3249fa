# Agent Forge. Two set-up commands, both create and fill .venv on first use:
#   make demo   the tiny pipeline on embedded defaults (local store, SQLite MLflow, Prefect without a server)
#   make test   the test suite (unit, integration against local servers, end to end)
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | sha256sum | cut -c1-12)

.PHONY: demo test test-fast bench venv clean

$(STAMP): requirements.lock pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.lock
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	mkdir -p forge-store
	$(VENV)/bin/forge run --preset tiny --summary-json forge-store/demo-summary.json

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(VENV)/bin/python bench/cognate_throughput.py
	$(VENV)/bin/python bench/cache_rerun.py

clean:
	rm -rf forge-store forge-mlflow .prefect
