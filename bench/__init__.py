"""Benchmarks over the test harness (tests.support); run each as `python -m bench.<name>` from
the repository root (docs/benchmarks.md)."""
