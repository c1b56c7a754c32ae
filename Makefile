VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-slow test-integrations lint docs demo bench clean

install: $(STAMP)

# torch is installed first, pinned, so that resolving the package never pulls a CUDA build.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev]'
	touch $@

test: $(STAMP)
	$(PY) -m pytest

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

# darts, pytorch-forecasting and neuralforecast in their own environment, versions pinned
VENV_INT ?= .venv-integrations
PY_INT := $(VENV_INT)/bin/python
STAMP_INT := $(VENV_INT)/.installed

$(STAMP_INT): pyproject.toml requirements/integrations.txt
	rm -rf $(VENV_INT)
	python3 -m venv $(VENV_INT)
	$(PY_INT) -m pip install torch==2.13.0
	$(PY_INT) -m pip install -r requirements/integrations.txt -e .
	touch $@

test-integrations: $(STAMP_INT)
	$(PY_INT) -m pytest tests/integrations -m integrations -p no:cacheprovider

docs: $(STAMP)
	$(PY) -m pip install -r requirements/docs.txt
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

lint: $(STAMP)
	$(VENV)/bin/ruff check gradwatch tests examples benchmarks docs
	$(VENV)/bin/lint-imports

demo: $(STAMP)
	$(PY) examples/adding_problem.py

bench: $(STAMP)
	$(PY) benchmarks/replay_cost.py

clean:
	rm -rf $(VENV) $(VENV_INT) site .pytest_cache .ruff_cache .hypothesis build dist *.egg-info
	find . -path ./.git -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
