"""Benchmark harnesses behind ``scripts/bench_*.py`` (timing, peak memory, tables, JSON)."""
