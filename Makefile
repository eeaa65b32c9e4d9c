# Two commands on a fresh machine with Python 3.11:
#   make search   a default search (PROFILE=fast for about a minute), logged to ./mlflow.db
#   make test     every test, as CI runs them (installs chromium and postgresql where it can)
# Both build .venv from requirements-dev.txt on first use.
PYTHON ?= python3
PROFILE ?= default
# The offline MNIST copy beside the checkout, when there is one; else keras.datasets.mnist downloads it.
MNIST_NPZ ?= $(wildcard $(abspath ../shared/data/mnist.npz))
export MNIST_NPZ
VENV := .venv/bin

.PHONY: search test test-fast lint system-packages notebook lab

search: .venv/installed
	PATH="$(CURDIR)/$(VENV):$$PATH" mlflow run . --env-manager local -P profile=$(PROFILE)

# Most tests wait on processes, servers and clusters: two workers overlap that waiting. The
# tests that time themselves against a budget (marked alone) run afterwards, one at a time.
TEST_WORKERS ?= 2
test: .venv/installed system-packages lint
	$(VENV)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup -m "not alone"
	$(VENV)/python -m pytest -m alone

# The notebook, run top to bottom (a smoke search) into outputs/notebook/, outputs and figures kept,
# and an HTML copy to read without Jupyter; to work in it instead: make lab
notebook: .venv/lab-installed
	mkdir -p outputs/notebook
	cp notebooks/mnist_pipeline.ipynb outputs/notebook/
	$(VENV)/jupyter-execute --inplace --timeout=-1 outputs/notebook/mnist_pipeline.ipynb
	$(VENV)/jupyter nbconvert --to html outputs/notebook/mnist_pipeline.ipynb
	@echo "executed: outputs/notebook/mnist_pipeline.ipynb and .html"

# The notebook in JupyterLab, on loopback, in this project's .venv and with MNIST_NPZ set.
# JupyterLab (with nbconvert) goes into .venv on first use: running and testing the search do not need it.
lab: .venv/lab-installed
	$(VENV)/jupyter lab --ip 127.0.0.1 notebooks/mnist_pipeline.ipynb

.venv/lab-installed: .venv/installed
	$(VENV)/python -m pip install --quiet jupyterlab
	touch $@

# The fast tier: code, data and model tests, no browser, no database, no `mlflow run`; on the
# same workers as `make test`, its one self-timing test afterwards.
test-fast: .venv/installed
	$(VENV)/python -m pytest -n $(TEST_WORKERS) -m "not e2e and not alone"
	$(VENV)/python -m pytest -m "alone and not e2e"

lint: .venv/installed
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .

.venv/installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv .venv
	$(VENV)/python -m pip install --quiet --upgrade pip
	$(VENV)/python -m pip install --quiet -r requirements-dev.txt
	touch $@

# The browser test drives Debian's chromium (no browser download); the scale-out
# tests' tracking server keeps its runs in PostgreSQL, which the tests start themselves.
system-packages:
	@missing=""; command -v chromium >/dev/null || missing="chromium"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
		else echo "install $$missing (apt-get install $$missing) for the end-to-end tests, or run make test-fast" >&2; exit 1; fi; \
	fi
