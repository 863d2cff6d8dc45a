"""Image rebuilds through the monitor (monitor/rebuilds.py, driven by loop.Monitor.tick): the
decisions and their bookkeeping with hand-written fakes for GitHub and libvirt. The adapter's
side is in test_hypervisor.py (test driver) and, with a guest that really boots and powers
off, in test_e2e_vms.py."""

from __future__ import annotations

import os
import time
from datetime import timedelta

import pytest

from monitor import loop
from monitor import models
from monitor import rebuilds
from monitor.errors import MonitorError
from tests.fakes import FakeGitHub
from tests.fakes import FakeHypervisor
from tests.support.clock import Clock
from tests.support.configs import rebuilt_profile
from tests.support.constants import TEST_GUEST_XML
from tests.support.monitor_thread import settle

BOOT_SCRIPT = "#!/bin/sh\necho building\npoweroff -f\n"


def built_profile(mode: str, target: int = 2, timeout: int = 60) -> str:
    return rebuilt_profile(mode=mode, target=target, timeout=timeout, disk_size="2G")


@pytest.fixture
def make_env(make_config, store, tmp_path, monkeypatch):
    monkeypatch.setattr(rebuilds, "POLL_SECONDS", 0.01)
    monitors = []

    def make(mode: str = "rolling", target: int = 2, timeout: int = 60):
        config = make_config(targets={"linux": 0}, extra=built_profile(mode, target, timeout))
        directory = config.profiles["built"].config_dir
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "guest.xml").write_text(TEST_GUEST_XML.format(profile="built"))
        (directory / "boot-script").write_text(BOOT_SCRIPT)
        github, hypervisor, clock = FakeGitHub(), FakeHypervisor(), Clock()
        monitor = loop.Monitor(config, github, hypervisor, clock=clock)
        monitors.append(monitor)
        return config, github, hypervisor, clock, monitor

    yield make
    for monitor in monitors:
        monitor.stop()


def tick(monitor: loop.Monitor, clock: Clock):
    monitor.registrations.refresh(force=True)
    observation = monitor.tick(clock())
    settle(monitor, monitor.workers.idle, "creates and destroys")
    return observation


def rebuild_guest(hypervisor: FakeHypervisor) -> str:
    """The rebuild guest, once the rebuild worker has made and started it."""
    deadline = time.monotonic() + 10
    while True:
        with hypervisor._lock:
            names = [n for n, g in hypervisor.guests.items() if n.startswith("ci-rebuild-built@")]
            if len(names) == 1 and hypervisor.guests[names[0]].active:
                return names[0]
        assert time.monotonic() < deadline, f"no running rebuild guest: {names}"
        time.sleep(0.01)


def finish_rebuild(monitor, hypervisor) -> str:
    """Let the rebuild guest power off and the monitor take its image; returns the snapshot."""
    hypervisor.power_off(rebuild_guest(hypervisor))
    settle(monitor, lambda: not monitor.rebuilds.building, "the rebuild to finish")
    return monitor.snapshots["built"]


def built_runners(hypervisor: FakeHypervisor) -> list[str]:
    return sorted(n for n in hypervisor.guests if n.startswith("ci-runner-built."))


