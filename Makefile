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

# The Slurm tests use a real local Slurm; where it cannot start (not root, no apt) they skip and say why.
test: setup
	bash tests/slurm/start-local-slurm.sh || echo "make test: the local Slurm did not start (reason above)"
	$(BIN)/python -m pytest -q --durations=20

.PHONY: slurm-up slurm-down

# A two-node Slurm on this machine (tests/slurm/README.md); idempotent, left running for other users.
slurm-up:
	bash tests/slurm/start-local-slurm.sh

slurm-down:
	bash tests/slurm/stop-local-slurm.sh

.PHONY: ray-up ray-down

# A two-node Ray on this machine, loopback only (tests/ray/README.md); idempotent. `make test` does not
# start it: the tests that need it do (tests/cluster/ray_fixture.py).
ray-up:
	bash tests/ray/start-local-ray.sh

ray-down:
	bash tests/ray/stop-local-ray.sh

clean:
	rm -rf $(VENV) runs
