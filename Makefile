# Everything runs inside .venv, which is created on first use and reused afterwards
# (re-installed only when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test lint demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e ".[dev,search]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check autobuild tests scripts
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check autobuild tests scripts

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
