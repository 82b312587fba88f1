"""Benchmarks for statskit, run on demand: `python -m bench --help`."""
