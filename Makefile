# sbtrain — the commands a new user runs. Everything installs into .venv from a clean clone.
VENV       ?= .venv
PY         := $(VENV)/bin/python
PYTHON     ?= python3
# The CPU build on this machine's disk; on a GPU box e.g. TORCH_SPEC="torch==2.13.0 --index-url ...".
TORCH_SPEC ?= torch==2.13.0
EXTRAS     ?= dev
# Keep freed memory for reuse instead of returning it to the OS: fresh >32 MB tensors otherwise
# cost ~12 ms of page faults each and halve CPU kernel speed (DESIGN.md §7).
CPU_ALLOC  := MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184
PYTEST_ARGS ?=

.PHONY: install test train bench-ops lint clean help

help:
	@echo "make install    create $(VENV) and install sbtrain with pinned dependencies"
	@echo "make test       run the whole test suite (CPU, gloo for multi-process tests)"
	@echo "make train      train the tiny hybrid model on the bundled corpus (CPU)"
	@echo "make bench-ops  operator benchmark: chunked GLA vs causal SDPA (CPU)"

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

test: install
	$(CPU_ALLOC) $(PY) -m pytest -q $(PYTEST_ARGS)

train: install
	@echo "make train arrives with the trainer (issue #3); see README 'Status'." && exit 1

bench-ops: install
	$(CPU_ALLOC) $(PY) benchmarks/ops.py

lint: install
	$(VENV)/bin/ruff check sbtrain parallel operators tests benchmarks

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