def test_a_profile_without_an_image_builds_one_then_makes_runners_from_it(make_env):
    config, github, hypervisor, clock, monitor = make_env("rolling")
    observation = tick(monitor, clock)
    assert observation.counts["built"].target == 0  # nothing to make runners from yet
    guest = rebuild_guest(hypervisor)
    assert hypervisor.guests[guest].active
    assert built_runners(hypervisor) == []
    assert monitor.rebuilds.state("built", clock()).startswith("building since")

    # The rebuild guest asks for its boot script with the token it was given (or, in
    # address-only mode, by its address), like a runner would.
    token = hypervisor.guest_tokens[guest]
    assert token and monitor.guests.boot_script_for_token(token) == BOOT_SCRIPT
    with pytest.raises(MonitorError) as refused:
        monitor.guests.boot_script_for_token("not-its-token")
    assert refused.value.status == 403
    hypervisor.addresses[guest] = "192.168.151.150"
    assert monitor.guests.boot_script_for("192.168.151.150") == BOOT_SCRIPT

    snapshot = finish_rebuild(monitor, hypervisor)
    assert guest not in hypervisor.guests  # removed, its disk kept as the image
    with pytest.raises(MonitorError):
        monitor.guests.boot_script_for_token(token)  # the token ended with its rebuild
    volume = rebuilds.image_volume("ci-template", "built", snapshot)
    assert hypervisor.volume_path(volume) is not None
    assert os.readlink(config.data_path / "profiles" / "built" / "snapshot") == snapshot
    assert {"rebuild", "rebuilt"} <= {e.kind for e in models.recent_events()}

    tick(monitor, clock)
    assert built_runners(hypervisor) == ["ci-runner-built.0", "ci-runner-built.1"]
    assert models.get_runner(0).image == snapshot
    assert monitor.rebuilds.state("built", clock()) == "rolling, up to date"


def test_the_snapshot_survives_a_restart(make_env):
    config, github, hypervisor, clock, monitor = make_env("rolling")
    tick(monitor, clock)
    snapshot = finish_rebuild(monitor, hypervisor)
    again = loop.Monitor(config, FakeGitHub(), hypervisor, clock=clock)
    assert again.snapshots == {"built": snapshot}
    again.rebuilds.shutdown()


def test_a_rebuild_guest_that_never_powers_off_times_out_and_backs_off(make_env):
    config, github, hypervisor, clock, monitor = make_env("rolling", timeout=1)
    tick(monitor, clock)
    guest = rebuild_guest(hypervisor)
    settle(monitor, lambda: not monitor.rebuilds.building, "the timeout", timeout=15)
    assert guest not in hypervisor.guests
    assert not [v for v in hypervisor.list_image_volumes("ci-template-built@")]
    state = monitor.rebuilds.state("built", clock())
    assert state.startswith("failed: the rebuild guest did not power off within 1 s")
    assert "next try at" in state
    failed = [e for e in models.recent_events() if e.kind == "rebuild-failed"]
    assert failed and "next try in 30 s" in failed[0].message

    tick(monitor, clock)  # backing off: no new try yet
    assert not monitor.rebuilds.building
    clock.advance(31)
    tick(monitor, clock)
    assert monitor.rebuilds.building  # the second try
    second = rebuild_guest(hypervisor)
    settle(monitor, lambda: not monitor.rebuilds.building, "the 2nd timeout", timeout=15)
    assert second not in hypervisor.guests
    failed = [e for e in models.recent_events() if e.kind == "rebuild-failed"]
    assert "next try in 60 s" in failed[0].message  # it waits longer each time


def test_a_failed_create_is_reported_and_leaves_nothing(make_env):
    config, github, hypervisor, clock, monitor = make_env("rolling")
    hypervisor.fail_next("create_image_guest", MonitorError("no space left in the pool", 503))
    tick(monitor, clock)
    settle(monitor, lambda: not monitor.rebuilds.building, "the failure")
    assert monitor.rebuilds.state("built", clock()).startswith("failed:")
    assert not [n for n in hypervisor.guests if n.startswith("ci-rebuild-")]


def age_the_image(monitor, clock) -> None:
    clock.advance(monitor.config.base_image_max_age.total_seconds() + 60)


def bring_idle(monitor, github, clock) -> None:
    tick(monitor, clock)
    for registration in list(github.runners.values()):
        github.set(registration.id, status="online")
    tick(monitor, clock)


