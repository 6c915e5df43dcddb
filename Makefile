# cdc-serve: every target sets up what it needs on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DATA_ROOT ?= /usr/share/datasets/fashion-mnist
RUN ?= runs/fmnist-quick
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | md5sum | cut -c1-8)

.PHONY: install data demo test test-fast lint format bench ablations clean

install: $(STAMP) data ## Create .venv with cdc-serve[train,server,dev] and the dataset

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q -e ".[train,server,dev]"
	touch $(STAMP)

data: ## Fashion-MNIST from Debian's dataset-fashion-mnist (when root and apt are there)
	@if [ -f $(DATA_ROOT)/train-images-idx3-ubyte.gz ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
	  || echo "warning: could not install dataset-fashion-mnist; use --download or --data-root"; \
	else echo "note: Fashion-MNIST not found at $(DATA_ROOT); install dataset-fashion-mnist or pass --data-root"; fi

demo: install ## Train the quick model (or reuse it), export, score with rejection and OOD flags
	$(PY) -m cdc_serve.demo --run $(RUN) --data-root $(DATA_ROOT)

test: install ## The whole test suite, slow end-to-end tests included (what CI runs)
	$(PY) -m pytest -q -ra

test-fast: install ## Skip the slow end-to-end tests
	$(PY) -m pytest -q -ra -m "not slow"

lint: install
	$(VENV)/bin/ruff check cdc_serve training tests benchmarks
	$(VENV)/bin/ruff format --check cdc_serve training tests benchmarks

format: install
	$(VENV)/bin/ruff format cdc_serve training tests benchmarks
	$(VENV)/bin/ruff check --fix cdc_serve training tests benchmarks

bench: install ## Benchmarks -> docs/BENCHMARKS.md
	$(PY) -m benchmarks.run --out docs/BENCHMARKS.md

ablations: install ## The paper's Table 2 on Fashion-MNIST -> docs/ABLATIONS.md
	$(VENV)/bin/cdc-serve ablations --dataset fashion-mnist --preset quick --out docs/ABLATIONS.md

clean:
	rm -rf runs build *.egg-info .pytest_cache
