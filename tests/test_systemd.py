"""The shipped systemd units (valid for systemd, restart on failure, hardened: `monitor run` in
monitor.service, `monitor queue` without libvirt in monitor-queue.service) and the daemon's
sd_notify side: READY=1, a watchdog fed only while the monitor thread answers."""

from __future__ import annotations

import configparser
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from monitor import systemd
from monitor.logs import RunnerFormatter
from monitor.loop import Monitor
from monitor.standin import GitHubStandIn
from tests.fakes import FakeGitHub
from tests.fakes import FakeHypervisor
from tests.support.configs import write_config
from tests.support.constants import GITHUB_TOKEN
from tests.support.daemons import Daemon
from tests.support.daemons import free_port

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "monitor.service"
QUEUE_UNIT = UNIT.with_name("monitor-queue.service")
UNITS = [UNIT, QUEUE_UNIT]


def unit(path: Path = UNIT) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read(path)
    return parser


def copy_for_analyze(path: Path, directory: Path) -> Path:
    """The unit with ExecStart pointing at an executable that exists (verify checks it)."""
    copy = directory / path.name
    copy.write_text(path.read_text().replace("/opt/monitor/.venv/bin/monitor", "/bin/true"))
    return copy


def test_unit_runs_the_monitor_and_restarts_on_failure():
    service = unit()["Service"]
    assert service["ExecStart"].split()[1:] == ["run", "--config", "/etc/monitor/monitor.toml"]
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == "2"  # bad config: don't restart-loop
    assert service["KillSignal"] == "SIGTERM"
    # The hardening must leave the libvirt socket reachable: AF_UNIX allowed, /run not hidden.
    assert "AF_UNIX" in service["RestrictAddressFamilies"].split()
    assert service["ProtectSystem"] == "strict"
    assert "libvirt" in service["SupplementaryGroups"].split()
    assert "InaccessiblePaths" not in service


def test_queue_unit_runs_the_queue_alone_without_libvirt():
    service = unit(QUEUE_UNIT)["Service"]
    assert service["ExecStart"].split()[1:] == ["queue", "--config", "/etc/monitor/monitor.toml"]
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == "2"
    assert service["KillSignal"] == "SIGTERM"
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    # Not a hypervisor: not in the libvirt group, libvirt's sockets and state hidden, its own
    # user and state directory (the SQLite store) rather than the monitor's.
    assert "SupplementaryGroups" not in service
    assert service["User"] == "monitor-queue" and service["User"] != unit()["Service"]["User"]
    hidden = {path.lstrip("-") for path in service["InaccessiblePaths"].split()}
    assert {"/run/libvirt", "/var/lib/libvirt"} <= hidden
    assert service["ReadWritePaths"] == "/var/lib/monitor-queue"
    assert "libvirt" not in unit(QUEUE_UNIT)["Unit"]["After"]
    assert "SERVO_CI_MONITOR_DATA_PATH=/var/lib/monitor-queue" in service["Environment"]


@pytest.mark.parametrize("path", UNITS, ids=lambda path: path.name)
def test_unit_passes_systemd_analyze_verify(tmp_path, path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    copy = copy_for_analyze(path, tmp_path)
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True)
    problems = [line for line in result.stderr.splitlines() if path.name in line]
    assert result.returncode == 0 and not problems, result.stderr


# The exposure `systemd-analyze security` reports for the unit at most (0 best, 10 worst).
MAX_EXPOSURE = 3.0


@pytest.mark.parametrize("path", UNITS, ids=lambda path: path.name)
def test_unit_is_hardened_and_bounded(tmp_path, path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        message = "systemd-analyze is not installed (apt-get install systemd)"
        if os.environ.get("MONITOR_REQUIRE_SYSTEMD") == "1":
            pytest.fail(message)
        pytest.skip(message)
    assert unit(path)["Service"]["MemoryMax"]
    copy = copy_for_analyze(path, tmp_path)
    result = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(copy)],
        capture_output=True,
        text=True,
    )
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
    assert found, result.stdout + result.stderr
    exposure = float(found[1])
    print(f"\nsystemd-analyze security {path.name}: exposure {exposure}")
    assert exposure <= MAX_EXPOSURE, result.stdout


# sd_notify: READY=1 after the first reconcile, a watchdog fed by the monitor thread -----------


