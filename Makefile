# The two commands of the README (`make demo`, `make test`) install what they need first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FRAMEWORK ?= pytorch
# The extras `make install` installs; EXTRAS=cuda,dev for the frameworks' GPU builds.
EXTRAS ?= all,dev
PYTEST := $(PY) -m pytest -p no:cacheprovider

.PHONY: install demo test test-slow parity parity-slow bench profile reproduce clean

install: $(STAMP)

# Re-runs only when pyproject.toml changes; a second `make install` does nothing.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $(STAMP)

demo: install
	$(PY) -m bit_common.demo --framework $(FRAMEWORK)

# Two workers, each taking whole test files (their module fixtures compile once): much of the
# suite is compiling and tracing, which runs on one core (2-core host: 26 -> 18 min).
TEST_WORKERS ?= 2

test: install
	$(PYTEST) -m "not slow" -q -n $(TEST_WORKERS) --dist loadfile

test-slow: install
	$(PYTEST) -m slow -q

# The same two workers: the CLI runs in one, the models and pipelines in the other.
# `parity` is every framework against the others in minutes; `parity-slow` adds the longer
# comparisons (10 steps with a resume, larger inputs, R101x1 and R50x3, all nine round trips).
parity: install
	$(PYTEST) parity_tests -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile

parity-slow: install
	$(PYTEST) parity_tests -q -n $(TEST_WORKERS) --dist loadfile

bench: install
	$(PY) -m benchmarks.bench

# Where a training step's time goes, by kernel (oneDNN verbose / XLA thunk trace), per framework.
profile: install
	$(PY) -m benchmarks.profile

reproduce: install
	$(PY) -m bit_common.reproduce $(if $(RUN),--run,)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
