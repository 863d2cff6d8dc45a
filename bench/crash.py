"""Crash safety: `kill -9` the monitor at random points during create, destroy and reserve,
against the real libvirtd, and check that after each restart it converges.

    .venv/bin/python -m bench.crash --points 20            # the full run (docs/reliability.md)
    .venv/bin/python -m bench.crash --points 5 --seed 2    # what tests/test_crash.py runs

What runs (all on 127.0.0.1 and the real libvirtd of `tests/libvirtd.sh`):

- the GitHub stand-in in a process of its own (`bench.rig.StandInProcess`), answering
  generate-jitconfig, DELETE runner and add-labels each after a delay (`GITHUB_DELAYS`), as a
  GitHub round trip does, so that each of those steps lasts long enough to be hit;
- `monitor run` as a subprocess (`tests.test_cli.Daemon`) on a data dir that survives the
  kills, with profile `crash` (`--target` runners) on `qemu:///system` and pool
  `monitor-test`. Its guests are QEMU processes (TCG, 64 MiB, no network interface: they take
  no DHCP lease) that never boot an OS: SeaBIOS finds nothing on the overlay disk and waits;
- this process plays the rest of the world: a guest's runner agent comes online once its
  guest has run for `BOOT_SECONDS`; a workflow takes a runner (`POST /profile/crash/take`,
  count 1, a fresh unique_id) every `TAKE_EVERY` seconds while a runner is Idle, and a take
  whose answer is lost (connection reset, 5xx) is sent again with the same unique_id until it
  gets one, as `curl --retry` does; once a take is answered with a runner, its job (`runs-on:
  reserved-for:<unique_id>`) goes to one runner with that label, busy for `JOB_SECONDS`, and
  then the ephemeral registration is removed, as on GitHub. `ABANDONED_PERCENT` of the jobs
  go elsewhere: their runners are destroyed when the reserve timeout of 8 s ends (destroys
  that unregister).

Each kill point aims at one phase (create, destroy and reserve in turn, shuffled): it waits
until an operation of that phase starts (the monitor's log lines `creating runner N`,
`destroying runner N`; a take sent), waits a random part of that phase's typical length (the
median of those seen), and sends SIGKILL if the operation is still in flight (else it aims at
the next one). The phases actually in flight at that moment are recorded. After the process
is gone the GitHub requests it had sent land (`SETTLE` seconds), what the crash left behind
is recorded, the workflow stops taking new runners (its retries go on), and the monitor is
started again on the same data dir. It has converged when, at one look:

- every guest `<prefix>-crash.<id>` in libvirt has a live runner row, and every live row a
  guest (no orphan guest); every registration `…@host` belongs to a guest (no orphan
  registration) and every guest has one; every overlay volume belongs to a guest (no leak);
- `/dashboard.json` shows exactly those runners, all Idle, `--target` of them; no create or
  destroy is in flight; every interrupted take has been answered.

All the time (every 0.2 s, across kills) it checks: no runner carries two `reserved-for:`
labels and no unique_id is on two runners at once (in the stand-in and in `/dashboard.json`);
no take was answered with two different runners; no runner id comes back after it was gone (its row
destroyed and nothing of it left in libvirt or GitHub), no id is created twice or below an
earlier one, no registration name is generated twice, and the store's last runner id never
goes down. A violation, or a point that does not converge within `--deadline` seconds, makes
the exit status 1.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import uuid
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from monitor import policy
from monitor.hypervisor.libvirt_hypervisor import LibvirtHypervisor
from tests.support.configs import set_settings
from tests.support.configs import write_config
from tests.support.constants import API_TOKEN
from tests.support.daemons import Daemon
from tests.support.daemons import StandInProcess
from tests.support.daemons import free_port
from tests.support.libvirtd import POOL
from tests.support.libvirtd import QEMU_GUEST_XML
from tests.support.libvirtd import URI
from tests.support.libvirtd import remove_guests
from tests.support.libvirtd import retry_transient

PROFILE = "crash"
SUFFIX = "host"  # write_config's github_api_suffix
REPO = "test/servo"  # write_config allows the prefix "test/"
PHASES = ("create", "destroy", "reserve")
# The monitor's config: GitHub's list every second, a pass every second, a runner that is not
# online 10 s after its create (or reserved 8-9 s without its job) is destroyed: longer than a
# restart, so that a take's retry finds its runner still reserved.
SETTINGS = {
    "monitor_poll_interval": "1",
    "api_cache_timeout": "1",
    "monitor_start_timeout": "10",
    "monitor_reserve_timeout": "8",
    # The stand-in reports a job's runner busy at once: no lag to wait out past the timeout.
    "github_busy_lag": "0",
}
# GitHub's round trip for the calls a create, a destroy and a take make (method, path part,
# seconds): a request lands this long after it was sent, whether its sender is alive or not.
GITHUB_DELAYS = (
    ("POST", "/generate-jitconfig", 0.3),
    ("DELETE", "/actions/runners/", 0.3),
    ("POST", "/labels", 0.4),
)
# After the kill: the requests the monitor had sent land before it starts again.
SETTLE = max(delay for _, _, delay in GITHUB_DELAYS) + 0.3
BOOT_SECONDS = 0.3
JOB_SECONDS = 1.0
ABANDONED_PERCENT = 20
TAKE_EVERY = 0.7
LOOK_EVERY = 0.2
# Seconds to converge after a restart: the slowest legitimate way is a guest that was defined
# but never started (destroyed when monitor_start_timeout ends), then its replacement.
DEADLINE = 40.0
# Until a phase has been seen to finish, how long it is assumed to last.
TYPICAL_SECONDS = {"create": 0.8, "destroy": 0.4, "reserve": 0.5}
# Ops of the aimed phase that may end before the chosen moment, before a kill lands anyway.
AIM_TRIES = 10


def without_network(template: str) -> str:
    """A domain XML without its <interface>s: no iPXE, so the guest takes no DHCP lease of the
    network other tests share (a few hundred guests a run would use its range up)."""
    root = ET.fromstring(template)
    devices = root.find("devices")
    for interface in devices.findall("interface") if devices is not None else []:
        devices.remove(interface)
    return ET.tostring(root, encoding="unicode")


# test_restart_libvirtd's guest (TCG, 64 MiB, no kernel: SeaBIOS finds nothing to boot on the
# overlay disk and waits), without its network. `{profile}` is write_config's.
GUEST_XML = without_network(QEMU_GUEST_XML)

# The monitor's log lines that start and end creates and destroys (monitor/loop.py).
LOG_EVENTS = (
    (re.compile(r"creating runner (\d+) \([^)]*\)(?: runner=\d+)?$"), "create", True),
    (re.compile(r"created runner (\d+) "), "create", False),
    (re.compile(r"creating runner (\d+) \(.*\) failed"), "create", False),
    (re.compile(r"destroying runner (\d+) \(\S+\): "), "destroy", True),
    (re.compile(r"destroyed runner (\d+)(?: runner=\d+)?$"), "destroy", False),
    (re.compile(r"destroying runner (\d+) failed"), "destroy", False),
)


class Violations:
    """What broke the rules, each said once, in order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.messages: list[str] = []

    def add(self, message: str) -> None:
        with self._lock:
            if message not in self.messages:
                self.messages.append(message)
                print(f"VIOLATION: {message}", flush=True)


