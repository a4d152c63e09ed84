# Parley's front door. `make serve` and `make test` install what they need first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# pytest workers: the suite is I/O bound (real servers), two per core is comfortable.
WORKERS ?= 4
# Every package version is locked, with hashes, in requirements.lock (made by `make lock` from
# pyproject.toml); `make install` installs exactly that set. The one exception is the embedded
# model's runtime, llama-cpp-python: PyPI has no Linux wheel of it, so scripts/build-llama.sh
# builds it once from the pinned source release, portably (no -march=native), and keeps the
# wheel under var/wheels/, keyed by version and build flags.
UV     := $(BIN)/uv --native-tls
LOCKED := pyproject.toml requirements.lock scripts/build-llama.sh scripts/check-install.sh
STAMP  := $(VENV)/.installed-$(shell cat $(LOCKED) 2>/dev/null | cksum | cut -d' ' -f1)

.PHONY: install lock serve test test-fast lint format schema bench services-stop clean

install: $(STAMP)

$(STAMP): $(LOCKED)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv==0.9.30
	wheel=$$(scripts/build-llama.sh $(BIN)/python) && \
	  $(UV) pip install --quiet --python $(BIN)/python --no-deps --reinstall-package llama-cpp-python "$$wheel"
	$(UV) pip install --quiet --python $(BIN)/python --compile-bytecode --no-deps -r requirements.lock
	$(UV) pip install --quiet --python $(BIN)/python --no-deps -e .
	scripts/check-install.sh $(BIN)/python
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# Re-resolve requirements.lock after changing a dependency in pyproject.toml (the only step that
# picks new versions); then `make install`.
lock:
	test -x $(BIN)/uv || { $(PYTHON) -m venv $(VENV) && $(BIN)/python -m pip install --quiet uv==0.9.30; }
	$(UV) pip compile --quiet pyproject.toml --extra dev --universal --python-version 3.11 \
	  --generate-hashes --override scripts/lock-overrides.txt --no-emit-package llama-cpp-python \
	  -o requirements.lock

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

schema: install
	$(BIN)/python -c "import json; from parley.protocol import json_schema; \
	  print(json.dumps(json_schema(), indent=2, sort_keys=True))" > docs/protocol.schema.json

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Issue 9's benchmark, Parley and the peer (LangGraph dev, installed under var/peer) side by
# side: results in bench/results/ (bench/README.md). About six minutes on two cores.
bench: install
	$(BIN)/python -m bench.bench_all

services-stop:
	scripts/test-services.sh stop

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
