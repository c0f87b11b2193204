# Developer loop. `make run` and `make test` are the two quick-start commands in README.md.
SHELL := /bin/bash
.PHONY: setup run test test-fast lint bench services

setup:
	./scripts/setup.sh

run: setup
	.venv/bin/assistant model prepare
	.venv/bin/assistant serve

# Installs and starts PostgreSQL (and chromium for the browser tests) when it can, then runs everything.
test: setup
	. ./scripts/services.sh && .venv/bin/python -m pytest -q -ra

test-fast: setup
	.venv/bin/python -m pytest -q -m "not slow and not browser"

lint: setup
	.venv/bin/ruff check assistant memory training ui tests bench

bench: setup
	.venv/bin/python bench/chat_latency.py