class Ops:
    """Creates and destroys in flight (from the monitor's log) and takes in flight (sent by
    the workflow), with when each started; how long finished ones took."""

    def __init__(self, violations: Violations) -> None:
        self._cond = threading.Condition()
        self.in_flight: dict[tuple[str, Any], float] = {}
        self.durations: dict[str, list[float]] = defaultdict(list)
        self.counts: dict[str, int] = defaultdict(int)
        self.created: list[int] = []
        self._started: list[tuple[str, Any, float]] = []
        self._violations = violations

    def start(self, phase: str, key: Any) -> None:
        with self._cond:
            now = time.monotonic()
            self.in_flight[(phase, key)] = now
            self._started.append((phase, key, now))
            self.counts[phase] += 1
            self._cond.notify_all()

    def end(self, phase: str, key: Any) -> None:
        with self._cond:
            began = self.in_flight.pop((phase, key), None)
            if began is not None:
                self.durations[phase].append(time.monotonic() - began)

    def feed(self, line: str) -> None:
        for pattern, phase, starts in LOG_EVENTS:
            found = pattern.search(line)
            if found is None:
                continue
            runner_id = int(found.group(1))
            if phase == "create" and starts:
                self._check_new_id(runner_id)
            (self.start if starts else self.end)(phase, runner_id)
            return

    def _check_new_id(self, runner_id: int) -> None:
        if runner_id in self.created:
            self._violations.add(f"runner id {runner_id} created a second time")
        elif self.created and runner_id < max(self.created):
            self._violations.add(f"runner id {runner_id} created after {max(self.created)}")
        self.created.append(runner_id)

    def wait_for_start(self, phase: str, timeout: float) -> tuple[Any, float] | None:
        """The next operation of `phase` to start from now on: (key, start time)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            seen = len(self._started)
            while True:
                for started_phase, key, at in self._started[seen:]:
                    if started_phase == phase:
                        return key, at
                seen = len(self._started)
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def typical(self, phase: str) -> float:
        durations = self.durations[phase][-30:]
        return statistics.median(durations) if durations else TYPICAL_SECONDS[phase]

    def forget_process(self) -> dict[tuple[str, Any], float]:
        """The monitor died: its creates and destroys are no longer in flight (returned)."""
        with self._cond:
            gone = {op: at for op, at in self.in_flight.items() if op[0] != "reserve"}
            for op in gone:
                del self.in_flight[op]
            return gone

    def snapshot(self) -> dict[tuple[str, Any], float]:
        with self._cond:
            return dict(self.in_flight)


class StandIn(StandInProcess):
    """The stand-in process, with the control calls this driver needs besides rig's."""

    def set_busy(self, registration_id: int, busy: bool) -> None:
        self._control("POST", f"/runners/{registration_id}/busy", {"busy": busy})

    def finish_job(self, registration_id: int) -> None:
        self._control("POST", f"/runners/{registration_id}/finish-job", {})

    def jit_names(self) -> list[str]:
        return self._control("GET", "/jit-names")


