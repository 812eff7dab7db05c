# Two commands do all set-up: `make app` and `make test` (each creates or reuses .venv).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# No wheel cache: where torch comes from PyPI (a CUDA build, several GB with its libraries) a cached
# copy would double what the install needs on disk; a CI run once ran out of space doing so.
PIP_FLAGS ?= --disable-pip-version-check --no-cache-dir -q

.PHONY: app test
$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install $(PIP_FLAGS) -r requirements-dev.txt
	touch $@

app: $(VENV)/.runtime
	$(PY) -m streamlit run app.py

test: $(VENV)/.dev
	$(PY) -m pytest $(PYTEST_ARGS)
