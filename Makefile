# The two commands in the README. Both set up .venv first (scripts/setup.sh), then do their one job.
.PHONY: demo test setup lint

demo: setup
	.venv/bin/qlora train

test: setup
	.venv/bin/python -m pytest -q

setup:
	@scripts/setup.sh

lint: setup
	.venv/bin/ruff check qlora tests scripts
