# Parley's front door. `make serve` and `make test` install what they need first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
# pytest workers: the suite is I/O bound (real servers), two per core is comfortable.
WORKERS ?= 4

.PHONY: install serve test test-fast lint format services-start services-stop clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv==0.9.30
	$(BIN)/uv pip install --quiet --python $(BIN)/python -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

serve: install
	$(BIN)/parley serve

# The whole suite, with PostgreSQL and Redis test servers when they are installed.
test: install
	. scripts/test-services.sh start && \
	  $(BIN)/pytest -n $(WORKERS) $(PYTEST_ARGS)

# Without the local-model test (the slowest one).
test-fast: install
	. scripts/test-services.sh start && \
	  $(BIN)/pytest -n $(WORKERS) -m "not local_model" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

services-stop:
	scripts/test-services.sh stop

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
