"""The parts of the harness that need pytest: skipping (or failing) without libvirtd, and
fixture factories. Benchmarks never import this module."""

from __future__ import annotations

import os
import time

import pytest

from monitor.standin import GitHubStandIn


def require_libvirtd(reason: str, hint: str = "run `bash tests/libvirtd.sh` as root") -> None:
    """Skip a test that needs the real libvirtd, or fail it under MONITOR_REQUIRE_LIBVIRTD=1
    (CI), where a missing daemon is a broken set-up rather than a machine without one."""
    message = f"{reason}; {hint}"
    if os.environ.get("MONITOR_REQUIRE_LIBVIRTD") == "1":
        pytest.fail(message)
    pytest.skip(message)


def standin_fixtures(token: str):
    """A module-scoped GitHub stand-in (`server`) and a per-test view of it (`standin`) that
    starts from a clean state. Use as: `server, standin = standin_fixtures(TOKEN)`."""

    @pytest.fixture(scope="module")
    def server():
        standin = GitHubStandIn(token=token)
        standin.start()
        yield standin
        standin.stop()

    @pytest.fixture
    def standin(server: GitHubStandIn):
        server.reset()
        server.agent_online_after = None
        server.jit_permission = True
        server.busy_lag, server.clock = 0.0, time.monotonic
        yield server
        server.stop_job_simulation()
        server.clear_faults()

    return server, standin
