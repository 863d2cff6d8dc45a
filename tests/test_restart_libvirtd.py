"""Restart on the same data directory against a REAL libvirtd (qemu:///system, TCG guests):
the test driver forgets its guests with the process, a real daemon does not.

Needs `bash tests/libvirtd.sh` (CI runs it). Guests need not boot for this.
"""

from __future__ import annotations

import pytest

from monitor import models
from tests.support.clock import Clock
from tests.support.libvirtd import POOL
from tests.support.libvirtd import URI
from tests.support.monitor_thread import settle
from tests.support.served import monitor_for

libvirt = pytest.importorskip("libvirt")
from monitor.hypervisor.libvirt_hypervisor import LibvirtHypervisor  # noqa: E402

pytestmark = pytest.mark.libvirtd


def start_monitor(config, clock):
    _, hypervisor, monitor = monitor_for(config, clock)
    return monitor, hypervisor


def stop_monitor(monitor, hypervisor):
    monitor.stop()
    hypervisor.close()
    models.close_store()


def step(monitor, clock):
    monitor.registrations.refresh(force=True)
    observation = monitor.tick(clock())
    settle(monitor, timeout=60)
    return observation


def test_restart_keeps_runners_ids_and_override(real):
    config, standin, prefix = real
    clock = Clock()
    monitor, hypervisor = start_monitor(config, clock)
    try:
        for _ in range(2):
            step(monitor, clock)
        first = sorted(g.name for g in hypervisor.list_guests(prefix + "-"))
        assert first == [f"{prefix}-linux.0", f"{prefix}-linux.1", f"{prefix}-windows.2"]
        assert all(g.active for g in hypervisor.list_guests(prefix + "-"))
        override = monitor.set_override({"linux": 3})
        step(monitor, clock)
        assert len(hypervisor.list_guests(prefix + "-")) == 4
    finally:
        stop_monitor(monitor, hypervisor)

    # A new process's worth of monitor on the same data dir and the same libvirtd.
    monitor, hypervisor = start_monitor(config, clock)
    try:
        # The override survived (its bookkeeping may have added entries since it was set).
        assert monitor.override is not None
        assert monitor.override.profile_override_counts == override.profile_override_counts
        assert monitor.override.profile_target_counts == override.profile_target_counts
        for _ in range(2):
            step(monitor, clock)
        after = sorted(g.name for g in hypervisor.list_guests(prefix + "-"))
        assert after == sorted(first + [f"{prefix}-linux.3"])  # nothing new, nothing lost
        assert len(standin.runners()) == 4  # no duplicate registrations
        # Ids continue after the restart: a finished job is replaced by id 4.
        finished = next(r for r in standin.runners() if r["name"].startswith(f"{prefix}-linux.0@"))
        standin.finish_job(finished["id"])
        step(monitor, clock)
        step(monitor, clock)
        names = sorted(g.name for g in hypervisor.list_guests(prefix + "-"))
        assert f"{prefix}-linux.0" not in names
        assert f"{prefix}-linux.4" in names
        assert len(names) == 4
    finally:
        stop_monitor(monitor, hypervisor)


def test_restarted_daemon_process_adopts_its_runners(real, tmp_path):
    """The same, as a sysadmin would see it: `monitor run`, SIGTERM, `monitor run` again."""
    import time

    from tests.support.daemons import Daemon
    from tests.support.daemons import free_port
    from tests.support.daemons import wait_for_json

    config, standin, prefix = real
    port = free_port()
    # listen_port must come before the config's tables; look at GitHub every 2 s, not 30 s
    text = config.path.read_text().replace("api_cache_timeout = 30", "api_cache_timeout = 2")
    config.path.write_text(f"listen_port = {port}\n" + text)
    health = f"http://127.0.0.1:{port}/healthz"
    hypervisor = LibvirtHypervisor(URI, POOL)

    def ours() -> list[str]:
        return sorted(g.name for g in hypervisor.list_guests(prefix + "-"))

    try:
        with Daemon("run", "--config", str(config.path), cwd=tmp_path) as daemon:
            deadline = time.monotonic() + 60
            wait_for_json(health, deadline)
            while time.monotonic() < deadline and len(ours()) < 3:
                time.sleep(0.2)
            code, output = daemon.terminate()
        assert code == 0, output
        first = ours()
        assert first == [f"{prefix}-linux.0", f"{prefix}-linux.1", f"{prefix}-windows.2"]

        with Daemon("run", "--config", str(config.path), cwd=tmp_path) as daemon:
            deadline = time.monotonic() + 60
            wait_for_json(health, deadline)
            time.sleep(3)  # a few passes: nothing may be duplicated
            assert ours() == first
            assert len(standin.jit_names) == 3
            finished = next(r for r in standin.runners() if r["name"].startswith(first[0] + "@"))
            standin.finish_job(finished["id"])
            while time.monotonic() < deadline and f"{prefix}-linux.3" not in ours():
                time.sleep(0.2)
            code, output = daemon.terminate()
        assert code == 0, output
        assert ours() == [f"{prefix}-linux.1", f"{prefix}-linux.3", f"{prefix}-windows.2"]
    finally:
        hypervisor.close()
