"""Drain, pause and maintenance: persisted, decided by the pure policy, shown on the dashboard
and in /dashboard.json. The monitor thread runs for real with the fakes of tests/fakes.py."""

from __future__ import annotations

import pytest
import webtest

from monitor import loop
from monitor import models
from monitor import web
from tests.support.constants import AUTH
from tests.support.rigs import assert_error
from tests.support.rigs import idle_rig


@pytest.fixture
def rig(make_rig):
    return idle_rig(make_rig, linux=3, windows=1)


def statuses(rig, profile: str) -> list[str]:
    return sorted(r.status.value for r in rig.monitor.observation.runners if r.profile == profile)


def test_drain_keeps_busy_runners_creates_none_and_undrain_restores_the_target(rig):
    (busy,) = rig.client.post(rig.take_url(), headers=AUTH).json
    rig.github.set(rig.github.by_name(f"ci-runner-linux.{busy['id']}@host").id, busy=True)
    rig.converge()
    assert statuses(rig, "linux") == ["Busy", "Idle", "Idle"]

    answer = rig.client.post("/profile/linux/drain", headers=AUTH).json
    assert answer == {"drained_profiles": ["linux"], "paused": False, "maintenance": False}
    rig.converge(3)
    assert statuses(rig, "linux") == ["Busy"]  # the Idle ones went, the busy one stays
    assert statuses(rig, "windows") == ["Idle"]  # other profiles untouched
    created = len(rig.hypervisor.guests)
    rig.converge(3)
    assert len(rig.hypervisor.guests) == created  # nothing new
    assert rig.client.post(rig.take_url(), headers=AUTH).json is None  # no idle runner to give
    dashboard = rig.client.get("/dashboard.json").json
    assert dashboard["holds"]["drained_profiles"] == ["linux"]
    assert dashboard["profile_runner_counts"]["linux"]["target"] == 0
    assert "<b>drained</b>" in rig.client.get("/dashboard.html").text

    assert rig.client.delete("/profile/linux/drain", headers=AUTH).json["drained_profiles"] == []
    rig.converge(2)
    rig.all_online()
    assert statuses(rig, "linux") == ["Busy", "Idle", "Idle"]  # the target of 3 again
    kinds = [e.message for e in models.recent_events() if e.kind == "hold"]
    assert any("profile linux drained" in m for m in kinds)
    assert any("profile linux undrained" in m for m in kinds)


def test_pause_creates_nothing_but_keeps_serving(rig):
    rig.client.post("/host/pause", headers=AUTH)
    (taken,) = rig.client.post(rig.take_url(), headers=AUTH).json  # idle runners still serve
    # Its job ends: the runner goes, and no replacement is made while paused.
    rig.github.runners.pop(rig.github.by_name(f"ci-runner-linux.{taken['id']}@host").id)
    rig.converge(3)
    assert statuses(rig, "linux") == ["Idle", "Idle"]
    assert "the host is paused" in rig.client.get("/dashboard.html").text
    rig.client.delete("/host/pause", headers=AUTH)
    rig.converge(2)
    assert len(statuses(rig, "linux")) == 3


def test_maintenance_drains_every_profile_and_survives_a_restart(rig, make_config):
    assert rig.client.post("/host/maintenance", headers=AUTH).json["maintenance"] is True
    rig.converge(3)
    assert rig.monitor.observation.runners == []
    assert "in maintenance" in rig.client.get("/dashboard.html").text
    # A new monitor on the same store (a restart) is still in maintenance.
    restarted = loop.Monitor(rig.config, rig.github, rig.hypervisor, clock=rig.clock)
    assert restarted.holds.maintenance is True
    client = webtest.TestApp(web.make_app(rig.config, restarted))
    assert client.get("/holds").json == {
        "drained_profiles": [],
        "paused": False,
        "maintenance": True,
    }


@pytest.mark.parametrize(
    ("method", "path", "headers", "status"),
    [
        ("post", "/profile/linux/drain", {}, 401),
        ("post", "/host/pause", {"Authorization": "Bearer wrong"}, 403),
        ("delete", "/host/maintenance", {}, 401),
        ("post", "/profile/macos/drain", AUTH, 404),
    ],
)
def test_hold_refusals(rig, method, path, headers, status):
    response = getattr(rig.client, method)(path, headers=headers, status=status)
    assert_error(response, status)
    assert rig.client.get("/holds").json["drained_profiles"] == []
