# The two commands of the README: `make run` (one round of the RLHF loop on the built-in
# scenario) and `make test` (the suite). Each creates .venv and installs everything the first time.
VENV   := .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
ARGS   ?=

.PHONY: run test bench clean-run

$(STAMP): pyproject.toml constraints.txt
	test -x $(PYTHON) || python3 -m venv $(VENV)
	@# the browser test drives Debian's Chromium; installed here when we are root on Debian/Ubuntu
	@command -v chromium >/dev/null || ! command -v apt-get >/dev/null || [ "$$(id -u)" != 0 ] || \
	  apt-get install -y -qq chromium >/dev/null 2>&1 || \
	  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null 2>&1) || \
	  echo "chromium could not be installed: the browser test will be skipped"
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/rlhf run $(ARGS)
	$(VENV)/bin/rlhf status

# One worker per core (four at most), whole files to a worker, the longest first (tests/conftest.py);
# the 15 slowest tests listed at the end, where the suite's time goes.
test: $(STAMP)
	$(PYTHON) -m pytest -q -ra -n logical --maxprocesses 4 --dist loadfile --no-loadscope-reorder --durations=15

bench: $(STAMP)
	$(PYTHON) bench/ppo_throughput.py --shape tiny --device cpu

# Forget this folder's runs: models, data versions, MLflow runs (the git history of rounds stays).
clean-run:
	rm -rf models data/collected data/validated reports mlruns mlflow.db .cache .dvcstore
