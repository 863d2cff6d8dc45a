"""The web edge through WebTest: status page, upstream's /dashboard.json shape, errors."""

from __future__ import annotations

import html
import json
import threading

import pytest
import webtest

from monitor import loop
from monitor import models
from monitor import web
from monitor.preflight import Check
from tests.fakes import FakeGitHub
from tests.fakes import FakeHypervisor
from tests.support.clock import Clock
from tests.support.monitor_thread import settle


@pytest.fixture
def app(make_config, store):
    config = make_config()
    github, hypervisor, clock = FakeGitHub(), FakeHypervisor(), Clock()
    monitor = loop.Monitor(config, github, hypervisor, clock=clock)
    client = webtest.TestApp(web.make_app(config, monitor))
    yield client, monitor, github, clock
    monitor.workers.shutdown()


def observe(monitor, clock, passes: int = 2) -> None:
    for _ in range(passes):
        monitor.registrations.refresh(force=True)
        monitor.tick(clock())
        settle(monitor)


def test_dashboard_json_is_503_until_first_observation(app):
    client, monitor, github, clock = app
    response = client.get("/dashboard.json", status=503)
    assert response.json == {"error": web.NOT_READY}


def test_dashboard_json_has_upstream_shape(app):
    client, monitor, github, clock = app
    observe(monitor, clock)
    github.set(github.by_name("ci-runner-linux.0@host").id, status="online")
    observe(monitor, clock, passes=1)
    data = client.get("/dashboard.json").json
    # Upstream's keys, plus ours: "holds" (drained profiles, pause, maintenance).
    assert list(data) == ["holds", "profile_runner_counts", "runners"]
    linux = data["profile_runner_counts"]["linux"]
    assert linux == {
        "busy": 0,
        "excess_healthy": 0,
        "healthy": 2,
        "idle": 1,
        "image_age": None,
        "reserved": 0,
        "started_or_crashed": 1,
        "target": 2,
        "wanted": 0,
    }
    assert [r["id"] for r in data["runners"]] == [0, 1, 2]
    first = data["runners"][0]
    assert first["screenshot_url"] == "http://127.0.0.1:8000/runner/0/screenshot.png"
    runner = first["runner"]
    assert sorted(runner) == [
        "created_time",
        "details",
        "guest_name",
        "id",
        "ipv4_address",
        "registration",
    ]
    assert runner["guest_name"] == "ci-runner-linux.0"
    assert runner["registration"]["name"] == "ci-runner-linux.0@host"
    assert runner["registration"]["status"] == "online"
    assert {"name": "X64"} in runner["registration"]["labels"]
    assert set(runner["created_time"]) == {"secs_since_epoch", "nanos_since_epoch"}
    assert "jit" not in client.get("/dashboard.json").text  # the JIT config never leaves


def test_status_page_lists_profiles_runners_and_events(app):
    client, monitor, github, clock = app
    page = client.get("/")
    assert "Waiting for the first look" in page.text
    observe(monitor, clock)
    page = client.get("/")
    assert "2/2 runners for linux" in page.text
    assert "1/1 runners for windows" in page.text
    assert page.text.count('<tr class="runner ') == 3
    assert "created and started ci-runner-linux.0" in page.text


def test_errors_are_json_for_api_and_html_for_pages(app):
    client, monitor, github, clock = app
    missing = client.get("/no/such/page", headers={"Accept": "text/html"}, status=404)
    assert missing.content_type == "text/html"
    assert "404" in missing.text
    api = client.get("/profile/linux/nothing", status=404)  # curl: Accept */*
    assert api.content_type == "application/json"
    assert api.json["error"]


