# Creates the environment when it is missing, then runs the job.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
JOBS   ?= auto
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
