# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned so these machines take the local CPU build instead of downloading CUDA.
TORCH := torch==2.13.0

.PHONY: demo test lint install

$(BIN)/llama2: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[serve,gguf,test]'
	touch $(BIN)/llama2

install: $(BIN)/llama2

demo: install
	$(BIN)/llama2 run --out runs/demo

test: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports
