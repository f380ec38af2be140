# The two commands of README.md: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch is pinned here, before the package: on this kind of machine the 2.13.0 CPU wheel lies on
# disk; elsewhere pip takes the matching build from PyPI. pyproject's floor never upgrades it.
TORCH  ?= torch==2.13.0
DEMO_OUT ?= runs/demo
# The demo's evaluations: 500 samples per scale with the model's own sampler (its preset records
# ancestral sampling in 20 steps: docs/results.md, "Which sampler judges the demo"), so that
# `cfgdiff eval --checkpoint runs/demo --scale 1 --n 500` repeats them as they are.
DEMO_EVAL ?= --n 500

.PHONY: demo test install install-test browser lint format bench-quick clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Packages are not compiled to bytecode at install (pip's default: for torch alone most of a
# minute on two cores, mostly for modules cfgdiff never imports); Python compiles the modules it
# imports on first use and keeps them in the venv, also where the environment says not to.
export PYTHONDONTWRITEBYTECODE :=

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --no-compile --disable-pip-version-check $(TORCH)
	$(BIN)/python -m pip install --quiet --no-compile --disable-pip-version-check -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet --no-compile --disable-pip-version-check -e '.[test]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test browser

# The browser of the web page's end-to-end test (tests/test_serve_browser.py): Debian's chromium,
# installed when it is missing and this runs as root; where it cannot be, that test skips and
# says why.
browser:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's chromium for the browser test"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  { apt-get install -y -qq chromium || { apt-get update -qq && \
	    apt-get install -y -qq chromium; }; } >/dev/null 2>&1 || \
	  echo "chromium could not be installed: the browser test will skip"; fi

# Train the demo preset on MNIST (cpu-demo where training runs in bf16, cpu-demo-fp32 on a CPU
# without native bf16; resuming if an earlier demo was interrupted), measure class accuracy at
# s=1 and s=3 with cfgdiff's own MNIST classifier, animate the denoising at s = 0, 1, 3 (rows =
# digits) beside the guidance strip, and say how long each phase took.
demo: install
	@set -e; T=$$(date +%s); PHASES=""; \
	phase() { N=$$(date +%s); PHASES="$$PHASES$$1 $$((N - T)) s; "; T=$$N; }; \
	$(BIN)/cfgdiff data fetch mnist; phase fetch; \
	if [ -d $(DEMO_OUT)/checkpoints ]; then \
	  $(BIN)/cfgdiff train --dataset mnist --out $(DEMO_OUT) --resume; else \
	  $(BIN)/cfgdiff train --dataset mnist --preset demo --out $(DEMO_OUT); fi; phase train; \
	$(BIN)/cfgdiff eval --checkpoint $(DEMO_OUT) --scale 1 $(DEMO_EVAL) --json $(DEMO_OUT)/eval_s1.json; \
	phase "eval s=1"; \
	$(BIN)/cfgdiff eval --checkpoint $(DEMO_OUT) --scale 3 $(DEMO_EVAL) --json $(DEMO_OUT)/eval_s3.json; \
	phase "eval s=3"; \
	$(BIN)/cfgdiff sample --checkpoint $(DEMO_OUT) --animate $(DEMO_OUT)/denoising.gif \
	  --animate-scales 0,1,3 --per-class 1 --sampler dpmpp-2m --steps 10; phase animation; \
	cat $(DEMO_OUT)/SUMMARY.txt; \
	echo "phases: $$PHASES" | tee $(DEMO_OUT)/phases.txt

# Two or more workers (pytest-xdist; one torch thread each, tests/conftest.py), a test file per
# worker at a time: the suite's subprocesses, servers and sleeps overlap with computation.
test: install-test
	$(BIN)/python -m pytest -q -n auto --dist loadfile

# Every benchmark's quick mode (CPU, about a minute; the full modes are run by hand, see README).
bench-quick: install
	$(BIN)/python bench/train_throughput.py --quick --presets tiny --device cpu
	$(BIN)/python bench/train_throughput.py --quick --presets tiny --device cpu --optimizer
	$(BIN)/python bench/sample_throughput.py --quick --preset tiny --device cpu
	$(BIN)/python bench/samplers.py --quick --device cpu
	$(BIN)/python bench/folder_load.py --quick
	$(BIN)/python bench/upsample.py --quick --device cpu
	$(BIN)/python bench/time_to_quality.py --quick --device cpu
	$(BIN)/python bench/distributed_scaling.py --quick --preset tiny --device cpu
	$(BIN)/python bench/tune_demo.py --quick --throughput bench/results/cpu_throughput.json \
	  --only base,pad32 --device cpu

lint: install-test
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: install-test
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