def test_unexpected_error_is_500_without_traceback(app, monkeypatch):
    client, monitor, github, clock = app
    observe(monitor, clock)

    def explode(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(monitor.guests, "jit_config_for_token", explode)
    response = client.get(
        "/github-jitconfig", headers={"Authorization": "Bearer guest"}, status=500
    )
    assert response.json == {"error": "internal error; see the monitor's log"}
    assert "secret internals" not in response.text
    assert "Traceback" not in response.text


def test_assets_are_found_in_a_regular_install_prefix(tmp_path, monkeypatch):
    installed = tmp_path / "share" / "monitor" / "views"
    installed.mkdir(parents=True)
    monkeypatch.setattr(web, "ROOT", tmp_path / "site-packages")  # no checkout beside it
    assert web.asset_dir("views", prefix=str(tmp_path)) == installed


def test_wheel_ships_views_static_and_demo(tmp_path):
    import subprocess
    import sys
    import zipfile

    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), "."],
        cwd=web.ROOT,
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("monitor-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    version = wheel.name.split("-")[1]
    data = f"monitor-{version}.data/data/share/monitor"
    for template in ("base.tpl", "error.tpl", "index.tpl"):
        assert f"{data}/views/{template}" in names
    assert f"{data}/static/style.css" in names
    assert "monitor/demo/monitor.toml" in names
    assert "monitor/demo/profiles/linux/guest.xml" in names
    # The API's description, as /openapi.json serves it.
    shipped = json.loads(zipfile.ZipFile(wheel).read("monitor/openapi.json"))
    assert shipped == json.loads((web.ROOT / "monitor" / "openapi.json").read_text())


def test_a_profile_that_cannot_create_runners_is_a_notice_until_it_can(app):
    """The check before the first create says linux is impossible: no runner id is spent on
    it, the page says why and how to fix it, windows is not held up; linux is looked at
    again only after profile_check_interval, and then comes up."""
    client, monitor, github, clock = app
    template = monitor.config.profiles["linux"].guest_xml.read_text()
    monitor.hypervisor.blockers[template] = Check.fail(
        "storage pool default", "libvirt has no pool 'default'", "virsh pool-define-as …"
    )
    observe(monitor, clock)
    names = sorted(guest for guest in monitor.hypervisor.guests)
    assert names == ["ci-runner-windows.0"]  # the only id spent
    page = client.get("/")
    assert (
        "Profile linux cannot create runners: storage pool default: libvirt has no pool "
        "'default'. Fix: virsh pool-define-as …"
    ) in html.unescape(page.text)
    events = [e for e in models.recent_events(50) if e.kind == "profile-failed"]
    assert [e.profile for e in events] == ["linux"]
    assert client.get("/healthz").json["blocked_profiles"] == {
        "linux": {
            "subject": "storage pool default",
            "status": "FAIL",
            "detail": "libvirt has no pool 'default'",
            "fix": "virsh pool-define-as …",
        }
    }
    scraped = client.get("/metrics").text
    assert 'monitor_profile_blocked{profile="linux"} 1.0' in scraped
    assert 'monitor_profile_blocked{profile="windows"} 0.0' in scraped

    checks = lambda: monitor.hypervisor.calls.count(("creation_blocker", template))  # noqa: E731
    before = checks()
    clock.advance(monitor.config.profile_check_interval.total_seconds() - 1)
    observe(monitor, clock)
    assert checks() == before  # not yet due
    del monitor.hypervisor.blockers[template]
    clock.advance(1)
    observe(monitor, clock)
    assert checks() == before + 1
    assert sorted(monitor.hypervisor.guests) == [
        "ci-runner-linux.1",
        "ci-runner-linux.2",
        "ci-runner-windows.0",
    ]
    assert "Profile linux cannot create runners" not in client.get("/").text  # events keep it
    assert client.get("/healthz").json["blocked_profiles"] == {}
    assert [e.kind for e in models.recent_events(50)].count("profile-failed") == 1


def test_a_profile_found_impossible_last_holds_up_no_other(app):
    """windows' check passes first, linux's answers "impossible" after it: windows' creates,
    held back until no check is under way, still start."""
    client, monitor, github, clock = app
    linux = monitor.config.profiles["linux"].guest_xml.read_text()
    monitor.hypervisor.blockers[linux] = Check.fail("profile", "refused", "fix it")
    gate = monitor.hypervisor.check_gates[linux] = threading.Event()
    monitor.registrations.refresh(force=True)
    monitor.tick(clock())
    monitor.run_pending(until=lambda: "windows" in monitor.workers.checked)
    assert monitor.hypervisor.guests == {}  # waiting for linux's check
    gate.set()
    settle(monitor)
    assert sorted(monitor.hypervisor.guests) == ["ci-runner-windows.0"]
    assert set(monitor.workers.blocked) == {"linux"}
