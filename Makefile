# The two commands of README.md: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch is pinned here, before the package: on this kind of machine the 2.13.0 CPU wheel lies on
# disk; elsewhere pip takes the matching build from PyPI. pyproject's floor never upgrades it.
TORCH  ?= torch==2.13.0
DEMO_OUT ?= runs/demo

.PHONY: demo test install install-test lint format bench-quick clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(TORCH)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

# Train the CPU demo preset on MNIST, then measure class accuracy at s=1 and s=3.
demo: install
	$(BIN)/cfgdiff data fetch mnist
	$(BIN)/cfgdiff train --dataset mnist --preset cpu-demo --out $(DEMO_OUT) --resume-or-new
	$(BIN)/python bench/demo_eval.py --run $(DEMO_OUT)

test: install-test
	$(BIN)/python -m pytest -q

lint: install-test
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: install-test
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
