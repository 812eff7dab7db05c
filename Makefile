# Two commands do all set-up: `make app` and `make test` (each creates or reuses .venv).
# Both install requirements.lock, the tested set pinned with hashes (pip --require-hashes: a
# release whose file differs from the one tested is refused); `make test` adds the development
# tools of requirements-dev.txt, held to the lock's versions wherever they share a package.
# requirements.txt keeps the ranges, for those who use the package as a library.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# No wheel cache: where torch comes from PyPI (a CUDA build, several GB with its libraries) a cached
# copy would double what the install needs on disk; a CI run once ran out of space doing so.
PIP_FLAGS ?= --disable-pip-version-check --no-cache-dir -q

.PHONY: app test
$(VENV)/.runtime: requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) --require-hashes -r requirements.lock
	touch $@

# The lock's pins without hashes, as constraints: pip's hash checking would otherwise demand
# hashes for the development tools too.
$(VENV)/lock-constraints.txt: requirements.lock
	sed -n 's/^\([A-Za-z0-9_.-]*==[^ ;]*\).*/\1/p' requirements.lock >$@

$(VENV)/.dev: $(VENV)/.runtime $(VENV)/lock-constraints.txt requirements-dev.txt
	$(PY) -m pip install $(PIP_FLAGS) -r requirements-dev.txt -c $(VENV)/lock-constraints.txt
	touch $@

app: $(VENV)/.runtime
	$(PY) -m streamlit run app.py

test: $(VENV)/.dev
	$(PY) -m pytest $(PYTEST_ARGS)
