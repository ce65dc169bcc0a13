# Everything runs from a virtualenv in .venv that the first target to need it creates.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
GEN_DIR := clients/python/src

.PHONY: run test lint proto proto-check bench clean-data

$(STAMP): pyproject.toml clients/python/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e clients/python -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/pulse run

test: $(STAMP)
	$(BIN)/python -m pytest

proto: $(STAMP)
	$(BIN)/python -m tools.protogen $(GEN_DIR)

# Fails when the committed generated code differs from what the protos produce.
proto-check: $(STAMP)
	$(BIN)/python -m tools.protogen --check $(GEN_DIR)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m tools.protogen --descriptor-set build/pulse.binpb
	$(BIN)/buf lint build/pulse.binpb --path pulse/device/v1 --config buf.yaml

bench: $(STAMP)
	$(BIN)/python -m bench

clean-data:
	rm -rf .data
