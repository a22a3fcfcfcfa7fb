# The two commands: `make run` (the pipeline) and `make test` (the test suite). Both set themselves up.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# pip on these machines prints a line for every index folder it cannot use; hide only those lines.
# (grep exits 1 when it filters every line: only that is forgiven; a pip failure still fails the recipe.)
QUIET_PIP := { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: setup run test test-all lint bench sweep cai clean-venv

# uv installs in under a minute what pip takes 3 to 4 minutes for; pip stays the fallback where uv cannot be
# had. uv reads neither pip.conf nor PIP_FIND_LINKS, so it is given the folders pip finds wheels in (on these
# machines, the CPU build of torch). --compile-bytecode: pip writes the .pyc files at install, uv only when
# asked, and with PYTHONDONTWRITEBYTECODE set every process would compile torch and Lightning anew.
# torch is pinned: the CPU build on these machines (an open range would pull a CUDA build).
PIP_LINKS = $(sort $(subst :, ,$(PIP_FIND_LINKS)) $(shell python3 -m pip config get global.find-links 2>/dev/null))
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	if $(PY) -m pip install -q uv 2>&1 | $(QUIET_PIP) && $(PY) -m uv --version >/dev/null; then \
	  $(PY) -m uv pip install -q --compile-bytecode --python $(PY) $(foreach d,$(PIP_LINKS),--find-links $(d)) \
	    torch==2.13.0 -e '.[dev]'; \
	else \
	  $(PY) -m pip install -q torch==2.13.0 2>&1 | $(QUIET_PIP); \
	  $(PY) -m pip install -q -e '.[dev]' 2>&1 | $(QUIET_PIP); \
	fi
	$(PY) -c "import torch, lightning, dvc, mlflow, datasets, tokenizers, llmlab"
	touch $(STAMP)

setup: $(STAMP)

## Run the pipeline (corpus → tokenizer → pretrain → …) with the venv's python on PATH.
run: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" dvc repro

## Run the test suite's fast default: unit and property tests, and the real `dvc repro` of the tiny configuration
## end to end with its kill/resume and real-data runs; the `full` tests (a second run from scratch compared byte
## for byte, DDP, the CAI experiment, faults mid-run, the β sweep) are left to `make test-all`, which CI runs.
## One process per core, each test file in one process (its module fixtures, e.g. the e2e pipeline, run once).
PYTEST := $(PY) -m pytest -q -n auto --dist loadfile
test: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PYTEST) -m "not full" $(PYTEST_ARGS)

test-all: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PYTEST) $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check src pipeline tests benchmarks

bench: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) benchmarks/run.py

## Over-optimisation: PPO at several fixed KL coefficients β (no KL budget: `ppo.kl_target` null) as queued DVC
## experiments on the finished run in the workspace (the default run, β 0.3 within its KL budget, is one more
## point), then reports/overoptimisation.{md,png}. About 4 minutes per β on 2 cores.
SWEEP_BETAS ?= 0.01,0.03,0.1,1.0
sweep: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" dvc exp run ppo --queue -S 'ppo.kl_coef=$(SWEEP_BETAS)' -S ppo.kl_target=null
	PATH="$(abspath $(VENV))/bin:$$PATH" dvc exp run --run-all
	$(PY) -m llmlab.evaluation.sweep

## Constitutional AI: the model labels the preference pairs itself (the critique stage teaches it), as a DVC
## experiment on the finished run in the workspace (the rater's run), then reports/constitution.md, both paths.
cai: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" dvc exp run --temp -S preferences.labeller=constitution
	$(PY) -m llmlab.evaluation.labellers

clean-venv:
	rm -rf $(VENV)
