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

# Train the CPU demo preset on MNIST (resuming if an earlier demo was interrupted), then
# measure class accuracy at s=1 and s=3 with cfgdiff's own MNIST classifier.
demo: install
	$(BIN)/cfgdiff data fetch mnist
	@if [ -d $(DEMO_OUT)/checkpoints ]; then \
	  $(BIN)/cfgdiff train --dataset mnist --out $(DEMO_OUT) --resume; else \
	  $(BIN)/cfgdiff train --dataset mnist --preset cpu-demo --out $(DEMO_OUT); fi
	$(BIN)/cfgdiff eval --checkpoint $(DEMO_OUT) --scale 1 --n 500 --json $(DEMO_OUT)/eval_s1.json
	$(BIN)/cfgdiff eval --checkpoint $(DEMO_OUT) --scale 3 --n 500 --json $(DEMO_OUT)/eval_s3.json
	@cat $(DEMO_OUT)/SUMMARY.txt

test: install-test
	$(BIN)/python -m pytest -q

# Every benchmark's quick mode (CPU, about a minute; the full modes are run by hand, see README).
bench-quick: install
	$(BIN)/python bench/train_throughput.py --quick --presets tiny --device cpu
	$(BIN)/python bench/train_throughput.py --quick --presets tiny --device cpu --optimizer
	$(BIN)/python bench/sample_throughput.py --quick --preset tiny --device cpu
	$(BIN)/python bench/samplers.py --quick --device cpu
	$(BIN)/python bench/folder_load.py --quick
	$(BIN)/python bench/upsample.py --quick --device cpu
	$(BIN)/python bench/time_to_quality.py --quick --device cpu
	$(BIN)/python bench/tune_demo.py --quick --throughput bench/results/cpu_throughput.json \
	  --only base,pad32 --device cpu

lint: install-test
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: install-test
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
