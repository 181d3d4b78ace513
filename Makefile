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

# The tests that need PostgreSQL get a throw-away server on 127.0.0.1 (scripts/postgres.sh),
# stopped afterwards whatever the outcome; where no server binaries exist they are skipped.
test: $(STAMP)
	$(BIN)/ruff check autobuild tests scripts
	@pg=$$(mktemp -d /tmp/autobuild-pg.XXXXXX); \
	eval "$$(scripts/postgres.sh start $$pg)"; \
	status=0; $(BIN)/python -m pytest || status=$$?; \
	scripts/postgres.sh stop $$pg; exit $$status

lint: $(STAMP)
	$(BIN)/ruff check autobuild tests scripts

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
