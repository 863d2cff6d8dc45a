"""An in-process monitor and its web app driven through WebTest: the monitor thread runs for
real, GitHub and libvirt are the hand-written fakes of tests/fakes.py, time is a `Clock`."""

from __future__ import annotations

import uuid

import webtest

from monitor import loop
from monitor import web
from tests.fakes import FakeGitHub
from tests.fakes import FakeHypervisor
from tests.support.clock import Clock
from tests.support.constants import JSON
from tests.support.waiting import wait_until


class Rig:
    """Fakes, a Clock, a Monitor over them (`make_rig` in conftest starts it) and a WebTest
    client of its web app."""

    def __init__(self, config) -> None:
        self.config = config
        self.github = FakeGitHub()
        self.hypervisor = FakeHypervisor()
        self.clock = Clock()
        self.monitor = loop.Monitor(self.config, self.github, self.hypervisor, clock=self.clock)
        self.client = webtest.TestApp(web.make_app(self.config, self.monitor))

    def converge(self, passes: int = 2) -> None:
        """Reconcile until nothing is in flight (the monitor thread does the work)."""
        for _ in range(passes):
            self.monitor.registrations.refresh(force=True)
            self.monitor.call(lambda: self.monitor.tick(self.clock()), 10)
            wait_until(self.monitor.workers.idle, "nothing in flight", 10, 0.01)

    def all_online(self) -> None:
        for registration in list(self.github.runners.values()):
            self.github.set(registration.id, status="online")
        self.converge(1)

    def take_url(self, profile="linux", count=None, unique_id=None, repo="test/servo", run="7"):
        path = f"/profile/{profile}/take" + (f"/{count}" if count is not None else "")
        unique_id = unique_id or str(uuid.uuid4())
        return f"{path}?unique_id={unique_id}&qualified_repo={repo}&run_id={run}"


def idle_rig(make_rig, **targets: int) -> Rig:
    """A rig whose runners (`targets` per profile) are all registered, started and Idle."""
    rig = make_rig(targets=targets)
    rig.converge()
    rig.all_online()
    return rig


def assert_error(response, status: int, content_type: str = JSON) -> str:
    assert response.status_int == status
    assert response.content_type == content_type
    assert "Traceback" not in response.text
    return response.json["error"]


ADDRESS_MODE = 'guest_auth = "address"\n'


def guest_rig(make_rig, extra: str = "", **kwargs) -> Rig:
    """Guests known by their address: upstream's mode (token mode: test_guest_tokens.py)."""
    rig = make_rig(extra=ADDRESS_MODE + extra, **kwargs)
    rig.converge()
    rig.hypervisor.addresses = {
        "ci-runner-linux.0": "192.168.100.10",
        "ci-runner-linux.1": "192.168.100.11",
        "ci-runner-windows.2": "192.168.100.12",
    }
    boot = rig.config.profiles["linux"].config_dir / "boot-script"
    boot.write_text("#!/bin/sh\necho booting linux\n")
    return rig
