# payflow: `make run` serves the API, `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test check lint worker bench bench-smoke db-shell seed migrate audit reset clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

run: $(STAMP)  ## the service on embedded PostgreSQL + Redis (or PAYFLOW_*_URL)
	$(BIN)/payflow run

test: $(STAMP)  ## the whole suite, on its own embedded servers
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check payflow tests bench gunicorn.conf.py

check: lint test

worker: $(STAMP)  ## one more outbox worker (start as many as you like)
	$(BIN)/payflow worker

bench: $(STAMP)  ## benchmarks on their own durable servers; JSON in bench/results/
	$(BIN)/python -m bench.transfers
	$(BIN)/python -m bench.outbox
	$(BIN)/python -m bench.audit

bench-smoke: $(STAMP)  ## the benchmarks at tiny scale: fails on errors, never on times
	$(BIN)/python -m bench.transfers --smoke
	$(BIN)/python -m bench.outbox --smoke
	$(BIN)/python -m bench.audit --smoke

db-shell: $(STAMP)
	$(BIN)/payflow db shell

seed: $(STAMP)
	$(BIN)/payflow seed

migrate: $(STAMP)
	$(BIN)/payflow db migrate

audit: $(STAMP)
	$(BIN)/payflow audit

reset:  ## wipe the embedded servers' data
	@if [ -x $(BIN)/python ]; then rm -rf "$$($(BIN)/python -c 'from payflow.runner import home; print(home())')"; fi
	rm -rf .payflow

clean: reset
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis .ruff_cache
