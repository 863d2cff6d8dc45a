"""The monitor over real HTTP against the GitHub stand-in, and libvirt's test driver through
the real binding. Each test gets a private test-driver node (a custom node file)."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest

from monitor import config as config_module
from monitor import loop
from monitor import models
from monitor import policy
from monitor.github import RestGitHub
from monitor.hypervisor.libvirt_hypervisor import LibvirtHypervisor
from monitor.scheduler import make_scheduler
from monitor.standin import GitHubStandIn
from tests.support.clock import Clock
from tests.support.configs import set_settings
from tests.support.configs import write_config
from tests.support.constants import NODE_XML
from tests.support.monitor_thread import settle
from tests.support.under_pytest import standin_fixtures

GITHUB_TOKEN = "test-gh-token"


server, standin = standin_fixtures(GITHUB_TOKEN)


@pytest.fixture
def rig(tmp_path: Path, standin: GitHubStandIn):
    node = tmp_path / "node.xml"
    node.write_text(NODE_XML)
    path = write_config(tmp_path, github_api_url=standin.base_url, libvirt_uri=f"test://{node}")
    config = config_module.load(path, environ={})
    models.open_store(config.data_path)
    github = RestGitHub(config.github_api_url, config.github_api_scope, config.github_token)
    hypervisor = LibvirtHypervisor(config.libvirt_uri, config.libvirt_storage_pool)
    clock = Clock()
    monitor = loop.Monitor(config, github, hypervisor, clock=clock)
    yield config, standin, hypervisor, clock, monitor
    monitor.workers.shutdown()
    hypervisor.close()
    models.close_store()


def step(monitor: loop.Monitor, clock: Clock) -> policy.Observation:
    monitor.registrations.refresh(force=True)
    observation = monitor.tick(clock())
    settle(monitor)
    return observation


def guests(hypervisor: LibvirtHypervisor) -> list[str]:
    return sorted(g.name for g in hypervisor.list_guests("ci-runner-"))


def registrations(standin: GitHubStandIn) -> dict[str, dict]:
    return {r["name"]: r for r in standin.runners()}


def test_pool_reaches_target_and_cycles(rig):
    config, standin, hypervisor, clock, monitor = rig

    # Within a few passes: exactly 3 guests and 3 JIT registrations, named as upstream does.
    for _ in range(3):
        step(monitor, clock)
    assert guests(hypervisor) == ["ci-runner-linux.0", "ci-runner-linux.1", "ci-runner-windows.2"]
    assert sorted(registrations(standin)) == [
        "ci-runner-linux.0@host",
        "ci-runner-linux.1@host",
        "ci-runner-windows.2@host",
    ]
    windows = registrations(standin)["ci-runner-windows.2@host"]
    assert {label["name"] for label in windows["labels"]} >= {
        "self-hosted",
        "X64",
        "self-hosted-image:windows",
    }
    assert all(g.active for g in hypervisor.list_guests("ci-runner-"))

    # The stand-in marks them online: they become Idle.
    for registration in standin.runners():
        standin.set_status(registration["id"], "online")
    observation = step(monitor, clock)
    assert {r.status.value for r in observation.runners} == {"Idle"}
    assert observation.changes.is_empty()

    # A job finishes (the ephemeral runner deregisters): its guest goes, a new id replaces it.
    standin.finish_job(registrations(standin)["ci-runner-linux.0@host"]["id"])
    step(monitor, clock)
    assert "ci-runner-linux.0" not in guests(hypervisor)
    step(monitor, clock)
    assert guests(hypervisor) == ["ci-runner-linux.1", "ci-runner-linux.3", "ci-runner-windows.2"]
    assert "ci-runner-linux.3@host" in registrations(standin)

    # A guest destroyed behind the monitor's back: its registration is deleted, then replaced.
    hypervisor.destroy_guest("ci-runner-windows.2")
    step(monitor, clock)
    assert "ci-runner-windows.2@host" not in registrations(standin)
    step(monitor, clock)
    assert guests(hypervisor) == ["ci-runner-linux.1", "ci-runner-linux.3", "ci-runner-windows.4"]

    # A runner stuck offline past monitor_start_timeout is replaced.
    for name in ("ci-runner-linux.1@host", "ci-runner-windows.4@host"):
        standin.set_status(registrations(standin)[name]["id"], "online")
    clock.advance(config.monitor_start_timeout.total_seconds() + 1)
    step(monitor, clock)
    step(monitor, clock)
    assert guests(hypervisor) == ["ci-runner-linux.1", "ci-runner-linux.5", "ci-runner-windows.4"]
    assert sorted(registrations(standin)) == [
        "ci-runner-linux.1@host",
        "ci-runner-linux.5@host",
        "ci-runner-windows.4@host",
    ]
    # Nothing leaked: every overlay volume belongs to a live guest.
    assert hypervisor.volume_names() == sorted(f"{g}.qcow2" for g in guests(hypervisor))


def test_github_faults_do_not_stop_the_monitor(rig):
    config, standin, hypervisor, clock, monitor = rig
    standin.inject_fault(500, count=3, path_contains="/actions/runners")
    for _ in range(3):
        step(monitor, clock)
        clock.advance(15)  # past the back-off
    assert monitor.registrations.error is None or "500" in monitor.registrations.error
    standin.inject_fault(429, count=2, retry_after=1, path_contains="/actions/runners")
    for _ in range(4):
        step(monitor, clock)
        clock.advance(15)
    for _ in range(3):
        step(monitor, clock)
    assert monitor.registrations.error is None
    assert guests(hypervisor) == ["ci-runner-linux.0", "ci-runner-linux.1", "ci-runner-windows.2"]
    assert len(registrations(standin)) == 3
    # Registrations that failed half-way were cleaned up: nothing leaked on either side.
    assert hypervisor.volume_names() == sorted(f"{g}.qcow2" for g in guests(hypervisor))
    kinds = {e.kind for e in models.recent_events(200)}
    assert "github-error" in kinds


def test_threads_and_scheduler_bring_the_pool_online(rig):
    config, standin, hypervisor, clock, monitor = rig
    monitor.clock = loop.utcnow  # real time for the real threads
    standin.agent_online_after = 0.2
    scheduler = make_scheduler(monitor)
    monitor.start()
    scheduler.start()
    try:
        deadline = time.monotonic() + 30
        idle = 0
        while time.monotonic() < deadline:
            monitor.registrations.cache.invalidate()  # don't wait api_cache_timeout (30 s) here
            observation = monitor.observation
            if observation is not None:
                idle = sum(r.status.value == "Idle" for r in observation.runners)
                if idle == 3:
                    break
            time.sleep(0.2)
        assert idle == 3, monitor.observation
        assert len(guests(hypervisor)) == 3
    finally:
        scheduler.shutdown(wait=False)
        monitor.stop()


def test_libvirt_faults_do_not_stop_the_monitor_and_leak_nothing(rig):
    config, standin, hypervisor, clock, monitor = rig
    # Take the storage pool away: creating runners is impossible.
    conn = hypervisor._connection()
    pool = conn.storagePoolLookupByName(config.libvirt_storage_pool)
    pool.destroy()
    for _ in range(10):
        step(monitor, clock)
        clock.advance(1)
    assert guests(hypervisor) == []
    # Found before any create: nothing registered, no runner id spent, said once a profile.
    assert standin.jit_names == []
    assert models.last_runner_id() is None
    failures = [e for e in models.recent_events(100) if e.kind == "profile-failed"]
    assert sorted(e.profile for e in failures) == ["linux", "windows"]
    assert "storage pool default-pool: defined (target /default-pool) but not running" in (
        failures[0].message
    )
    assert "virsh pool-start default-pool" in failures[0].message
    assert set(monitor.workers.blocked) == {"linux", "windows"}
    # The pool comes back: the monitor recovers by itself, with fresh ids.
    pool.create()
    clock.advance(60)  # the next look at an impossible profile
    step(monitor, clock)
    step(monitor, clock)
    names = guests(hypervisor)
    assert len(names) == 3
    assert sorted(r["name"] for r in standin.runners()) == sorted(f"{n}@host" for n in names)
    assert hypervisor.volume_names() == sorted(f"{n}.qcow2" for n in names)
    assert monitor.workers.blocked == {}
    assert [e.kind for e in models.recent_events(100)].count("profile-ok") == 2


def test_a_job_whose_busy_flag_lags_past_the_reserve_timeout_runs_to_its_end(
    tmp_path: Path, standin: GitHubStandIn
):
    """GitHub reports the job's runner busy only 45 s after the job started; the reserve
    timeout is 30 s. The runner must neither be destroyed for its timeout while the flag
    still reads false, nor once it turned true."""
    node = tmp_path / "node.xml"
    node.write_text(NODE_XML)
    path = write_config(
        tmp_path,
        github_api_url=standin.base_url,
        libvirt_uri=f"test://{node}",
        targets={"linux": 1},
    )
    set_settings(path, {"monitor_reserve_timeout": "30"})
    config = config_module.load(path, environ={})
    models.open_store(config.data_path)
    github = RestGitHub(config.github_api_url, config.github_api_scope, config.github_token)
    hypervisor = LibvirtHypervisor(config.libvirt_uri, config.libvirt_storage_pool)
    clock = Clock()
    standin.clock = lambda: clock().timestamp()
    standin.busy_lag = 45
    monitor = loop.Monitor(config, github, hypervisor, clock=clock)
    try:
        step(monitor, clock)
        assert guests(hypervisor) == ["ci-runner-linux.0"]
        jit_config = models.get_runner(0).jit_config
        standin.agent_online(jit_config)
        assert [r.status.value for r in step(monitor, clock).runners] == ["Idle"]

        # A workflow job takes the runner, as `take` does, and the agent starts it at once.
        registration_id = models.get_runner(0).registration_id
        labels = policy.reservation_labels(
            "5f0c6b1e-8d3a-4c2b-9e7f-1a2b3c4d5e6f", "test/servo", "77", clock()
        )
        github.add_labels(registration_id, labels)
        assert standin.agent_job(jit_config) is not None
        started = clock()

        seen = []
        while clock() - started < timedelta(seconds=120):
            clock.advance(5)
            observation = step(monitor, clock)
            seen.append(observation.runners[0].status.value)
            assert guests(hypervisor) == ["ci-runner-linux.0"], f"after {clock() - started}"
        # Reserved while the flag lagged (past the 30 s timeout), Busy from 45 s on.
        assert seen == ["Reserved"] * 8 + ["Busy"] * 16, seen

        standin.agent_finish(jit_config)  # the job ran to its end on its runner
        step(monitor, clock)
        step(monitor, clock)
        assert guests(hypervisor) == ["ci-runner-linux.1"]
        kinds = [e.kind for e in models.recent_events(200) if e.runner_id == 0]
        assert "destroy-failed" not in kinds
    finally:
        monitor.workers.shutdown()
        hypervisor.close()
        models.close_store()
