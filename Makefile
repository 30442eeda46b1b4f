# The README's commands. Each target creates .venv when missing and installs the project into it.
PY ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: demo test test-fast bench setup browser loadgen clean

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q -U pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)  ## run the whole loop on the embedded default (local Ray, MLflow on sqlite, Delta tables)
	$(VENV)/bin/driftloop demo

browser:  ## headless Chromium for the page test: Debian's package, installed when missing (as root, as in CI)
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "make test needs Chromium: sudo apt-get install chromium" >&2; exit 2; fi

test: $(STAMP) browser  ## every test, end-to-end ones included
	$(VENV)/bin/python -m pytest -v -rP --durations=15 tests/unit tests/integration

test-fast: $(STAMP)  ## unit tests only (no Ray)
	$(VENV)/bin/python -m pytest -m "not slow"

loadgen:  ## wrk, the serving benchmark's load generator: Debian's package, installed when missing (as root)
	@command -v wrk >/dev/null 2>&1 || \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; \
	  else echo "bench/serving.py falls back to a Python client without wrk: sudo apt-get install wrk" >&2; fi

bench: $(STAMP) loadgen  ## benchmarks; writes bench/results.md and bench/results.json
	$(VENV)/bin/python bench/run_all.py

clean:
	rm -rf .driftloop mlruns .pytest_cache
