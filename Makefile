# Developer loop. `make run` and `make test` are the two quick-start commands in README.md.
SHELL := /bin/bash
.PHONY: setup run test test-fast lint bench services docs screenshots

setup:
	./scripts/setup.sh

run: setup
	.venv/bin/assistant model prepare
	.venv/bin/assistant serve

# Installs and starts PostgreSQL (and chromium for the browser tests) when it can, then runs everything.
test: setup
	. ./scripts/services.sh && { .venv/bin/python -m pytest -q -ra -m "" -n 2 --dist loadfile --durations=15; rc=$$?; assistant_stop_services; exit $$rc; }

test-fast: setup
	.venv/bin/python -m pytest -q

# Regenerate the docs made from the code: the CLI reference (a test checks it is current).
docs: setup
	.venv/bin/python scripts/cli_reference.py

# The pictures in docs/: the browser tests write them into a temporary folder (chromium needed, see
# scripts/services.sh; the chat and feedback pictures use the real embedded model), then they are copied.
SHOTS ?= /tmp/assistant-screenshots
screenshots: setup
	rm -rf $(SHOTS) && mkdir -p $(SHOTS)
	ASSISTANT_SCREENSHOTS=$(SHOTS) .venv/bin/python -m pytest -q -m "" tests/test_browser.py \
		-k "screenshots_for_the_docs or fresh_install or browsers_language or documents_and_memory_pages"
	cp $(SHOTS)/*.png docs/

lint: setup
	.venv/bin/ruff check assistant memory training ui tests bench scripts

# Every benchmark, one after the other (about 1.5-2 h on 2 CPU cores; the GPU throughput run only where
# nvidia-smi sees a GPU). Each prints markdown tables for docs/benchmarks.md; JSON and plots go to
# BENCH_OUT (bench/loop.py also writes docs/loop.png). Stop on the first failure: a benchmark that fails
# its own checks (bench/load.py: an error or a lost row) exits non-zero.
BENCH_OUT ?= /tmp/assistant-bench
bench: setup
	mkdir -p $(BENCH_OUT)
	.venv/bin/python -m bench.chat_latency
	.venv/bin/python -m bench.retrieval quality
	.venv/bin/python -m bench.retrieval scale
	.venv/bin/python -m bench.training_data
	.venv/bin/python -m bench.cycle --docs-out $(BENCH_OUT) --json $(BENCH_OUT)/cycle.json
	.venv/bin/python -m bench.load --json $(BENCH_OUT)/load.json
	.venv/bin/python -m bench.loop --json $(BENCH_OUT)/loop.json
	if nvidia-smi -L >/dev/null 2>&1; then \
		.venv/bin/python -m bench.train_throughput gpu --out $(BENCH_OUT)/train; \
	else \
		.venv/bin/python -m bench.train_throughput cpu --out $(BENCH_OUT)/train; \
	fi
