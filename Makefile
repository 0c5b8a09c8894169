# The two set-up commands of the README: `make run` and `make test`.
# Everything they need is installed from here, into .venv, on a fresh machine.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PYTEST_WORKERS ?= 4

.PHONY: run test lint install install-test oidc-provider openapi bench soak screenshots clean

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

## The whole suite: SQLite and PostgreSQL, real OpenBao, moto, the GitHub stand-in, a real
## OpenID provider (npm's oidc-provider on Node, pinned by its package-lock.json) and Debian's
## Chromium for the console's browser tests (Playwright drives it; it never downloads a browser).
## pytest-xdist runs it in 4 workers whatever the core count: most of a test's time is spent
## waiting on its peers (servers, subprocesses, PostgreSQL, sleeps), so on 2 cores 4 workers took
## 583 s where 2 took 873 s (2026-12-07, quiet machine). Each worker starts its own peers on free
## ports and makes its own databases, so workers never share state. PYTEST_WORKERS overrides it.
test: install-test oidc-provider
	scripts/ensure-postgres
	scripts/ensure-chromium
	$(BIN)/pytest -q -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

## The README's pictures: the console's browser tests, writing their screenshots into docs/.
## (make test writes them to a scratch folder, so a test run leaves the tracked tree clean.)
screenshots: install-test oidc-provider
	scripts/ensure-chromium
	BROKER_SCREENSHOTS_DIR=$(CURDIR)/docs/screenshots $(BIN)/pytest -q tests/e2e/test_console_browser.py

OIDC_PROVIDER := tests/support/oidc_provider

$(OIDC_PROVIDER)/node_modules/.package-lock.json: $(OIDC_PROVIDER)/package-lock.json $(OIDC_PROVIDER)/package.json
	npm ci --prefix $(OIDC_PROVIDER) --no-audit --no-fund

oidc-provider: $(OIDC_PROVIDER)/node_modules/.package-lock.json

## ruff (style, imports, bugbear, simplify, security, complexity...: the set in pyproject.toml) and
## mypy --strict over the package: part of CI.
lint: install-test
	$(BIN)/ruff check broker tests bench
	$(BIN)/mypy

## The scale figures (BENCHMARKS.md): wrk against brokers on PostgreSQL beside OpenBao, about
## 8 minutes on 2 cores; rewrites the `make bench` block of BENCHMARKS.md. Run it on an idle machine.
bench: install-test
	$(BIN)/pip install --quiet -e '.[test,bench]'
	scripts/ensure-postgres
	scripts/ensure-bench-tools
	$(BIN)/python bench/suite.py --write BENCHMARKS.md --json bench/results/latest.json $(BENCH_ARGS)
	$(MAKE) soak

## The soak (BENCHMARKS.md, `make soak` block): 500,000 native capabilities over 64 sessions, the
## sweeper expiring them, RSS / files / threads / connections / table sizes sampled. About 1-2 h.
soak: install-test
	scripts/ensure-postgres
	scripts/ensure-bench-tools
	$(BIN)/python bench/soak.py --write BENCHMARKS.md --json bench/results/soak.json $(SOAK_ARGS)

openapi: install
	$(BIN)/python -m broker.openapi > openapi.yaml

clean:
	rm -rf $(VENV) .broker .pytest_cache $(OIDC_PROVIDER)/node_modules
