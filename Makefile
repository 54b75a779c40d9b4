# Every target sets itself up: a fresh machine needs only python3 (>= 3.11).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint venv clean bench fuzz

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

lint: $(STAMP)
	$(VENV)/bin/ruff check gateway tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# The long fuzz run (make test runs each target for a few thousand inputs only).
# FUZZ_SECONDS per target; crashes land in fuzz-artifacts/, the grown corpus in fuzz-corpus/.
FUZZ_SECONDS ?= 300
fuzz: $(STAMP)
	@for t in cms certificate token; do \
		mkdir -p fuzz-corpus/$$t fuzz-artifacts; \
		$(PY) -c "import sys; from pathlib import Path; from tests.fuzz.targets import write_seeds; write_seeds(sys.argv[1], Path(sys.argv[2]))" $$t fuzz-corpus/$$t; \
		$(PY) -m tests.fuzz.targets $$t -max_total_time=$(FUZZ_SECONDS) -max_len=8192 \
			-artifact_prefix=fuzz-artifacts/$$t- fuzz-corpus/$$t || exit 1; \
	done

bench: $(STAMP)
	$(PY) benchmarks/join_storm.py --vms 2000 --out benchmarks/results/storm

clean:
	rm -rf $(VENV) demo-data .pytest_cache .mypy_cache .ruff_cache fuzz-corpus fuzz-artifacts
