# Quick start: `make demo` runs the main job, `make test` runs the tests. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-slow lint

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/edgeft demo

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-slow: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m slow

lint: setup
	$(VENV)/bin/ruff check edgeft tests benchmarks
