# Two entry points: `make demo` (set up + main job) and `make test` (set up, with libtpu, + tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR ?= /tmp/maxlm-demo

.PHONY: demo test setup clean

$(BIN)/maxlm: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

setup: $(BIN)/maxlm

# libtpu (the `tpu` extra) for the `maxlm compile --topology` tests: TPU ahead-of-time compiles run on a CPU host.
$(VENV)/.tpu: $(BIN)/maxlm
	$(BIN)/pip install --quiet -e '.[dev,tpu]'
	touch $@

demo: setup
	rm -rf $(DEMO_DIR)
	$(BIN)/python tools/demo.py --workdir=$(DEMO_DIR)

test: setup $(VENV)/.tpu
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) *.egg-info
