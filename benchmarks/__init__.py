"""Benchmarks: one bench_<op>.py per kernel, sharing the harness in common.py."""
