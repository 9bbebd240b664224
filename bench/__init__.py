"""Benchmarks: each prints a table; numbers live here, never in timed tests."""
