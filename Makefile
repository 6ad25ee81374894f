# sbtrain — the commands a new user runs. Everything installs into .venv from a clean clone.
VENV       ?= .venv
PY         := $(VENV)/bin/python
PYTHON     ?= python3
# The CPU build on this machine's disk; on a GPU box e.g. TORCH_SPEC="torch==2.13.0 --index-url ...".
TORCH_SPEC ?= torch==2.13.0
EXTRAS     ?= dev
# Keep freed memory for reuse instead of returning it to the OS: fresh >32 MB tensors otherwise
# cost ~12 ms of page faults each and halve CPU kernel speed (docs/DESIGN_NOTES.md §7).
CPU_ALLOC  := MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184
PYTEST_ARGS ?=

.PHONY: install test train sft bench-ops bench-train bench-cp bench-convert bench-spike-cpt bench-w8aspike bench-ttft bench-memory bench-decode lint clean help

help:
	@echo "make install    create $(VENV) and install sbtrain with pinned dependencies"
	@echo "make test       run the whole test suite (CPU, gloo for multi-process tests)"
	@echo "make train      train the tiny hybrid model on the bundled corpus (CPU)"
	@echo "make sft        SFT of the newest make-train run on generated conversations (docs/SFT.md)"
	@echo "make bench-ops  operator benchmark: chunked GLA vs causal SDPA (CPU)"
	@echo "make bench-train training tokens/s: every dense *_tiny recipe (sb7b_tiny, ...), qwen2_tiny, HF Qwen2 (CPU)"
	@echo "make bench-cp   context parallel CP=1 vs CP=2: traffic, peak memory, step time (CPU, gloo)"
	@echo "make bench-convert  teacher -> converted sb7b/sb76b vs from scratch (about an hour on 2 cores)"
	@echo "make bench-spike-cpt spike-aware continual pretraining vs spiking post hoc (sb7b_tiny)"
	@echo "make bench-w8aspike int8 weights + spikes: validation-loss change vs unquantized (bench-convert's runs)"
	@echo "make bench-ttft   prefill time sb7b_tiny vs qwen2_tiny, 4k..128k (long: hours on 2 cores)"
	@echo "make bench-memory training peak memory and decode-cache bytes vs length"
	@echo "make bench-decode decode tokens/s and resident memory vs context length"

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

test: install
	$(CPU_ALLOC) $(PY) -m pytest -q $(PYTEST_ARGS)

# make train: bundled corpus (the Python standard library's source) -> BPE 8192 -> sb7b_tiny.
STDLIB     := data/stdlib
TRAIN_ARGS ?=

$(STDLIB)/corpus.jsonl: | install
	$(PY) -m sbtrain.data.stdlib_corpus --out $@

$(STDLIB)/tokenized/manifest.json: $(STDLIB)/corpus.jsonl
	$(PY) -m sbtrain.cli.data data.paths=[$(STDLIB)/corpus.jsonl] data.output=$(STDLIB)/tokenized \
		data.overwrite=true data.num_proc=2 tokenizer=train_bpe tokenizer.vocab_size=8192

train: install $(STDLIB)/tokenized/manifest.json
	$(CPU_ALLOC) $(PY) -m sbtrain.train experiment=tiny_cpu $(TRAIN_ARGS)

# make sft: generated conversations (sbtrain/data/chat_corpus.py) -> chat dataset with the make-train
# tokenizer -> SFT of the newest runs/tiny_cpu-* (or SFT_FROM=DIR) with the loss on the assistant turns.
CHAT       := data/chat
SFT_FROM   ?= $(lastword $(sort $(wildcard runs/tiny_cpu-*)))
SFT_ARGS   ?=

$(CHAT)/conversations.jsonl: | install
	$(PY) -m sbtrain.data.chat_corpus --out $@

$(CHAT)/tokenized/manifest.json: $(CHAT)/conversations.jsonl $(STDLIB)/tokenized/manifest.json
	$(PY) -m sbtrain.cli.data data.records=chat data.chat.template=chatml data.paths=[$(CHAT)/conversations.jsonl] \
		tokenizer.path=$(STDLIB)/tokenized/tokenizer data.output=$(CHAT)/tokenized data.overwrite=true

sft: install $(CHAT)/tokenized/manifest.json
	@test -n "$(SFT_FROM)" || { echo "no runs/tiny_cpu-* to start from: run make train first (or SFT_FROM=DIR)"; exit 2; }
	$(CPU_ALLOC) $(PY) -m sbtrain.train experiment=tiny_sft trainer.init_from=$(SFT_FROM) $(SFT_ARGS)

bench-ops: install
	$(CPU_ALLOC) $(PY) benchmarks/ops.py

bench-train: install
	$(CPU_ALLOC) $(PY) benchmarks/train_throughput.py

# e.g. BENCH_CP_ARGS="--lengths 2048,4096" for a quick run, "--models sb7b_tiny,sb76b_tiny" for Ulysses.
BENCH_CP_ARGS ?=

bench-cp: install
	$(CPU_ALLOC) $(PY) benchmarks/cp_scaling.py $(BENCH_CP_ARGS)

# e.g. BENCH_CONVERT_ARGS="--tokens 300000 --skip-76b" for a quicker run.
BENCH_CONVERT_ARGS ?=

bench-convert: install $(STDLIB)/tokenized/manifest.json
	$(CPU_ALLOC) $(PY) benchmarks/conversion_mini.py $(BENCH_CONVERT_ARGS)

bench-spike-cpt: install $(STDLIB)/tokenized/manifest.json
	$(CPU_ALLOC) $(PY) benchmarks/spike_cpt.py

bench-w8aspike: install
	$(CPU_ALLOC) $(PY) benchmarks/w8aspike.py

# Hydra overrides, e.g. BENCH_TTFT_ARGS="lengths=[4k,16k] repeats=1"
BENCH_TTFT_ARGS ?=
BENCH_MEMORY_ARGS ?=
BENCH_DECODE_ARGS ?=

bench-ttft: install
	$(CPU_ALLOC) $(PY) benchmarks/ttft.py $(BENCH_TTFT_ARGS)

# Peak RSS should track live tensors here: large blocks are mmapped and returned when freed
# (CPU_ALLOC's keep-everything heap would report its high-water mark, ~3x the live memory at 16k).
bench-memory: install
	MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=131072 $(PY) benchmarks/memory.py $(BENCH_MEMORY_ARGS)

bench-decode: install
	$(CPU_ALLOC) $(PY) benchmarks/decode.py $(BENCH_DECODE_ARGS)

lint: install
	$(VENV)/bin/ruff check sbtrain parallel operators tests benchmarks

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
