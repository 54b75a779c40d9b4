# Every target sets itself up: a fresh machine needs only python3 (>= 3.11).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint venv clean bench fuzz

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/join-gateway demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

# The product's unit and security tables: in-process fakes and loopback servers of our
# own, no server binary to start (under a minute). Left out: tests marked external
# (they start redis-server ...) and the development package's own tests (the emulator's:
# a minute by themselves). `make test` still runs everything.
FAST_SKIP := --ignore=tests/unit/test_emulator.py --ignore=tests/unit/test_emulator_cli.py
test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests/unit tests/security $(FAST_SKIP) \
		-m "not integration and not external"

lint: $(STAMP)
	$(VENV)/bin/ruff check gateway tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# The long fuzz run (make test runs each target for a few thousand inputs only).
# FUZZ_SECONDS per target; crashes land in fuzz-artifacts/, the grown corpus in fuzz-corpus/.
FUZZ_SECONDS ?= 300
fuzz: $(STAMP)
	@for t in cms certificate token der; do \
		mkdir -p fuzz-corpus/$$t fuzz-artifacts; \
		$(PY) -c "import sys; from pathlib import Path; from tests.fuzz.targets import write_seeds; write_seeds(sys.argv[1], Path(sys.argv[2]))" $$t fuzz-corpus/$$t; \
		$(PY) -m tests.fuzz.targets $$t -max_total_time=$(FUZZ_SECONDS) -max_len=8192 \
			-artifact_prefix=fuzz-artifacts/$$t- fuzz-corpus/$$t || exit 1; \
	done

bench: $(STAMP)
	$(PY) benchmarks/join_storm.py --vms 2000 --out benchmarks/results/storm

clean:
	rm -rf $(VENV) demo-data .pytest_cache .mypy_cache .ruff_cache fuzz-corpus fuzz-artifacts
