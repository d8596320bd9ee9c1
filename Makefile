# `make test`: create .venv when missing, install the project and its test extras, run the suite.
# `make demo` arrives with the rollouts issue.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-core

.PHONY: test lint venv clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch is installed first and pinned: on these machines torch==2.13.0 resolves to the local CPU
# build, while an unpinned torch pulls several GB of CUDA packages.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check gspo_components tests
	$(VENV)/bin/ruff format --check gspo_components tests

test: $(STAMP)
	$(VENV)/bin/ruff check gspo_components tests
	HYPOTHESIS_PROFILE=ci $(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