def test_rolling_builds_while_runners_serve_then_replaces_idle_ones_one_at_a_time(make_env):
    config, github, hypervisor, clock, monitor = make_env("rolling", target=2)
    tick(monitor, clock)
    old = finish_rebuild(monitor, hypervisor)
    bring_idle(monitor, github, clock)
    busy = github.by_name("ci-runner-built.0@host")
    github.set(busy.id, busy=True)

    age_the_image(monitor, clock)
    observation = tick(monitor, clock)
    assert monitor.rebuilds.building  # the new image is being built…
    assert observation.counts["built"].target == 2  # …while the old one keeps serving
    assert built_runners(hypervisor) == ["ci-runner-built.0", "ci-runner-built.1"]
    assert observation.changes.destroy == []

    new = finish_rebuild(monitor, hypervisor)
    assert new != old
    # The Idle runner of the old image is replaced; the busy one is not touched.
    tick(monitor, clock)
    assert "ci-runner-built.1" in hypervisor.destroyed
    assert "ci-runner-built.0" not in hypervisor.destroyed
    tick(monitor, clock)
    assert built_runners(hypervisor) == ["ci-runner-built.0", "ci-runner-built.2"]
    assert models.get_runner(2).image == new
    # Never below busy + reserved: the busy runner was there all along.


def test_drain_waits_until_no_runner_is_left(make_env):
    config, github, hypervisor, clock, monitor = make_env("drain", target=2)
    tick(monitor, clock)
    finish_rebuild(monitor, hypervisor)
    bring_idle(monitor, github, clock)
    busy = github.by_name("ci-runner-built.0@host")
    github.set(busy.id, busy=True)

    age_the_image(monitor, clock)
    observation = tick(monitor, clock)
    assert observation.counts["built"].target == 0
    assert "ci-runner-built.1" in hypervisor.destroyed  # Idle: drained
    assert not monitor.rebuilds.building  # the busy runner is still there

    github.delete_runner(busy.id)  # its job finished
    tick(monitor, clock)
    tick(monitor, clock)
    assert built_runners(hypervisor) == []
    assert monitor.rebuilds.building


def test_old_images_are_pruned_to_three_but_one_in_use_is_kept(make_env):
    config, github, hypervisor, clock, monitor = make_env("rolling", target=0)
    # target 0 never rebuilds; make images by hand as five past rebuilds would have.
    snapshots = [rebuilds.snapshot_name(clock() - timedelta(days=n)) for n in range(5, 0, -1)]
    volumes = [rebuilds.image_volume("ci-template", "built", s) for s in snapshots]
    for volume in volumes:
        hypervisor.create_image_guest("ci-rebuild-x", TEST_GUEST_XML, volume, 1, None, None)
        hypervisor.remove_image_guest("ci-rebuild-x")
    hypervisor.in_use.add(volumes[0])  # the oldest still backs a runner's overlay
    monitor.rebuilds.prune_images("built", snapshots[-1])
    assert hypervisor.list_image_volumes("ci-template-built@") == [volumes[0], *volumes[2:]]


def test_stale_rebuild_guests_are_swept(make_env):
    config, github, hypervisor, clock, monitor = make_env("rolling", target=0)
    stale = "ci-rebuild-built@2026-10-01T000000.000000000Z"
    volume = "ci-template-built@2026-10-01T000000.000000000Z.qcow2"
    hypervisor.create_image_guest(stale, TEST_GUEST_XML, volume, 1, None, None)
    monitor.registrations.refresh(force=True)
    monitor.tick(clock())
    settle(monitor, lambda: stale not in hypervisor.guests, "the sweep")
    settle(monitor, lambda: hypervisor.volume_path(volume) is None, "its volume to go")


def test_a_cloud_init_seed_is_made_for_the_rebuild_guest_and_removed_after(make_env):
    config, github, hypervisor, clock, monitor = make_env("rolling")
    directory = config.profiles["built"].config_dir
    (directory / "user-data").write_text("#cloud-config\n")
    (directory / "meta-data").write_text("instance-id: built\n")
    tick(monitor, clock)
    guest = rebuild_guest(hypervisor)
    seed = hypervisor.guests[guest].seed_iso
    assert seed is not None and seed.is_file()  # a real ISO, made with genisoimage
    finish_rebuild(monitor, hypervisor)
    assert not seed.exists()
    assert not list((config.data_path / "profiles" / "built").glob("seed@*"))
