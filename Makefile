# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ftl-installed

.PHONY: setup demo test clean

setup: $(STAMP)

# torch first (a local CPU build here), then everything else under the constraint so pip never swaps it.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(BIN)/ftl plan configs/quickstart.yaml
	$(BIN)/ftl run configs/quickstart.yaml --no-resume

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
