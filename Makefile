# Two entry points: `make demo` and `make test`. Both create .venv on first use.
# TORCH pins the CPU build this kind of machine holds; on a CUDA box `make TORCH=torch ...`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
export MUJOCO_GL ?= egl

.PHONY: setup demo test test-slow lint typecheck clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev,deploy,zoo]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/dql-agent demo

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

clean:
	rm -rf $(VENV) dql_demo .pytest_cache
