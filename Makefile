# Two commands do all set-up on a fresh machine with Python 3.10+ and pip:
#   make demo   creates .venv, installs, runs the main job on the embedded default, prints where results are
#   make test   creates .venv if needed, installs, runs the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-gpu stack-up stack-down clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel first: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0 || $(PY) -m pip install -q "torch>=2.6,<=2.14.1"
	$(PY) -m pip install -q -e ".[ray,kernels,test,video]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) workflows/distill.py

test: $(STAMP)
	# Two workers (pytest-xdist) with tests/conftest.py's scheduler and order (one worker runs the files that start
	# Ray or the services, one after another; files are never split; xdist would otherwise start the units with the
	# most tests first): one worker alone left ~25 % of 2 cores idle (Ray start-ups, polls, the one-thread tests).
	# The slowest tests listed: keep the suite under 25 min on 2 cores.
	$(PY) -m pytest -q -n 2 --dist loadscope --no-loadscope-reorder --durations=15

# A local copy of the real service stack (S3 server, PostgreSQL, MLflow server, Ray head) on loopback.
stack-up: $(STAMP)
	$(PY) cluster/local_stack.py up

stack-down:
	$(PY) cluster/local_stack.py down

# On the lent GPU machine (see docs/BENCHMARKS.md for the call that runs it).
test-gpu:
	python3 -m pytest -q -m gpu tests

clean:
	rm -rf $(VENV) runs .cache
