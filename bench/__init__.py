"""Benchmarks. Each runs as a module from the repository root, e.g. `python -m bench.loop`."""