class MonitorProcess:
    """`monitor run --config <path>` as a subprocess; its log goes to `log_path` and, line by
    line, to `on_line`."""

    def __init__(self, path: Path, log_path: Path, on_line: Callable[[str], None]) -> None:
        self.path = path
        self.log_path = log_path
        self.on_line = on_line
        self.daemon: Daemon | None = None
        self._reader: threading.Thread | None = None
        self.starts = 0

    @property
    def alive(self) -> bool:
        return self.daemon is not None and self.daemon.process.poll() is None

    def start(self) -> None:
        self.starts += 1
        with open(self.log_path, "a") as log:
            log.write(f"===== start {self.starts} =====\n")
        env = {"MONITOR_LOG_LEVEL": "INFO"}
        self.daemon = Daemon("run", "--config", str(self.path), cwd=self.path.parent, env=env)
        self._reader = threading.Thread(
            target=self._read, args=(self.daemon.process,), name="crash-monitor-log", daemon=True
        )
        self._reader.start()

    def _read(self, process: Any) -> None:
        with open(self.log_path, "a") as log:
            for line in process.stdout:  # read to the end: a full pipe would stall it
                log.write(line)
                log.flush()
                try:
                    self.on_line(line.rstrip("\n"))
                except Exception as error:  # noqa: BLE001 - keep reading
                    print(f"monitor log: {type(error).__name__}: {error}", flush=True)

    def kill(self) -> float:
        """SIGKILL; returns when it was sent (time.monotonic)."""
        assert self.daemon is not None
        at = time.monotonic()
        self.daemon.process.kill()
        self._wait()
        return at

    def stop(self) -> None:
        """SIGTERM, as at the end of the run (SIGKILL if it does not stop)."""
        if self.daemon is None:
            return
        if self.alive:
            self.daemon.process.terminate()
            try:
                self.daemon.process.wait(timeout=30)
            except subprocess.TimeoutExpired:  # a monitor that hangs is killed
                self.daemon.process.kill()
        self._wait()

    def _wait(self) -> None:
        assert self.daemon is not None
        self.daemon.process.wait()
        if self._reader is not None:
            self._reader.join(10)


@dataclass
class State:
    """One look at libvirt, GitHub (the stand-in) and the store, by runner id."""

    guests: dict[int, bool]  # id -> running
    volumes: set[int]
    registrations: dict[int, dict[str, Any]]
    live_rows: set[int] | None  # None: the store was not read (the monitor is down)
    destroyed_rows: set[int] | None
    last_id: int | None

    @property
    def reserved_for(self) -> dict[int, list[str]]:
        """The unique_ids in each registration's `reserved-for:` labels."""
        return {
            runner_id: reservations(label["name"] for label in registration["labels"])
            for runner_id, registration in self.registrations.items()
        }


def reservations(labels: Any) -> list[str]:
    prefix = f"{policy.RESERVED_FOR}:"
    return [label[len(prefix) :] for label in labels if label.startswith(prefix)]


@dataclass
class Point:
    number: int
    aimed: str
    hit: str = ""
    into_op: float | None = None
    left: str = ""
    takes: str = ""
    converged_in: float | None = None
    why_not: str = ""
    aiming: float = 0.0  # seconds from the load's start to the kill


