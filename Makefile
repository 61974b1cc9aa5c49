# Two entry points (see README): `make demo` runs the main job, `make test` runs the tests.
# Each creates .venv and installs instseg into it when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# pytest-xdist workers of make test; each gets cores / workers torch threads (tests/conftest.py).
TEST_WORKERS ?= 2

.PHONY: demo test lint format bench clean chromium

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: a range would take the newest (CUDA, multi-GB) build.
	$(PY) -m pip install --quiet "torch==2.13.0"
	# The tf extra too, so that the tests of instseg.tf run.
	$(PY) -m pip install --quiet -e ".[dev,tf]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/instseg demo

# The browser test of instseg serve drives Debian's Chromium; install it when missing (as
# root, or with passwordless sudo). Where that fails the test skips and says why.
chromium:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo "sudo -n" ); \
	  echo "installing chromium and chromium-driver (apt-get) for the browser test"; \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null 2>&1 && \
	    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } || \
	  echo "could not install Chromium: the browser test will be skipped"; }

test: $(STAMP) chromium
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/ops.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
