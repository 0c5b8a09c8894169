# The two set-up commands of the README: `make run` and `make test`.
# Everything they need is installed from here, into .venv, on a fresh machine.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: run test install install-test openapi clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

## The broker on the embedded default: SQLite, native provider, example policy, no outside service.
run: install
	$(BIN)/broker-cli dev

## The whole suite: SQLite and PostgreSQL, real OpenBao, moto and the GitHub stand-in.
test: install-test
	scripts/ensure-postgres
	$(BIN)/pytest -q $(PYTEST_ARGS)

openapi: install
	$(BIN)/python -m broker.api.openapi > openapi.yaml

clean:
	rm -rf $(VENV) .broker .pytest_cache