@dataclass
class Report:
    points: list[Point] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    warm_up: float = 0.0
    log_path: Path = Path("monitor.log")  # in the run's directory, with takes.log

    @property
    def phases_hit(self) -> set[str]:
        return {phase for point in self.points for phase in point.hit.split("+") if phase}

    def table(self) -> str:
        rows = [
            "| # | aimed at | in flight at the kill | into the op | left behind | "
            "interrupted takes, answered after the restart | converged in |",
            "|---|---|---|---|---|---|---|",
        ]
        for p in self.points:
            into = "" if p.into_op is None else f"{p.into_op * 1000:.0f} ms"
            done = f"{p.converged_in:.1f} s" if p.converged_in is not None else f"NO: {p.why_not}"
            rows.append(
                f"| {p.number} | {p.aimed} | {p.hit or 'nothing'} | {into} | {p.left or '-'} "
                f"| {p.takes or '-'} | {done} |"
            )
        return "\n".join(rows)


@dataclass(eq=False)
class World:
    """This process's view of everything, and its part in it: the runner agents, the jobs,
    the workflows taking runners, and the checks."""

    prefix: str
    port: int
    standin: StandIn
    hypervisor: LibvirtHypervisor
    store: Path
    take_log: Path
    monitor: MonitorProcess
    ops: Ops
    violations: Violations
    rng: random.Random
    taking: threading.Event = field(default_factory=threading.Event)
    stopping: threading.Event = field(default_factory=threading.Event)
    state: State | None = None
    dashboard: dict[str, Any] | None = None
    answers: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))
    retries: dict[str, str] = field(default_factory=dict)  # unique_id -> run_id: send again

    def __post_init__(self) -> None:
        self._running_since: dict[str, float] = {}
        self._job_ends: dict[int, float] = {}
        self._jobs: set[str] = set()  # unique_ids whose job was given to a runner
        self._dead: set[int] = set()
        self._last_id: int | None = None
        self._label_owners: dict[str, set[int]] = defaultdict(set)
        self._run_id = 1000
        self._threads = [
            threading.Thread(target=self._look_loop, name="crash-world", daemon=True),
            threading.Thread(target=self._take_loop, name="crash-workflows", daemon=True),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self.stopping.set()
        for thread in self._threads:
            thread.join(30)

    # Looking --------------------------------------------------------------------------------

    def look(self) -> State:
        # The store first: a row is marked destroyed only once its guest and registration
        # are gone, so what is read after it cannot be older than that.
        live, destroyed, last_id = self._read_store()
        guests: dict[int, bool] = {}
        for guest in retry_transient(lambda: self.hypervisor.list_guests(self.prefix + "-")):
            parsed = policy.parse_guest_name(guest.name, self.prefix)
            if parsed is not None and parsed[0] == PROFILE:
                guests[parsed[1]] = guest.active
        volumes = set()
        for volume in retry_transient(lambda: self.hypervisor.list_volumes(self.prefix + "-")):
            parsed = policy.parse_guest_name(volume.removesuffix(".qcow2"), self.prefix)
            if parsed is not None and parsed[0] == PROFILE:
                volumes.add(parsed[1])
        registrations = {}
        for registration in self.standin.runners():
            parsed = policy.parse_registration_name(registration["name"], self.prefix, SUFFIX)
            if parsed is not None and parsed[0] == PROFILE:
                registrations[parsed[1]] = registration
        return State(guests, volumes, registrations, live, destroyed, last_id)

    def _read_store(self) -> tuple[set[int] | None, set[int] | None, int | None]:
        """Read only while the monitor runs, read-only: the recovery of a store left by a
        kill is the restarted monitor's to do."""
        if not self.monitor.alive or not self.store.exists():
            return None, None, None
        try:
            connection = sqlite3.connect(f"file:{self.store}?mode=ro", uri=True, timeout=5)
            try:
                rows = connection.execute("SELECT id, destroyed_at FROM runner").fetchall()
                last = connection.execute(
                    "SELECT value FROM setting WHERE key = 'last_runner_id'"
                ).fetchone()
            finally:
                connection.close()
        except sqlite3.Error:
            return None, None, None  # not created yet, or the monitor died meanwhile
        live = {runner_id for runner_id, destroyed_at in rows if destroyed_at is None}
        destroyed = {runner_id for runner_id, destroyed_at in rows if destroyed_at is not None}
        return live, destroyed, None if last is None else int(last[0])

    def _read_dashboard(self) -> dict[str, Any] | None:
        if not self.monitor.alive:
            return None
        try:
            status, body = self._request("GET", "/dashboard.json", timeout=2)
        except (OSError, http.client.HTTPException):
            return None
        return body if status == 200 else None

    def _request(self, method: str, path: str, timeout: float = 30) -> tuple[int, Any]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request(method, path, headers={"Authorization": f"Bearer {API_TOKEN}"})
            response = connection.getresponse()
            raw = response.read()
        finally:
            connection.close()
        try:
            return response.status, json.loads(raw) if raw else None
        except ValueError:
            return response.status, raw.decode(errors="replace")

    def _look_loop(self) -> None:
        while not self.stopping.wait(LOOK_EVERY):
            try:
                state = self.look()
                dashboard = self._read_dashboard()
                self.check(state, dashboard)
                self.state, self.dashboard = state, dashboard
                self.play_agents_and_jobs(state)
            except Exception as error:  # noqa: BLE001 - the next look tries again
                print(f"world: {type(error).__name__}: {error}", flush=True)

    # The checks that hold at every moment ----------------------------------------------------

    def check(self, state: State, dashboard: dict[str, Any] | None) -> None:
        """The rules that hold at every moment. A unique_id may move from one runner to
        another (its first runner's reservation timed out and it was destroyed before the
        take was asked again), but never be on two at once."""
        views = {"GitHub": state.reserved_for}
        if dashboard is not None:
            views["/dashboard.json"] = {
                entry["id"]: reservations(
                    label["name"] for label in entry["runner"]["registration"]["labels"]
                )
                for entry in dashboard["runners"]
                if entry["runner"]["registration"] is not None
            }
        for view, reserved in views.items():
            owners: dict[str, list[int]] = defaultdict(list)
            for runner_id, unique_ids in reserved.items():
                if len(unique_ids) > 1:
                    self.violations.add(f"{view}: runner {runner_id} reserved for {unique_ids}")
                for unique_id in unique_ids:
                    owners[unique_id].append(runner_id)
                    self._label_owners[unique_id].add(runner_id)
            for unique_id, runner_ids in owners.items():
                if len(runner_ids) > 1:
                    answered = sorted(self.answers.get(unique_id, ()))
                    self.violations.add(
                        f"{view}: unique_id {unique_id} reserved on runners {sorted(runner_ids)} "
                        f"at once (the take was answered with {answered})"
                    )
        if state.live_rows is None or state.destroyed_rows is None:
            return
        present = set(state.guests) | set(state.registrations) | state.volumes | state.live_rows
        for runner_id in sorted(present & self._dead):
            self.violations.add(f"runner id {runner_id} is back after it was gone")
        self._dead |= state.destroyed_rows - present
        if state.last_id is not None:
            if self._last_id is not None and state.last_id < self._last_id:
                self.violations.add(
                    f"the store's last runner id went down from {self._last_id} to {state.last_id}"
                )
            self._last_id = state.last_id

    def check_registration_names(self) -> None:
        names = self.standin.jit_names()
        for name in sorted({name for name in names if names.count(name) > 1}):
            self.violations.add(f"registration {name} was generated {names.count(name)} times")

    # GitHub's and the guests' part -----------------------------------------------------------

    def play_agents_and_jobs(self, state: State) -> None:
        """A running guest's agent comes online after BOOT_SECONDS; a runner reserved for a
        job gets it (unless the job went elsewhere), and when the job ends its ephemeral
        registration is removed."""
        now = time.monotonic()
        running = {runner_id for runner_id, active in state.guests.items() if active}
        for runner_id in running:
            self._running_since.setdefault(self._name(runner_id), now)
        for runner_id, registration in state.registrations.items():
            try:
                self._play(runner_id, registration, runner_id in running, now)
            except urllib.error.HTTPError as error:
                if error.code != 404:  # gone meanwhile (the monitor unregistered it)
                    raise

    def _play(self, runner_id: int, registration: dict[str, Any], running: bool, now: float):
        registration_id = registration["id"]
        if registration["busy"]:
            if now >= self._job_ends.get(registration_id, now):
                self.standin.finish_job(registration_id)
            return
        if not running:
            return
        if registration["status"] == "offline":
            if now - self._running_since[self._name(runner_id)] >= BOOT_SECONDS:
                self.standin.set_status(registration_id, "online")
            return
        # The job that waits for `reserved-for:<unique_id>` is queued once its workflow got
        # the take's answer; GitHub gives it to one runner with that label.
        waiting = reservations(label["name"] for label in registration["labels"])
        for unique_id in waiting:
            if self.answers.get(unique_id) and unique_id not in self._jobs:
                if not self._abandoned(unique_id):
                    self._jobs.add(unique_id)
                    self.standin.set_busy(registration_id, True)
                    self._job_ends[registration_id] = now + JOB_SECONDS
                return

    def _abandoned(self, unique_id: str) -> bool:
        return uuid.UUID(unique_id).int % 100 < ABANDONED_PERCENT

    def _name(self, runner_id: int) -> str:
        return policy.guest_name(self.prefix, PROFILE, runner_id)

    # The workflows ----------------------------------------------------------------------------

    def _take_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                self._take_step()
            except Exception as error:  # noqa: BLE001 - the workflows go on
                print(f"workflows: {type(error).__name__}: {error}", flush=True)
                self.stopping.wait(1)

    def _take_step(self) -> None:
        """Send a take again whose answer was lost, or (while taking) a new one."""
        if self.retries:
            unique_id, run_id = next(iter(self.retries.items()))
            self.take(unique_id, run_id)
            self.stopping.wait(0.3)
            return
        dashboard = self.dashboard
        idle = [r for r in (dashboard or {}).get("runners", []) if r["status"] == "Idle"]
        if self.taking.is_set() and idle and self.monitor.alive:
            self._run_id += 1
            unique_id = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
            self.take(unique_id, str(self._run_id))
        self.stopping.wait(TAKE_EVERY * self.rng.uniform(0.5, 1.5))

    def take(self, unique_id: str, run_id: str) -> None:
        query = urlencode({"unique_id": unique_id, "qualified_repo": REPO, "run_id": run_id})
        self.ops.start("reserve", unique_id)
        try:
            status, body = self._request("POST", f"/profile/{PROFILE}/take?{query}")
        except (OSError, http.client.HTTPException) as error:
            # The monitor died under it (or is not up yet): no answer, ask again.
            self.retries[unique_id] = run_id
            self._log_take(unique_id, run_id, f"{type(error).__name__}: {error}")
            return
        finally:
            self.ops.end("reserve", unique_id)
        self._log_take(unique_id, run_id, f"{status} {json.dumps(body)[:200]}")
        if status == 200:
            self.retries.pop(unique_id, None)
            given = {entry["id"] for entry in body or []}
            self.answers[unique_id] |= given
            if len(self.answers[unique_id]) > 1:
                self.violations.add(
                    f"take {unique_id} was answered with runners {sorted(self.answers[unique_id])}"
                )
        elif status >= 500:
            self.retries[unique_id] = run_id  # as curl --retry
        else:
            self.retries.pop(unique_id, None)
            self.violations.add(f"take {unique_id}: HTTP {status}: {body}")

    def _log_take(self, unique_id: str, run_id: str, outcome: str) -> None:
        with open(self.take_log, "a") as log:
            log.write(f"{time.strftime('%H:%M:%S')} take {unique_id} run {run_id}: {outcome}\n")

    def label_owners(self, unique_id: str) -> set[int]:
        return set(self._label_owners.get(unique_id, ()))

    # Convergence ------------------------------------------------------------------------------

    def not_converged(self, target: int) -> list[str]:
        """Why the last look is not a converged state (empty: it is)."""
        state, dashboard = self.state, self.dashboard
        if state is None or state.live_rows is None or dashboard is None:
            return ["the monitor is not serving yet"]
        guests, rows = set(state.guests), state.live_rows
        registrations = set(state.registrations)
        shown = {entry["id"]: entry["status"] for entry in dashboard["runners"]}
        checks = [
            (guests - rows, "guests without a runner row (orphans)"),
            (rows - guests, "live runner rows without a guest"),
            (registrations - guests, "registrations without a guest (orphans)"),
            (guests - registrations, "guests without a registration"),
            (state.volumes - guests, "volumes without a guest (leaked)"),
            ({i for i, running in state.guests.items() if not running}, "guests not running"),
            (set(shown) ^ guests, "runners /dashboard.json and libvirt disagree on"),
            ({i for i, status in shown.items() if status != "Idle"}, "runners not Idle"),
        ]
        reasons = [f"{what}: {sorted(ids)}" for ids, what in checks if ids]
        if len(guests) != target:
            reasons.append(f"{len(guests)} runners, not {target}")
        in_flight = [f"{phase} {key}" for phase, key in self.ops.snapshot()]
        if in_flight:
            reasons.append(f"in flight: {in_flight}")
        if self.retries:
            reasons.append(f"takes to send again: {len(self.retries)}")
        return reasons


def describe_left(killed: dict[tuple[str, Any], float], takes: list[str], state: State) -> str:
    """What each operation the kill interrupted had left in GitHub, libvirt and the store."""
    parts = []
    for phase, runner_id in sorted(killed):
        found = []
        if runner_id in state.registrations:
            found.append("registration")
        if runner_id in state.volumes:
            found.append("volume")
        if runner_id in state.guests:
            found.append("guest " + ("running" if state.guests[runner_id] else "defined"))
        parts.append(f"{phase} {runner_id}: {'+'.join(found) or 'nothing'}")
    for unique_id in takes:
        owners = sorted(
            runner_id
            for runner_id, unique_ids in state.reserved_for.items()
            if unique_id in unique_ids
        )
        where = f"labels on {owners}" if owners else "no labels"
        parts.append(f"take {unique_id[:8]}: {where}")
    return "; ".join(parts)


def describe_takes(world: World, takes: list[str]) -> str:
    parts = []
    for unique_id in takes:
        given = sorted(world.answers.get(unique_id, ()))
        owners = sorted(world.label_owners(unique_id))
        answer = f"runner {given[0]}" if len(given) == 1 else "null" if not given else str(given)
        extra = "" if not owners or owners == given else f" (labels on {owners})"
        parts.append(f"{unique_id[:8]} → {answer}{extra}")
    return "; ".join(parts)


def wait_converged(world: World, target: int, deadline: float) -> tuple[float | None, str]:
    """Seconds until a look shows a converged state, or (None, why not) after `deadline`."""
    started = time.monotonic()
    reasons: list[str] = []
    while time.monotonic() - started < deadline:
        world.state = None  # a look taken after this call, not a stale one
        while world.state is None and not world.stopping.is_set():
            time.sleep(0.05)
        reasons = world.not_converged(target)
        if not reasons:
            return time.monotonic() - started, ""
        time.sleep(LOOK_EVERY)
    return None, "; ".join(reasons)


def balanced_phases(points: int, rng: random.Random) -> list[str]:
    phases = [PHASES[i % len(PHASES)] for i in range(points)]
    rng.shuffle(phases)
    return phases


def run(
    points: int = 20,
    *,
    seed: int | None = None,
    target: int = 3,
    deadline: float = DEADLINE,
    root: Path | None = None,
    out: Callable[[str], None] = print,
) -> Report:
    """The whole crash run; the report says what happened at each point and what broke."""
    seed = random.randrange(1 << 30) if seed is None else seed
    # The phases and the kill moments from one generator, the workflows' takes from another
    # (their thread draws as the timing goes): the same seed aims at the same phases.
    rng, workflow_rng = random.Random(seed), random.Random(seed + 1)
    phases = balanced_phases(points, rng)
    temporary = root is None
    root = Path(tempfile.mkdtemp(prefix="monitor-crash-")) if root is None else root
    root.mkdir(parents=True, exist_ok=True)
    prefix = f"crash{uuid.uuid4().hex[:6]}"
    out(f"crash run: {points} points, seed {seed}, guests {prefix}-{PROFILE}.<id>, in {root}")
    report = Report(log_path=root / "monitor.log")
    violations = Violations()
    ops = Ops(violations)
    began = time.monotonic()
    hypervisor = LibvirtHypervisor(URI, POOL)
    standin = StandIn()
    monitor: MonitorProcess | None = None
    world: World | None = None
    try:
        for method, path, delay in GITHUB_DELAYS:
            standin.inject_fault(None, count=10**9, method=method, path_contains=path, delay=delay)
        port = free_port()
        path = write_config(
            root,
            github_api_url=standin.url,
            targets={PROFILE: target},
            extra=(
                f"listen_port = {port}\n"
                f'libvirt_runner_guest_prefix = "{prefix}"\n'
                f'libvirt_rebuild_guest_prefix = "{prefix}-rebuild"\n'
                f'libvirt_template_guest_prefix = "{prefix}-template"\n'
            ),
            guest_xml=GUEST_XML,
            libvirt_uri=URI,
            storage_pool=POOL,
        )
        set_settings(path, SETTINGS)
        monitor = MonitorProcess(path, report.log_path, ops.feed)
        store = root / "data" / "monitor.sqlite3"
        world = World(
            prefix,
            port,
            standin,
            hypervisor,
            store,
            root / "takes.log",
            monitor,
            ops,
            violations,
            workflow_rng,
        )
        monitor.start()
        world.start()
        report.warm_up, why = wait_converged(world, target, deadline)
        if report.warm_up is None:
            raise SystemExit(f"the monitor never came up with {target} Idle runners: {why}")
        out(f"warm-up: {target} runners Idle after {report.warm_up:.1f} s")
        for number, aimed in enumerate(phases, start=1):
            point = kill_once(number, aimed, world, monitor, ops, rng, target, deadline)
            report.points.append(point)
            out(
                f"point {number} ({point.aiming:.1f} s to aim): aimed {aimed}, "
                f"hit {point.hit or 'nothing'}, left "
                f"{point.left or '-'}, takes {point.takes or '-'}, converged "
                + (f"in {point.converged_in:.1f} s" if point.converged_in is not None else "NO")
            )
            if point.converged_in is None:
                violations.add(f"point {number} did not converge in {deadline} s: {point.why_not}")
        world.check_registration_names()
    finally:
        if world is not None:
            world.stop()
        if monitor is not None:
            monitor.stop()
        left = retry_transient(lambda: remove_guests(hypervisor, prefix + "-"))
        if left:
            violations.add(f"left in libvirt after the run: {left}")
        hypervisor.close()
        standin.stop()
        report.violations = list(violations.messages)
        report.counts = dict(ops.counts)
        report.seconds = time.monotonic() - began
        if temporary and not report.violations:
            shutil.rmtree(root, ignore_errors=True)
    return report


def kill_once(
    number: int,
    aimed: str,
    world: World,
    monitor: MonitorProcess,
    ops: Ops,
    rng: random.Random,
    target: int,
    deadline: float,
) -> Point:
    """One kill point: aim, kill, look at what was left, restart, wait for convergence."""
    point = Point(number, aimed)
    began = time.monotonic()
    world.taking.set()
    # A random moment of the op's typical length after it started, if an op of that phase is
    # still in flight then (creates and destroys come in bursts); else the next one is aimed at.
    for _ in range(AIM_TRIES):
        started = ops.wait_for_start(aimed, timeout=60)
        if started is None:
            shown = [(r["id"], r["status"]) for r in (world.dashboard or {}).get("runners", [])]
            print(f"no {aimed} began within 60 s; runners {shown}, retries {world.retries}")
            break
        time.sleep(max(0.0, started[1] + rng.uniform(0, ops.typical(aimed)) - time.monotonic()))
        if any(phase == aimed for phase, _ in ops.snapshot()):
            break
    in_flight = ops.snapshot()
    killed_at = monitor.kill()
    world.taking.clear()
    point.aiming = killed_at - began
    aimed_starts = [at for (phase, _), at in in_flight.items() if phase == aimed]
    if aimed_starts:
        point.into_op = killed_at - min(aimed_starts)
    point.hit = "+".join(sorted({phase for phase, _ in in_flight}))
    killed = ops.forget_process()
    takes = [key for phase, key in in_flight if phase == "reserve"]
    time.sleep(SETTLE)
    point.left = describe_left(killed, takes, world.look())
    monitor.start()
    point.converged_in, point.why_not = wait_converged(world, target, deadline)
    point.takes = describe_takes(world, takes)
    return point


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=20, help="kills (default 20)")
    parser.add_argument("--seed", type=int, help="for the phases and the timing (default: random)")
    parser.add_argument("--target", type=int, default=3, help="runners of profile crash")
    parser.add_argument(
        "--deadline", type=float, default=DEADLINE, help="seconds to converge after a restart"
    )
    parser.add_argument("--dir", type=Path, help="keep the config, store and monitor log here")
    args = parser.parse_args(argv)
    report = run(
        args.points, seed=args.seed, target=args.target, deadline=args.deadline, root=args.dir
    )
    print()
    print(report.table())
    times = [p.converged_in for p in report.points if p.converged_in is not None]
    print()
    print(
        f"phases hit: {', '.join(sorted(report.phases_hit)) or 'none'}; operations seen: "
        + ", ".join(f"{count} {phase}" for phase, count in sorted(report.counts.items()))
    )
    if times:
        print(
            f"converged: {len(times)}/{len(report.points)}, "
            f"median {statistics.median(times):.1f} s, max {max(times):.1f} s; "
            f"whole run {report.seconds:.0f} s"
        )
    if report.violations:
        print(f"FAIL: {len(report.violations)} violation(s); logs in {report.log_path.parent}")
        for message in report.violations:
            print(f"  - {message}")
        return 1
    print("PASS: no orphan guest, registration or volume; no double reservation; no id reused")
    return 0


if __name__ == "__main__":
    sys.exit(main())
