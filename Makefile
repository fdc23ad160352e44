# Two commands do all set-up: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv from pyproject.toml + constraints.txt on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= data,ml,flow,dev
DEMO_ROOT ?= data/demo

.PHONY: demo test bench clean

$(VENV)/.installed-$(EXTRAS): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

demo: $(VENV)/.installed-$(EXTRAS)
	$(VENV)/bin/flux3d demo --root $(DEMO_ROOT)

test: $(VENV)/.installed-$(EXTRAS)
	$(PY) -m pytest -q --durations=15

bench: $(VENV)/.installed-$(EXTRAS)
	$(PY) benchmarks/catalog.py

clean:
	rm -rf $(VENV) $(DEMO_ROOT)
