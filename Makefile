# Two entry points: `make demo` (set up + run the Shakespeare demo end to end) and `make test`.
# torch==2.13.0 goes in first: it is the local CPU build; a bare `torch` would pull a multi-GB CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-all bench clean-demo

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/retro-lit demo --workspace workspaces/shakespeare --run_dir runs/demo

test: setup  # pytest's exit 5 (no test collected) is not a failure here
	$(PY) -m pytest -q; rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

test-all: setup
	$(PY) -m pytest -q -m "not gpu"

bench: setup
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/build_db.py
	$(PY) benchmarks/generate.py

clean-demo:
	rm -rf workspaces/shakespeare runs/demo
