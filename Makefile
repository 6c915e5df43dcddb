# cdc-serve: every target sets up what it needs on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DATA_ROOT ?= /usr/share/datasets/fashion-mnist
RUN ?= runs/fmnist-quick
# images per Table 2 row in `make ablations` (a seeded subset; 70000 for all)
ABLATION_LIMIT ?= 20000
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | md5sum | cut -c1-8)

.PHONY: install data browser demo test test-fast lint format bench ablations clean

install: $(STAMP) data ## Create .venv with cdc-serve[train,server,dev,ray] and the dataset

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q -e ".[train,server,dev,ray]"
	touch $(STAMP)

data: ## Fashion-MNIST from Debian's dataset-fashion-mnist (when root and apt are there)
	@if [ -f $(DATA_ROOT)/train-images-idx3-ubyte.gz ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
	  || echo "warning: could not install dataset-fashion-mnist; use --download or --data-root"; \
	else echo "note: Fashion-MNIST not found at $(DATA_ROOT); install dataset-fashion-mnist or pass --data-root"; fi

browser: ## Chromium for the browser test of `cdc-serve report` (Debian's chromium, when root and apt are there)
	@if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null \
	  || echo "warning: could not install chromium; the report's browser test will be skipped"; \
	else echo "note: chromium not found; the report's browser test will be skipped (install chromium)"; fi

CLI := $(VENV)/bin/cdc-serve

demo: install ## Train the quick model (or reuse it), export, score held-out images with rejection and OOD flags
	@test -f $(RUN)/model.pth && echo "reusing $(RUN)/model.pth (delete it to retrain)" || \
	  $(CLI) train --dataset fashion-mnist --split train --preset quick --out $(RUN) --data-root $(DATA_ROOT)
	@test -d $(RUN)/model_repository/fmnist || \
	  $(CLI) export $(RUN)/model.pth --out $(RUN)/model_repository --name fmnist --data-root $(DATA_ROOT)
	$(CLI) predict $(DATA_ROOT)/t10k-images-idx3-ubyte.gz --model $(RUN)/model_repository/fmnist \
	  --reject-below 0.8 --output $(RUN)/preds.csv --labels $(DATA_ROOT)/t10k-labels-idx1-ubyte.gz
	$(CLI) evaluate $(RUN)/model.pth --dataset fashion-mnist --split test --ood-dataset digits \
	  --data-root $(DATA_ROOT) --out $(RUN)/eval

test: install browser ## The whole test suite, slow end-to-end tests included (what CI runs)
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
	$(VENV)/bin/cdc-serve ablations --dataset fashion-mnist --preset standard --limit $(ABLATION_LIMIT) \
	  --out docs/ABLATIONS.md

clean:
	rm -rf runs build *.egg-info .pytest_cache
