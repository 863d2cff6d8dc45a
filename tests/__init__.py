"""The test suite; its shared harness is `tests.support` (benchmarks use it too)."""
