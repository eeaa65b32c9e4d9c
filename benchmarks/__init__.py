"""Benchmarks of the search: `python -m benchmarks` (see README, Performance)."""
