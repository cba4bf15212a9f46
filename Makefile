# The two set-up commands of the README: `make demo` (the main job) and `make test`.
# Both create .venv on first use; pip takes torch/torchvision from the local wheel cache.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/densessl: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

.PHONY: demo test test-fast
demo: $(BIN)/densessl
	$(BIN)/densessl demo

test: $(BIN)/densessl
	$(BIN)/pytest -q

test-fast: $(BIN)/densessl
	$(BIN)/pytest -q -m "not slow"
