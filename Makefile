# Creates the environment when it is missing, then runs the job.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# two pytest workers per core: a third of the suite's wall time is tests waiting on the processes
# they start (deployment, Ray, sweeps), which the second worker per core fills (8 min 27 s at one
# worker per core, 7 min 0 s at two, 2 cores, December 7)
JOBS   ?= $(shell $(PYTHON) -c "import os; print(2 * (os.cpu_count() or 1))")
DIST   ?= loadfile

.PHONY: setup demo lint test clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m experiments.run $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q -n $(JOBS) --dist $(DIST) --no-loadscope-reorder $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
