# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# TORCH_SPEC picks the PyTorch build installed before the project. The default is the
# CPU build; on a GPU machine use e.g. `make demo TORCH_SPEC=torch` (CUDA wheel from PyPI).
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR   ?= runs/demo
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow bench install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test,plot]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/knnlm demo --workdir $(DEMO_DIR)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/train_eval_throughput.py --out benchmarks/results/train_eval.json

clean:
	rm -rf $(VENV) build *.egg-info
