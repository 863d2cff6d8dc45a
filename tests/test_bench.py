"""The benchmarks keep working (a small, fast run of each; their speed targets are judged by
running them in full, see docs/benchmarks.md, never by a timed assertion here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, f"bench/{script}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode in (0, 1), result.stderr  # 1 = a speed target missed
    return result.stdout


def test_take_latency_benchmark_runs_and_checks_exactly_once():
    output = run("take_latency.py", "--runners", "6", "--clients", "3", "--takes", "6")
    assert "PASS: every take got its own runner" in output
    assert "runners: 6 taken, 6 distinct" in output
    assert "p50:" in output and "p99:" in output


def test_dashboard_benchmark_runs():
    output = run(
        "dashboard_rps.py",
        "--runners",
        "5",
        "--duration",
        "0.3",
        "--warmup",
        "0.1",
        "--rounds",
        "1",
    )
    assert "ratio:" in output
    assert ", 0 errors" in output


def test_screenshot_pass_benchmark_runs():
    output = run("screenshot_pass.py", "--guests", "2", "--rounds", "1")
    assert "PASS: first passes encoded every guest" in output
    assert "| test driver PNG, first (all changed)   |   2   0   0 |" in output
    assert "| QEMU-like PPM, second (unchanged)      |   0   2   0 |" in output
