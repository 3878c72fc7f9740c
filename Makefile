# Two entry points: `make demo` and `make test`.
# Each creates .venv if it is missing and installs what it needs into it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.pfc_jax-installed

.PHONY: demo test bench-head clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test,bench,tpu]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m pfc_jax.demo

# shellcheck lints launch/ in the tests; installed from Debian's packages when possible.
test: $(STAMP)
	@command -v shellcheck >/dev/null 2>&1 || apt-get install -y -qq shellcheck >/dev/null 2>&1 \
	  || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq shellcheck >/dev/null 2>&1) \
	  || echo "note: shellcheck could not be installed; its test will be skipped"
	$(PY) -m pytest -q --durations=15 tests

bench-head: $(STAMP)
	$(PY) bench/head.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
