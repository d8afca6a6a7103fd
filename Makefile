# make demo : install into .venv, then run the federated demo on generated data
# make test : install into .venv, then run the test suite (what CI runs)
# make test-gpu : the tests that need a CUDA GPU (tests/test_gpu_*.py), on a machine with one
# make docs : write the settings tables in docs/federation.md from the code's help strings
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The CPU build of torch 2.13.0 lies in /opt/wheels on these machines; pip finds
# it there instead of downloading a CUDA build of several GB.
WHEELS := $(wildcard /opt/wheels)
PIP_FLAGS := $(if $(WHEELS),--find-links $(WHEELS),)

.PHONY: install demo test test-gpu docs lint typecheck clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(PIP_FLAGS) -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedxrec demo

test: $(STAMP)
	$(BIN)/python -m pytest

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -m gpu

docs: $(STAMP)
	$(BIN)/fedxrec settings --write docs/federation.md

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
