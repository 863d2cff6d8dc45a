"""A running Monitor over real adapters (`RestGitHub` against the GitHub stand-in,
`LibvirtHypervisor` against a test-driver node or a real libvirtd), its web app served by
waitress on a free port, and stdlib HTTP clients for it.

The monitor's own threads run it; the test thread only asks (`one_pass` does at once what the
scheduler would do on the scheduler's thread)."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from monitor import loop
from monitor import models
from monitor import web
from monitor.github import RestGitHub
from monitor.hypervisor.libvirt_hypervisor import LibvirtHypervisor
from monitor.serving import BackgroundServer
from monitor.standin import GitHubStandIn
from tests.support.configs import config_for_test_driver
from tests.support.constants import API_TOKEN
from tests.support.constants import REPO
from tests.support.waiting import WAIT
from tests.support.waiting import wait_until


class Server(BackgroundServer):
    """A WSGI app on waitress at 127.0.0.1:<free port>, served from a daemon thread."""

    def __init__(self, app: Any, threads: int, name: str) -> None:
        super().__init__(app, threads=threads, name=name)

    def stop(self) -> None:
        self.close()


class Served(BackgroundServer):
    """A WSGI app on 127.0.0.1:<free port>, served by waitress from a background thread."""

    def __init__(self, app: Any) -> None:
        super().__init__(app, threads=40, name="monitor-e2e-http", body_limit=web.body_limit)


# HTTP plumbing -------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    content_type: str
    body: bytes
    headers: dict[str, str]

    @property
    def json(self) -> Any:
        assert self.content_type == "application/json", (self.content_type, self.body)
        return json.loads(self.body)


def request(
    port: int,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    timeout: float = WAIT,
    host: str = "127.0.0.1",
) -> Reply:
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        headers = {name.lower(): value for name, value in response.getheaders()}
        return Reply(response.status, headers.get("content-type", ""), response.read(), headers)
    finally:
        connection.close()


def take_path(unique_id: str, run_id: int | str, count: int | None = None) -> str:
    suffix = "" if count is None else f"/{count}"
    return (
        f"/profile/linux/take{suffix}?unique_id={unique_id}&qualified_repo={REPO}&run_id={run_id}"
    )


def take(port: int, unique_id: str, run_id: int | str, count: int | None = None) -> Reply:
    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    return request(port, "POST", take_path(unique_id, run_id, count), auth)


def fire_together(calls: list[Callable[[], Reply]]) -> list[Reply]:
    """Run every call from its own thread, all released at once by a barrier."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(index: int) -> None:
        try:
            barrier.wait(timeout=WAIT)
            results[index] = calls[index]()
        except BaseException as error:  # noqa: BLE001 - reported below
            results[index] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT + 10)
    assert not any(thread.is_alive() for thread in threads), "a request never came back"
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


# The rig -------------------------------------------------------------------------------------


def monitor_for(config: Any, clock: Callable[[], datetime] | None = None):
    """The store opened and a Monitor (not started) over `config`'s real adapters; returns
    (github, hypervisor, monitor). The caller closes the hypervisor and the store."""
    models.open_store(config.data_path)
    github = RestGitHub(config.github_api_url, config.github_api_scope, config.github_token)
    hypervisor = LibvirtHypervisor(config.libvirt_uri, config.libvirt_storage_pool)
    if clock is None:
        return github, hypervisor, loop.Monitor(config, github, hypervisor)
    return github, hypervisor, loop.Monitor(config, github, hypervisor, clock=clock)


@dataclass
class Rig:
    config: Any
    standin: GitHubStandIn
    hypervisor: LibvirtHypervisor
    monitor: loop.Monitor
    http: BackgroundServer

    @property
    def port(self) -> int:
        return self.http.port

    def reserved_labels(self) -> dict[str, list[str]]:
        """Registration name -> its reservation labels, for runners that have any."""
        found = {}
        for runner in self.standin.runners():
            names = [label["name"] for label in runner["labels"]]
            reserved = [name for name in names if name.startswith("reserved-")]
            if reserved:
                found[runner["name"]] = reserved
        return found


def start_rig(
    root: Any, standin: GitHubStandIn, target: int, extra: str = "", *, online: bool = True
) -> Rig:
    """A started monitor on a private test-driver node under `root` with `target` linux
    runners, served on a free port; with `online`, all of them Idle. Stop it with stop_rig."""
    config = config_for_test_driver(root, standin.base_url, {"linux": target}, extra)
    _, hypervisor, monitor = monitor_for(config)  # real time: labels carry it
    monitor.start()
    rig = Rig(config, standin, hypervisor, monitor, Served(web.make_app(config, monitor)))
    if online:
        bring_online(rig, target)
    return rig


def stop_rig(rig: Rig) -> None:
    rig.http.close()
    rig.monitor.stop()
    rig.hypervisor.close()


def one_pass(monitor: loop.Monitor) -> None:
    """What the scheduler does, at once: fetch GitHub's list, then a reconcile pass."""
    monitor.registrations.refresh(force=True)
    monitor.call(lambda: monitor.tick(monitor.clock()), 10)


def idle_count(monitor: loop.Monitor) -> int:
    observation = monitor.observation
    if observation is None:
        return 0
    return sum(runner.status.value == "Idle" for runner in observation.runners)


def bring_online(rig: Rig, count: int) -> None:
    """Passes until `count` runners are registered, then mark them online on the stand-in and
    pass again until the monitor sees them all Idle (reads only .monitor and .standin)."""

    def registered() -> bool:
        one_pass(rig.monitor)
        return len(rig.standin.runners()) >= count and rig.monitor.workers.idle()

    wait_until(registered, f"{count} registrations")
    for registration in rig.standin.runners():
        rig.standin.set_status(registration["id"], "online")

    def all_idle() -> bool:
        one_pass(rig.monitor)
        return idle_count(rig.monitor) == count

    wait_until(all_idle, f"{count} idle runners")


# Servo's runner-select-queueless decision step reads an artifact named `args` ------------------


def args_file(unique_id: str, repo: str, run_id: str, *, image: str | None = "linux") -> str:
    lines = [f"unique_id={unique_id}"]
    if image is not None:
        lines.append(f"self_hosted_image_name={image}")
    lines += [f"qualified_repo={repo}", f"run_id={run_id}"]
    return "".join(line + "\n" for line in lines)


def publish_args(
    standin: GitHubStandIn,
    unique_id: str,
    run_id: str,
    *,
    repo: str = REPO,
    content: str | None = None,
    created_at: datetime | None = None,
) -> None:
    """Upload the args artifact as the action does (one file named `args`)."""
    text = args_file(unique_id, repo, run_id) if content is None else content
    standin.add_artifact(
        repo, run_id, f"servo-ci-runners_{unique_id}", {"args": text}, created_at=created_at
    )
