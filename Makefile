# Two entry points: `make demo` (set up + main job) and `make test` (set up, with the test extras, + tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR ?= /tmp/maxlm-demo

.PHONY: demo test setup clean

$(BIN)/maxlm: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

setup: $(BIN)/maxlm

# The tests also need pytest, transformers with a CPU PyTorch (reference for the HF conversion) and libtpu (the
# `tpu` extra: `maxlm compile --topology` compiles for TPUs on a CPU host).
$(VENV)/.test: $(BIN)/maxlm
	$(BIN)/pip install --quiet -e '.[dev,tpu]'
	touch $@

demo: setup
	rm -rf $(DEMO_DIR)
	$(BIN)/python tools/demo.py --workdir=$(DEMO_DIR)

test: setup $(VENV)/.test
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) *.egg-info
