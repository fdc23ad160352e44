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

# Two pytest-xdist workers, a file each at a time (module fixtures stay in one process), one torch thread each:
# the suite keeps 2 cores under one core busy when run serially, and two workers with two torch threads each
# spend twice the CPU on contention. conftest.py hands out the longest files first.
test: $(VENV)/.installed-$(EXTRAS)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile --durations=15

bench: $(VENV)/.installed-$(EXTRAS)
	$(PY) benchmarks/catalog.py

clean:
	rm -rf $(VENV) $(DEMO_ROOT)
