# The two commands in the README. Both set up .venv first (scripts/setup.sh), then do their one job.
.PHONY: demo test test-fast setup lint test-latest lock gpu-check gpu-check-dry

demo: setup
	.venv/bin/qlora train

# pytest-xdist: one worker per core (at most 4); a test file, or the files sharing a trained run, go to one worker,
# longest first (tests/conftest.py); the cores' threads are shared among the workers. docs/testing.md has the
# measured times (about 13 min on 2 cores). PYTEST_WORKERS=0 runs one process (about 18 min).
PYTEST_WORKERS ?= auto
XDIST = $(if $(filter 0,$(PYTEST_WORKERS)),-p no:xdist,-n $(PYTEST_WORKERS) --maxprocesses 4 --dist loadscope)

test: setup
	.venv/bin/python -m pytest -q $(XDIST)

# The tests that are not marked slow: config, data, plan, loss, CLI errors (under 2 minutes on 2 cores); no training run,
# export, resume, torchrun or real model.
test-fast: setup
	.venv/bin/python -m pytest -q -m "not slow"

setup:
	@scripts/setup.sh

lint: setup
	.venv/bin/ruff check qlora tests scripts

# The suite against the newest versions pyproject.toml's ranges allow, in a venv of its own (.venv-latest).
test-latest:
	@QLORA_VENV=.venv-latest QLORA_CONSTRAINTS= scripts/setup.sh
	.venv-latest/bin/python -m pip install --quiet --disable-pip-version-check --upgrade -e '.[dev]'
	.venv-latest/bin/python -m pytest -q

# Record .venv's versions (all but torch, which setup.sh picks per machine) as the ones set-up installs.
lock: setup
	.venv/bin/python -m pip freeze --exclude-editable | grep -v '^torch==' > constraints.txt

# On a lent GPU machine, in the project root (docs/benchmarks.md, "GPU check"): versions, GPU tests, bench, longest
# probe in a 360 s budget; OUT=folder for the figures. gpu-check-dry: the same script on the CPU, tiny workload.
gpu-check:
	scripts/gpu_check.sh $(OUT)

gpu-check-dry: setup
	PYTHON=.venv/bin/python scripts/gpu_check.sh --dry-run $(or $(OUT),gpu-check-dry)
