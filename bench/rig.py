"""Shared set-up for the benchmarks: the GitHub stand-in in a process of its own, and in this
process libvirt's test driver (a private node file), a real `Monitor` with its scheduler, and
waitress servers on 127.0.0.1 that stop by themselves.

`Rig(runners=50)` writes a config with tests/conftest.write_config (profile `linux` with
target = runners), starts everything, and `bring_to_idle()` waits until every runner is
Idle (the stand-in marks each JIT runner online shortly after its registration). Use it as a
context manager; leaving it stops every thread and server it started and removes its files.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from monitor import config as config_module
from monitor import models
from monitor.github import RestGitHub
from monitor.hypervisor.libvirt_hypervisor import LibvirtHypervisor
from monitor.loop import Monitor
from monitor.main import tune_interpreter
from monitor.scheduler import make_scheduler
from monitor.serving import BackgroundServer
from tests.conftest import API_TOKEN  # noqa: F401 - the benchmarks' clients use it
from tests.conftest import GITHUB_TOKEN
from tests.conftest import NODE_XML
from tests.conftest import write_config

PROFILE = "linux"
SCOPE = "/repos/test/servo"


class DiscardedConnections(logging.Filter):
    """Counts (and hides) urllib3's "Connection pool is full, discarding connection": each
    is a GitHub call that found no idle kept-alive connection and will not leave one."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("Connection pool is full"):
            self.count += 1
            return False
        return True


def quiet_logging() -> DiscardedConnections:
    """WARNING and up, without waitress' per-request queue-depth warnings under load."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    discarded = DiscardedConnections()
    logging.getLogger("urllib3.connectionpool").addFilter(discarded)
    return discarded


class Server(BackgroundServer):
    """A WSGI app on waitress at 127.0.0.1:<free port>, served from a daemon thread."""

    def __init__(self, app: Any, threads: int, name: str) -> None:
        super().__init__(app, threads=threads, name=name)

    def stop(self) -> None:
        self.close()


class StandInProcess:
    """The GitHub stand-in in a process of its own, driven over its `/_standin/` control API.

    GitHub is not in the monitor's process: run in-process, the stand-in's request handling
    would share the monitor's GIL and be charged to the monitor's latency. `threads` waitress
    threads answer as GitHub (its own `start()` uses 8; GitHub answers concurrent requests
    concurrently)."""

    def __init__(self, threads: int = 64) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-c", _STANDIN_CHILD, GITHUB_TOKEN, str(threads)],
            cwd=Path(__file__).resolve().parent.parent,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._process.stdout is not None
        self.url = self._process.stdout.readline().strip()
        if not self.url.startswith("http://"):
            raise SystemExit("the GitHub stand-in process did not start")

    def _control(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}/_standin{path}", data, method=method)
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"null")

    def runners(self) -> list[dict[str, Any]]:
        return self._control("GET", "/runners")

    def set_status(self, runner_id: int, status: str) -> None:
        self._control("POST", f"/runners/{runner_id}/status", {"status": status})

    def add_runner(self, scope: str, name: str, status: str = "offline") -> int:
        body = {"scope": scope, "name": name, "status": status}
        return self._control("POST", "/runners", body)["id"]

    def inject_fault(self, status: int | None, **options: Any) -> None:
        self._control("POST", "/faults", {"status": status, **options})

    def agent_online_after(self, seconds: float | None) -> None:
        self._control("POST", "/agent", {"online_after": seconds})

    def stop(self) -> None:
        if self._process.poll() is None:
            assert self._process.stdin is not None
            self._process.stdin.close()  # the child stops when its stdin closes
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()


# The child: serve the stand-in's app on waitress, print its URL, stop when stdin closes.
_STANDIN_CHILD = """
import logging, sys
sys.setswitchinterval(0.0005)  # as the monitor: GitHub's answers do not queue for a GIL
from bench.rig import Server
from monitor.standin import GitHubStandIn
logging.basicConfig(level=logging.ERROR)
standin = GitHubStandIn(token=sys.argv[1])
server = Server(standin.app, int(sys.argv[2]), "bench-standin")
print(server.url, flush=True)
sys.stdin.read()
server.stop()
standin.stop_job_simulation()
"""


class Rig:
    """Stand-in + test driver + Monitor (+ scheduler), `runners` linux runners wanted.

    `standin_threads`: waitress threads answering as GitHub. The stand-in's own `start()`
    uses 8, which would let only 8 delayed answers be in progress at once; GitHub answers
    concurrent requests concurrently, so the benchmark serves the stand-in's app itself.
    """

    def __init__(self, runners: int, standin_threads: int = 64) -> None:
        tune_interpreter()  # as `monitor run` does
        self.runners = runners
        self.root = Path(tempfile.mkdtemp(prefix="monitor-bench-"))
        self.standin = StandInProcess(standin_threads)
        self.standin.agent_online_after(0.2)
        node = self.root / "node.xml"
        node.write_text(NODE_XML)
        path = write_config(
            self.root,
            github_api_url=self.standin.url,
            targets={PROFILE: runners},
            libvirt_uri=f"test://{node}",
            available_memory=f"{2 * runners}G",
        )
        self.config = config_module.load(path, environ={})
        models.open_store(self.config.data_path)
        self.github = RestGitHub(
            self.config.github_api_url, self.config.github_api_scope, self.config.github_token
        )
        self.hypervisor = LibvirtHypervisor(
            self.config.libvirt_uri, self.config.libvirt_storage_pool
        )
        self.monitor = Monitor(self.config, self.github, self.hypervisor)
        self.scheduler = make_scheduler(self.monitor)
        self.monitor.start()
        self.scheduler.start()

    def idle_count(self) -> int:
        observation = self.monitor.observation
        if observation is None:
            return 0
        return sum(r.status.value == "Idle" for r in observation.runners)

    def bring_to_idle(self, timeout: float = 120.0) -> float:
        """Wait until all runners are Idle; returns the seconds it took."""
        started = time.monotonic()
        deadline = started + timeout
        while self.idle_count() < self.runners:
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"only {self.idle_count()}/{self.runners} runners Idle after {timeout:.0f} s"
                )
            for registration in self.standin.runners():
                if registration["status"] != "online":
                    self.standin.set_status(registration["id"], "online")
            # Don't wait api_cache_timeout (30 s) for the next look at GitHub.
            self.monitor.registrations.cache.invalidate()
            time.sleep(0.25)
        # No more simulated agents: runners created later stay as they are.
        self.standin.agent_online_after(None)
        return time.monotonic() - started

    def close(self) -> None:
        self.scheduler.shutdown(wait=False)
        self.monitor.stop()
        self.hypervisor.close()
        models.close_store()
        self.standin.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Rig:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