class NotifySocket:
    """A datagram socket standing in for systemd's: collects what the service sends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []

    def collect(self, until: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < deadline, f"timed out; got {self.messages}"
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data.decode()))

    def having(self, line: str) -> list[float]:
        return [at for at, text in self.messages if line in text.splitlines()]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path):
    listener = NotifySocket(tmp_path / "notify.sock")
    yield listener
    listener.close()


def test_run_says_ready_after_the_first_reconcile_and_feeds_the_watchdog(tmp_path, notify_socket):
    standin = GitHubStandIn(token=GITHUB_TOKEN)
    standin.start()
    port = free_port()
    path = write_config(tmp_path, github_api_url=standin.base_url, extra=f"listen_port = {port}\n")
    env = {"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "1000000"}
    try:
        with Daemon("run", "--config", str(path), cwd=tmp_path, env=env) as daemon:
            notify_socket.collect(lambda: notify_socket.having("READY=1"), timeout=30)
            # Ready means the first reconcile has happened: the monitor has an observation.
            health = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz"))
            assert health["observed_at"] is not None
            (ready,) = [t for _, t in notify_socket.messages if "READY=1" in t.splitlines()]
            assert "STATUS=keeping the pool" in ready
            # Fed every half second (half WATCHDOG_USEC) while the monitor thread answers.
            notify_socket.collect(lambda: len(notify_socket.having("WATCHDOG=1")) >= 4, 10)
            fed = notify_socket.having("WATCHDOG=1")
            assert all(b - a < 1.0 for a, b in zip(fed, fed[1:], strict=False))
            code, output = daemon.terminate()
        assert code == 0, output
        notify_socket.collect(lambda: notify_socket.having("STOPPING=1"), timeout=5)
    finally:
        standin.stop()


def test_a_wedged_monitor_thread_stops_feeding_the_watchdog(notify_socket, make_config, store):
    monitor = Monitor(make_config(), FakeGitHub(), FakeHypervisor())
    monitor.start()
    notifier = systemd.Notifier({"NOTIFY_SOCKET": str(notify_socket.path)})
    watchdog = systemd.Watchdog(notifier, 0.4, monitor.ping)
    watchdog.start()
    try:
        notify_socket.collect(lambda: len(notify_socket.having("WATCHDOG=1")) >= 2, 5)
        release = threading.Event()
        monitor.post(lambda: release.wait(10))  # the monitor thread is stuck in a call
        wedged_at = time.monotonic()
        time.sleep(1.5)
        notify_socket.collect(lambda: True, 0)
        assert not [at for at in notify_socket.having("WATCHDOG=1") if at > wedged_at + 0.3]
        assert watchdog.missed >= 2
        release.set()  # unstuck: fed again
        count = len(notify_socket.having("WATCHDOG=1"))
        notify_socket.collect(lambda: len(notify_socket.having("WATCHDOG=1")) > count, 5)
    finally:
        release.set()
        watchdog.stop()
        monitor.stop()


def test_watchdog_settings_follow_systemd_s_environment():
    assert systemd.watchdog_seconds({}) is None
    assert systemd.watchdog_seconds({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert systemd.watchdog_seconds({"WATCHDOG_USEC": "0"}) is None
    pid = str(os.getpid())
    assert systemd.watchdog_seconds({"WATCHDOG_USEC": "5000000", "WATCHDOG_PID": pid}) == 5.0
    assert systemd.watchdog_seconds({"WATCHDOG_USEC": "5000000", "WATCHDOG_PID": "1"}) is None
    assert not systemd.Notifier({}).enabled and systemd.Notifier({}).send("READY=1") is False
    assert systemd.Notifier({"NOTIFY_SOCKET": "@abstract"}).address == b"\0abstract"


def test_unit_is_a_notify_service_with_a_watchdog():
    service = unit()["Service"]
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert service["WatchdogSec"] == "60"


def test_log_lines_carry_the_runner_and_journald_priorities():
    record = logging.LogRecord(
        "monitor.workers",
        logging.INFO,
        "x",
        1,
        "destroying runner %d: %s",
        (7, "its job is done"),
        None,
    )
    record.runner_id = 7
    plain = RunnerFormatter("%(levelname)s %(name)s: %(message)s", journald=False)
    expected = "INFO monitor.workers: destroying runner 7: its job is done runner=7"
    assert plain.format(record) == expected
    journal = RunnerFormatter("%(levelname)s %(name)s: %(message)s", journald=True)
    error = logging.LogRecord("monitor.loop", logging.ERROR, "x", 1, "failed", (), None)
    assert journal.format(error) == "<3>ERROR monitor.loop: failed"


def test_run_logs_what_it_did_and_why_with_the_runner(tmp_path):
    standin = GitHubStandIn(token=GITHUB_TOKEN)
    standin.start()
    port = free_port()
    path = write_config(tmp_path, github_api_url=standin.base_url, extra=f"listen_port = {port}\n")
    try:
        with Daemon("run", "--config", str(path), cwd=tmp_path, env={"JOURNAL_STREAM": "1:2"}) as d:
            deadline = time.monotonic() + 30
            while len(standin.runners()) < 3:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            code, output = d.terminate()
    finally:
        standin.stop()
    assert code == 0
    lines = output.splitlines()
    assert "<6>INFO monitor.workers: creating runner 0 (ci-runner-linux.0) runner=0" in lines
    assert all(line.startswith("<") for line in lines if line), output
