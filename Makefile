# The workbook's commands. Each target creates the virtual environment .venv from
# pyproject.toml on first use, so a fresh clone needs nothing but Python 3.10+.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PROFILE ?= demo

.PHONY: setup demo run test test-fast lab bench strip clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install kdlib with its dependencies

demo: $(STAMP)  ## run the whole notebook chain on the demo profile (synthetic data, CPU, <= 10 min)
	$(BIN)/kdlib run --profile demo

run: $(STAMP)  ## run the notebook chain for PROFILE=name (e.g. make run PROFILE=brats2020_h5)
	$(BIN)/kdlib run --profile $(PROFILE)

test: $(STAMP)  ## unit tests, the smoke notebook chain, and the notebooks in a browser (chromium)
	@command -v chromium >/dev/null 2>&1 || [ -n "$$CHROMIUM" ] || echo "note: chromium not found: the browser test will be skipped (apt-get install chromium)"
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest

test-fast: $(STAMP)  ## unit tests only (skips the notebook chain)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -m "not slow"

lab: $(STAMP)  ## open the notebooks in JupyterLab from the project's environment
	$(BIN)/jupyter lab notebooks/

bench: $(STAMP)  ## print the speed figures of benchmarks/
	for f in benchmarks/bench_*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

strip: $(STAMP)  ## strip outputs from the committed notebooks
	$(BIN)/python -m kdlib strip notebooks/*.ipynb

clean:  ## remove generated data, runs and figures (keeps .venv)
	rm -rf runs data/synthetic data/cache figures/*/
