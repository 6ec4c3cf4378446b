# bmcell: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTOS := $(wildcard proto/bmcell/v1/*.proto)

.DEFAULT_GOAL := help

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml constraints.txt
	bash scripts/setup.sh
	@touch $@

setup: $(STAMP) ## Create .venv, install pinned dependencies and system packages, check proto/ stubs
	$(PY) -m bmcell.protogen --check

proto: $(STAMP) ## Compile proto/ into the bmcell.v1 package (commit the result)
	$(PY) -m bmcell.protogen

demo: setup ## Synthetic multi-lab run end to end on the embedded stack
	$(VENV)/bin/bmcell demo

test: setup ## Unit and integration tests (starts the embedded stack)
	$(PY) -m pytest tests

test-unit: setup ## Unit tests only
	$(PY) -m pytest tests/unit

bench: setup ## Benchmarks that print figures for this machine
	$(PY) -m bench

lint: setup ## Ruff over the code
	$(VENV)/bin/ruff check bmcell services tests bench
	$(VENV)/bin/ruff format --check bmcell services tests bench

clean: ## Stop the embedded stack and remove .run/
	-$(VENV)/bin/bmcell stack down
	rm -rf .run

.PHONY: help setup proto demo test test-unit bench lint clean
