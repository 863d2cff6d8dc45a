"""The benchmarks keep working (a small, fast run of each; their speed targets are judged by
running them in full, see docs/benchmarks.md, never by a timed assertion here)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import postgres

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = sorted(path.stem for path in (ROOT / "bench").glob("*.py") if path.stem != "__init__")
# Run in a child whose imports of pytest fail, as on a machine without it.
WITHOUT_PYTEST = """
import runpy, sys
sys.modules["pytest"] = None
sys.modules["_pytest"] = None
sys.argv = [sys.argv[1], "--help"]
runpy.run_module(sys.argv[0], run_name="__main__" if sys.argv[0] != "bench.rig" else "bench.rig")
"""


def run(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", f"bench.{script.removesuffix('.py')}", *args],
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


def test_scale_benchmark_runs_and_reports_every_part(tmp_path):
    """`bench/scale.py --quick` (10 and 50 runners, a 20 s API window: about 40 s). The
    per-runner CPU is checked against 10 × the issue's 1 ms, and the change's delay against
    the loosest bound the cache allows: timings in CI are noisy, the full run judges them."""
    results_path = tmp_path / "scale.json"
    output = run("scale.py", "--quick", "--json", str(results_path))
    for heading in ("Reconcile passes", "Resident memory", "Screenshot passes", "GitHub API"):
        assert heading in output
    results = json.loads(results_path.read_text())
    assert results["mode"] == "quick"
    assert [entry["size"] for entry in results["sizes"]] == [10, 50]
    for entry in results["sizes"]:
        assert entry["passes"]["passes"] == 10
        assert entry["passes"]["cpu_median"] / entry["size"] <= 10 * 0.001
        assert entry["memory"]["VmRSS"] > entry["rss_before"] > 0
        assert entry["screenshots_steady"]["cpu"] >= 0
    assert set(results["derived"]["sizes"]) == {"10", "50"}
    assert results["derived"]["sizes"]["50"]["previous_size"] == 10
    api = next(entry["api"] for entry in results["sizes"] if "api" in entry)
    # Steady runners: the one list fetch (forced in quick mode) is answered 304, uncounted.
    assert api["steady"]["counted"] == 0
    assert api["steady"]["list_fetches"] >= 1
    assert api["steady"]["not_modified"] == api["steady"]["list_fetches"]
    # The runner going busy is seen, with one counted fetch (the list changed).
    assert api["change"]["delays"]["busy"] <= 2 * 35
    assert api["change"]["counted"] >= 1
    shots = next(entry["screenshots"] for entry in results["sizes"] if "screenshots" in entry)
    assert shots["first"]["encoded"] == [10] and shots["second"]["unchanged"] == [10]
    assert results["driver"]["size"] == 50


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_runs_without_pytest(name):
    """Each benchmark imports (its `--help` runs) with pytest not importable: the harness parts
    they use (tests.support) need no pytest, and no benchmark imports a test module."""
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_PYTEST, f"bench.{name}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert name == "rig" or "usage:" in result.stdout


def test_queue_benchmark_runs_and_checks_every_client(tmp_path):
    """`bench/queue.py` small: a three-member fleet, 3 runners freed one at a time with one
    client waiting, 20 pollers for 2 s (PostgreSQL too when it answers; CI starts it)."""
    if shutil.which("curl") is None or shutil.which("jq") is None:
        pytest.skip("runner-select.sh needs curl and jq (CI installs them)")
    results_path = tmp_path / "queue.json"
    output = run(
        "queue.py",
        *("--samples", "3", "--waiting", "1", "--pollers", "20"),
        *("--duration", "2", "--warmup", "1", "--json", str(results_path)),
    )
    assert "PASS: every client got the runner seen Idle, in enqueue order, none fell back" in output
    assert "FIFO inversions: 0" in output
    results = json.loads(results_path.read_text())
    assert len(results["availability"]["samples"]) == 3
    assert all(sample["seconds"] > 0 for sample in results["availability"]["samples"])
    stores = [answers["store"] for answers in results["answers"]]
    assert stores[0].startswith("SQLite")
    if postgres.unavailable() is None:
        assert stores[1:] and stores[1].startswith("PostgreSQL")
    for answers in results["answers"]:
        assert answers["unexpected"] == {} and answers["polls"] >= 20
    assert output.count("PASS: every answer 503, empty, Retry-After: 1") == len(stores)


def test_tokenless_benchmark_runs():
    output = run("tokenless.py", "--repos", "20", "--budget", "10", "--junk", "200")
    assert "GitHub calls at the stand-in: 9 (budget 10)" in output
    assert "PASS" in output


def test_preflight_benchmark_runs():
    output = run("preflight.py", "--runs", "3")
    assert "test:///default: creation_blocker median" in output
