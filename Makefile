# The two set-up commands of the README: `make demo` and `make test` (ruff check, then pytest).
# Both create .venv on first use and install what they need (PyTorch's CPU wheel where there is
# no NVIDIA GPU; a GPU user's own CUDA torch is kept, since the project asks only torch>=2.4).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_CPU ?= torch==2.13.0

.PHONY: demo test setup setup-test bench bench-peers bench-quality clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

setup: $(BIN)/python
	@if ! $(BIN)/python -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q "torch>=2.4"; \
	  else $(BIN)/pip install -q "$(TORCH_CPU)"; fi; \
	fi
	$(BIN)/pip install -q -e .

# what `make test` adds: pytest, Playwright, schemathesis, faiss, ruff (the demo needs none of them)
setup-test: setup
	$(BIN)/pip install -q -e ".[test]"

demo: setup
	$(BIN)/influence demo

test: setup-test
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python bench/engine_bench.py

# The engine against captum's and pyDVL's influence functions (bench/peers_bench.py), in its own
# venv: torch's CPU wheel first, then the pinned peers, then this project without its web deps.
PEERS_VENV ?= bench/.venv-peers
bench-peers:
	@if [ ! -x $(PEERS_VENV)/bin/python ] || ! $(PEERS_VENV)/bin/python -c "import captum, pydvl, engine" 2>/dev/null; then \
	  $(PY) -m venv $(PEERS_VENV) && \
	  $(PEERS_VENV)/bin/pip install -q "$(TORCH_CPU)" && \
	  $(PEERS_VENV)/bin/pip install -q -r bench/peers-requirements.txt && \
	  $(PEERS_VENV)/bin/pip install -q --no-deps -e .; \
	fi
	$(PEERS_VENV)/bin/python bench/peers_bench.py

# LDS of every method of ours and of kronfluence, TRAK and TracIn (bench/quality_bench.py), peers in their own venv
QUALITY_VENV ?= bench/.venv-quality
bench-quality: setup
	@if [ ! -x $(QUALITY_VENV)/bin/python ] || ! $(QUALITY_VENV)/bin/python -c "import kronfluence, trak, captum" 2>/dev/null; then \
	  $(PY) -m venv $(QUALITY_VENV) && \
	  $(QUALITY_VENV)/bin/pip install -q "$(TORCH_CPU)" && \
	  $(QUALITY_VENV)/bin/pip install -q "$(TORCH_CPU)" -r bench/quality-requirements.txt && \
	  $(QUALITY_VENV)/bin/pip uninstall -q -y torchvision; \
	fi
	$(BIN)/python bench/quality_bench.py --quick

clean:
	rm -rf runs .pytest_cache
