# hbbus — the two commands of the quick start are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: install servers demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,fast]'
	touch $(STAMP)

install: $(STAMP)

# RabbitMQ and Redis on localhost: uses them where they answer, else starts the local
# binaries, else Docker Compose where a Docker engine exists, else says what to install.
servers:
	scripts/ensure-servers

demo: install servers
	$(BIN)/hbbus demo

test: install servers
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy hbbus workers cli bench

bench: install servers
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python bench/all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .hypothesis
