# Two entry points: `make demo` (set up + main job) and `make test` (set up, with the test extras, + tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR ?= /tmp/maxlm-demo

.PHONY: demo test test-gpu-aot setup clean

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
	$(BIN)/python -m pytest -q --durations=25 tests

# GPU compilation without a GPU (tests/test_gpu_aot.py): the CUDA compiler plugin and cuDNN (~2.5 GB, the `gpu-aot`
# extra) in a venv of their own, so that the main one never tries to start a CUDA backend.
GPU_AOT_VENV := .venv-gpu-aot
$(GPU_AOT_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(GPU_AOT_VENV)
	$(GPU_AOT_VENV)/bin/pip install --quiet --upgrade pip
	$(GPU_AOT_VENV)/bin/pip install --quiet -e '.[gpu-aot]' 'pytest>=8,<10'
	touch $@

test-gpu-aot: $(GPU_AOT_VENV)/.installed
	JAX_PLATFORMS=cpu $(GPU_AOT_VENV)/bin/python -m pytest -q tests/test_gpu_aot.py

clean:
	rm -rf $(VENV) $(GPU_AOT_VENV) *.egg-info
