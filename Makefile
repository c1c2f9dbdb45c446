# Two entry points: `make demo` (the main job) and `make test` (the whole suite).
# Both create .venv when absent. torch is installed first as the CPU wheel and then pinned
# with constraints.txt, so no dependency can replace it with a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
DEMO_ARGS ?=

.PHONY: demo test venv clean-demo

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip>=23"

$(VENV)/.torch: | $(PY)
	$(PIP) install --quiet "$(TORCH_SPEC)"
	touch $@

$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt $(VENV)/.torch
	$(PIP) install --quiet -c constraints.txt -e ".[nequip,distributed,test]"
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m ltau_ase.demo --output demo_output $(DEMO_ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

clean-demo:
	rm -rf demo_output
