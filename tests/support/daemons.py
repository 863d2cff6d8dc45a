"""Processes of their own: `python -m monitor ...` (one-shot or a background daemon) and the
GitHub stand-in served from a child process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.constants import GITHUB_TOKEN
from tests.support.constants import ROOT
from tests.support.waiting import wait_until


def monitor(
    *args: str,
    cwd: Path | None = None,
    timeout: float = 60,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """`python -m monitor ARGS` to its end, output captured, in a clean environment (with
    `env` over it)."""
    return subprocess.run(
        [sys.executable, "-m", "monitor", *args],
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**clean_env(), **(env or {})},
    )


def clean_env() -> dict[str, str]:
    """This process's environment without the monitor's settings, with this tree importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SERVO_CI_", "LIBVIRT_"))}
    env.pop("GITHUB_TOKEN", None)
    env["PYTHONPATH"] = str(ROOT)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def wait_for_json(url: str, deadline: float) -> dict:
    """GET `url` until it answers (the daemon is up) and return its JSON; fail at `deadline`
    (a time.monotonic() value)."""

    def answer() -> list[dict] | None:
        try:
            return [get_json(url)]
        except OSError:
            return None

    (found,) = wait_until(answer, f"{url} to answer", max(0.0, deadline - time.monotonic()), 0.1)
    return found


class Daemon:
    """`python -m monitor ARGS` as a background process; `terminate()` sends SIGTERM and
    returns (exit code, output). Killed on exit if still running."""

    def __init__(self, *args: str, cwd: Path, env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "monitor", *args],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**clean_env(), **(env or {})},
        )

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()

    def terminate(self) -> tuple[int, str]:
        self.process.send_signal(signal.SIGTERM)
        output, _ = self.process.communicate(timeout=30)
        return self.process.returncode, output


class StandInProcess:
    """The GitHub stand-in in a process of its own, driven over its `/_standin/` control API.

    GitHub is not in the monitor's process: run in-process, the stand-in's request handling
    would share the monitor's GIL and be charged to the monitor's latency. `threads` waitress
    threads answer as GitHub (its own `start()` uses 8; GitHub answers concurrent requests
    concurrently)."""

    def __init__(self, threads: int = 64) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-c", _STANDIN_CHILD, GITHUB_TOKEN, str(threads)],
            cwd=ROOT,
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
from tests.support.served import Server
from monitor.standin import GitHubStandIn
logging.basicConfig(level=logging.ERROR)
standin = GitHubStandIn(token=sys.argv[1])
server = Server(standin.app, int(sys.argv[2]), "bench-standin")
print(server.url, flush=True)
sys.stdin.read()
server.stop()
standin.stop_job_simulation()
"""
