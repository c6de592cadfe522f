# Trace: the single entry point for setting up, running and checking the platform.
# Assumes Debian 12, Python 3.11 and Node 20. `make help` lists the targets.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

PYTHON      := .venv/bin/python
SERVICES    := $(PYTHON) -m infra.local.services
LOCAL_ROOT  := .local
PG_INITDB   := /usr/lib/postgresql/15/bin/initdb
# headless Chromium and its WebDriver, for the tests that read the Dagster UI's pages
CHROMEDRIVER := /usr/bin/chromedriver
PYTEST_ARGS ?=
# Root is needed for apt-get; use sudo when we are not root.
SUDO        := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# Stamps: redo `uv sync` / `npm ci` only when the dependency files change.
VENV_STAMP  := .venv/.trace-synced
NODE_STAMP  := node_modules/.trace-installed

# Benchmarks: add each new bench-* target here and `make bench` runs it.
BENCHES := bench-ingest bench-query bench-derived bench-commit bench-alerts bench-freshness bench-udf bench-taps bench-scale

.PHONY: help install services-up services-down demo dev test bench $(BENCHES) lint clean-local

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

install: $(VENV_STAMP) $(NODE_STAMP) $(PG_INITDB) $(CHROMEDRIVER) ## install everything (idempotent)

# uv comes from pip when it is missing; `python3 -m uv` works even if pip's bin dir is not on PATH.
$(VENV_STAMP): pyproject.toml uv.lock
	@if command -v uv >/dev/null 2>&1; then uv=uv; else \
	  if ! python3 -m uv --version >/dev/null 2>&1; then \
	    echo "uv not found: installing it with pip"; \
	    python3 -m pip install --user --quiet uv \
	      || python3 -m pip install --user --quiet --break-system-packages uv; \
	  fi; uv="python3 -m uv"; \
	fi; \
	$$uv sync --frozen
	@touch $@

# `npm install`, not `npm ci`: npm 11's `npm ci` rejects package-lock.json because it lacks the
# other platforms' optional anvil/cast binaries, while `npm install` accepts it unchanged. It is
# also incremental, so anvil binaries in use by running processes are not deleted.
$(NODE_STAMP): package.json package-lock.json
	npm install --no-audit --no-fund
	@touch $@

# Only when the PostgreSQL 15 server is missing (psql alone is not enough).
$(PG_INITDB):
	$(SUDO) apt-get update
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql-15

# Only when chromedriver is missing (Debian's chromium-driver pulls in chromium).
$(CHROMEDRIVER):
	$(SUDO) apt-get update
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver

services-up: install ## start PostgreSQL + anvil + local object store under .local/
	$(SERVICES) up --root $(LOCAL_ROOT)

services-down: ## stop the local services
	@if [ -x $(PYTHON) ]; then $(SERVICES) down --root $(LOCAL_ROOT); \
	else echo "no .venv: nothing to stop"; fi

demo: install ## end-to-end demo (starts and stops the services itself)
	$(PYTHON) -m infra.demo

dev: install ## Dagster UI with the local services, until Ctrl-C (or SIGTERM, also to make)
	exec $(PYTHON) -m infra.dev --stop-with-parent

test: install ## run the tests (extra pytest flags: PYTEST_ARGS="-k foo")
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

bench: $(BENCHES) ## run all benchmarks

bench-ingest: install ## ingest benchmark
	$(PYTHON) -m infra.bench.ingest

bench-commit: install ## commit latency/throughput on Postgres, commit share of the ingest
	$(PYTHON) -m infra.bench.commit

bench-taps: install ## what a wire tap costs a commit (none, healthy tap, stalled tap)
	$(PYTHON) -m infra.bench.taps

bench-derived: install ## derived datasets: Dagster materialisation vs the same transforms direct
	$(PYTHON) -m infra.bench.derived

bench-udf: install ## Python UDF through Pipes vs the same function direct; fixed cost per range
	$(PYTHON) -m infra.bench.udf

bench-scale: install ## cost curve: generated raw data 0.2M-20M rows; commit, derived, query vs direct; fits, PNG
	$(PYTHON) -m infra.bench.scale

bench-query: install ## query service (uvicorn) vs DuckDB directly on the same files
	$(PYTHON) -m infra.bench.query

bench-alerts: install ## alert latency finalized block -> webhook (head follower, 300 ms blocks), sink throughput
	$(PYTHON) -m infra.bench.alerts

bench-freshness: install ## finalized -> alert and -> row visible in /v1/query at 300 ms blocks; follower lag
	$(PYTHON) -m infra.bench.freshness

lint: install ## ruff check, ruff format --check, mypy, import layering (lint-imports)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy trace_resources trace_query_api
	$(dir $(PYTHON))lint-imports

clean-local: services-down ## stop the services and delete .local/
	rm -rf $(LOCAL_ROOT)
