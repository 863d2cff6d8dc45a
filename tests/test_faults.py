"""Fault injection: the monitor under GitHub, libvirt, disk and SQLite faults (issue [5/6]).

Each case runs a whole monitor in this process: its thread and workers, the APScheduler jobs,
the web app on waitress, `RestGitHub` against the GitHub stand-in over HTTP and libvirt (a
private test-driver node, or the real libvirtd). It brings the pool to a steady state (three
runners, one of them reserved by a take), injects one fault while a job ends, and checks:

- during the fault the process stays up and its read endpoints keep answering 200, probed
  over and over from another thread;
- retries back off: the gaps between them, measured from the stand-in's request log (or the
  libvirt wrapper's), grow exponentially to a cap, or follow GitHub's Retry-After /
  X-RateLimit-Reset when that is longer;
- once the fault ends it recovers by itself: the pool is back at its target, every libvirt
  guest, overlay volume, store row and GitHub registration belongs to one runner (nothing
  leaked), and the reservation is still there (its labels on GitHub, Reserved on
  /dashboard.json, the same runner for a retried take).

Timings are scaled down so that the suite takes under two minutes (see `BACKOFF_BASE`); the
production values are in docs/reliability.md. Each case appends its row (fault, duration,
outcome, time to recover, what was measured) to test-artifacts/reliability.json;
`python -m tests.test_faults` prints the newest rows as docs/reliability.md's table.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from dataclasses import replace
from datetime import UTC
from datetime import datetime
from datetime import timedelta
from pathlib import Path
from typing import Any

import libvirt
import pytest

from monitor import loop
from monitor import models
from monitor import ratelimit
from monitor import registrations
from monitor import scheduler as scheduler_module
from monitor import web
from monitor.github import RestGitHub
from monitor.hypervisor.libvirt_hypervisor import LibvirtHypervisor
from monitor.serving import BackgroundServer
from monitor.standin import GitHubStandIn
from tests.support import served
from tests.support.configs import config_for_test_driver
from tests.support.constants import GITHUB_TOKEN
from tests.support.constants import ROOT
from tests.support.libvirtd import LIBVIRTD_PID
from tests.support.libvirtd import POOL
from tests.support.libvirtd import URI
from tests.support.served import request
from tests.support.served import take
from tests.support.under_pytest import require_libvirtd
from tests.support.under_pytest import standin_fixtures
from tests.support.waiting import wait_until

ARTIFACT = ROOT / "test-artifacts" / "reliability.json"
LIST_PATH = "/repos/test/servo/actions/runners"
JIT_PATH = LIST_PATH + "/generate-jitconfig"

# Production backs the runner list off 10 s, 20 s, … 5 min, and creates and destroys 5 s, …
# 5 min; here both go 0.2, 0.4, 0.8, 0.8 s. The scheduler looks whether the list is due every
# 50 ms (1 s in production) and a pass runs every 50 ms (monitor_poll_interval, 5 s), so
# the gaps measured are the back-off's and not the polling's.
BACKOFF_BASE = 0.2
BACKOFF_CAP = 0.8
CHECK_EVERY = 0.05
POLL = 0.05
CACHE_TIMEOUT = 1  # api_cache_timeout: the runner list is fetched every second when healthy
# How late a retry may come: the scheduler's 50 ms, a pass, and a loaded CI machine.
SLACK = 0.5
TARGET = 3  # runners of profile linux: one gets reserved, one ends its job during the fault
DURATION = 3.2  # seconds a fault lasts: long enough for the back-off to reach its cap
FOREVER = 1_000_000  # a fault's count: until it is cleared
READS = ("/dashboard.json", "/healthz", "/policy/override", "/")
READ_LIMIT = 5.0  # the slowest a read may answer during a fault
RECOVERY_LIMIT = 30.0
RUN_ID = 31000000000

server, standin = standin_fixtures(GITHUB_TOKEN)


# The rig -------------------------------------------------------------------------------------


@dataclass
class Rig(served.Rig):
    """The end-to-end tests' rig, with the scheduler running too."""

    scheduler: Any = None
    reservations: dict[str, int] = field(default_factory=dict)  # unique_id -> runner id


def fast_backoff() -> ratelimit.Backoff:
    base, cap = timedelta(seconds=BACKOFF_BASE), timedelta(seconds=BACKOFF_CAP)
    return ratelimit.Backoff(base=base, cap=cap)


@pytest.fixture
def start_rig(standin: GitHubStandIn, monkeypatch: pytest.MonkeyPatch):
    """`start(config, hypervisor)`: a running monitor, brought to the steady state."""
    monkeypatch.setattr(registrations, "GITHUB_BACKOFF_BASE", timedelta(seconds=BACKOFF_BASE))
    monkeypatch.setattr(registrations, "GITHUB_BACKOFF_CAP", timedelta(seconds=BACKOFF_CAP))
    monkeypatch.setattr(scheduler_module, "REGISTRATIONS_CHECK_SECONDS", CHECK_EVERY)
    rigs: list[Rig] = []

    def start(
        config: Any,
        hypervisor: LibvirtHypervisor,
        github: GitHubStandIn = standin,
        *,
        github_timeout: float = 10.0,
    ) -> Rig:
        config = replace(
            config,
            api_cache_timeout=timedelta(seconds=CACHE_TIMEOUT),
            monitor_poll_interval=timedelta(seconds=POLL),
        )
        models.open_store(config.data_path)
        client = RestGitHub(
            config.github_api_url,
            config.github_api_scope,
            config.github_token,
            timeout=github_timeout,
        )
        monitor = loop.Monitor(config, client, hypervisor)
        monitor.workers.create_backoff = fast_backoff()
        monitor.workers.destroy_backoff = fast_backoff()
        github.agent_online_after = 0.1  # every new runner's agent connects at once
        monitor.start()
        scheduler = scheduler_module.make_scheduler(monitor)
        scheduler.start()
        http = BackgroundServer(web.make_app(config, monitor), threads=16, name="faults-http")
        rig = Rig(config, github, hypervisor, monitor, http, scheduler)
        rigs.append(rig)
        wait_until(lambda: all_idle(rig), "every runner idle", timeout=60)
        reserve(rig)
        wait_until(lambda: settled(rig), "the steady state", timeout=60)
        return rig

    yield start
    for rig in rigs:
        rig.http.close()
        rig.scheduler.shutdown(wait=True)
        rig.monitor.stop()
        rig.hypervisor.close()
    models.close_store()


@pytest.fixture
def driver_config(tmp_path: Path, standin: GitHubStandIn) -> Any:
    """A config for libvirt's test driver on a private node."""
    return config_for_test_driver(tmp_path, standin.base_url, {"linux": TARGET})


def driver_hypervisor(config: Any) -> LibvirtHypervisor:
    return LibvirtHypervisor(config.libvirt_uri, config.libvirt_storage_pool)


def all_idle(rig: Rig) -> bool:
    """Every runner Idle, and every create reported back: the stand-in's agents connect at
    once, so a runner shows Idle while its create worker is still finishing, and a take
    passes over it until then."""
    observation = rig.monitor.observation
    return (
        rig.monitor.workers.idle()
        and observation is not None
        and all(counts.idle == counts.target for counts in observation.counts.values())
    )


def reserve(rig: Rig) -> int:
    """Take a runner as a workflow job does; returns its id."""
    unique_id = str(uuid.uuid4())
    reply = take(rig.port, unique_id, RUN_ID + len(rig.reservations))
    assert reply.status == 200 and reply.json, reply
    runner_id = reply.json[0]["id"]
    rig.reservations[unique_id] = runner_id
    return runner_id


def inventory(rig: Rig) -> dict[str, set[str]]:
    """The runners each place knows, by guest name."""
    prefix = rig.monitor.runner_prefix + "-"
    suffix = "@" + rig.config.github_api_suffix
    return {
        "libvirt guests": {guest.name for guest in rig.hypervisor.list_guests(prefix)},
        "overlay volumes": {
            volume.removesuffix(".qcow2") for volume in rig.hypervisor.list_volumes(prefix)
        },
        "store": {row.guest_name for row in models.live_runners()},
        "GitHub registrations": {
            r["name"].removesuffix(suffix)
            for r in rig.standin.runners()
            if r["name"].endswith(suffix)
        },
    }


def settled(rig: Rig, since: datetime | None = None) -> bool:
    """At the target with every reservation, nothing in flight, no error, nothing leaked
    (a pass after `since`)."""
    monitor = rig.monitor
    observation = monitor.observation
    if observation is None or monitor.registrations.error or observation.error:
        return False
    if not monitor.workers.idle():
        return False
    if since is not None and observation.at <= since:
        return False
    for profile, counts in observation.counts.items():
        reserved = len(rig.reservations) if profile == "linux" else 0  # takes are of linux
        if (counts.idle, counts.reserved, counts.healthy) != (
            counts.target - reserved,
            reserved,
            counts.target,
        ):
            return False
    places = inventory(rig)
    return all(names == places["store"] for names in places.values())


def describe(rig: Rig) -> str:
    observation = rig.monitor.observation
    return (
        f"counts={observation.counts if observation else None} "
        f"error={observation.error if observation else None} "
        f"github_error={rig.monitor.registrations.error} in_flight={rig.monitor.in_flight} "
        f"inventory={inventory(rig)}"
    )


def finish_a_job(rig: Rig) -> int:
    """An idle runner's job ends (its ephemeral registration goes): work for the monitor.
    Returns the registration's id."""
    reserved = set(rig.reservations.values())

    def an_idle_runner() -> Any:
        return next(
            (
                r
                for r in rig.monitor.observation.runners
                if r.profile == "linux" and r.status.value == "Idle" and r.id not in reserved
            ),
            None,
        )

    # The idle runner may still be in the pass before its create reported back; the message
    # says what the monitor saw if none comes.
    try:
        runner = wait_until(an_idle_runner, "an idle runner", timeout=30)
    except AssertionError as error:
        raise AssertionError(f"{error}: {describe(rig)}") from None
    rig.standin.finish_job(runner.registration.id)
    return runner.registration.id


def healthz(rig: Rig) -> dict[str, Any]:
    reply = request(rig.port, "GET", "/healthz", timeout=READ_LIMIT)
    assert reply.status == 200, reply
    return reply.json


# A fault, from its start to the recovery -----------------------------------------------------


class Probe:
    """Reads every read endpoint over and over from a thread, and checks that the monitor's
    threads are alive, while a fault lasts."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.replies: list[tuple[str, Any, float]] = []
        self.health: list[dict[str, Any]] = []  # what /healthz said
        self.dead: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="faults-probe", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            for path in READS:
                started = time.monotonic()
                try:
                    reply = request(self.rig.port, "GET", path, timeout=READ_LIMIT)
                    status: Any = reply.status
                    if path == "/healthz" and status == 200:
                        self.health.append(reply.json)
                except OSError as error:
                    status = repr(error)
                self.replies.append((path, status, time.monotonic() - started))
            if not self.rig.monitor.is_alive():
                self.dead.append("monitor thread")
            if not self.rig.scheduler.running:
                self.dead.append("scheduler")

    def stop(self) -> str:
        """Stop, check, and say what was seen."""
        self._stop.set()
        self._thread.join(READ_LIMIT * len(READS) + 5)
        assert not self.dead, self.dead
        failed = [(path, status) for path, status, _ in self.replies if status != 200]
        assert self.replies and not failed, failed[:10]
        slowest = max(seconds for _, _, seconds in self.replies)
        assert slowest < READ_LIMIT
        return f"{len(self.replies)} reads all 200 (slowest {slowest:.2f} s)"

    def shown(self, word: str) -> list[str]:
        """What /healthz said that has `word` in it."""
        return sorted({str(v) for health in self.health for v in health.values() if word in str(v)})


@dataclass
class Fault:
    rig: Rig
    row: dict[str, Any]
    began: float = field(default_factory=time.monotonic)
    began_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    probe: Probe | None = None
    ended: float = 0.0
    finished: int = 0  # the registration of the runner whose job ended

    def start(self) -> Fault:
        """Call right after injecting the fault: a job ends, and the reads are probed."""
        self.finished = finish_a_job(self.rig)
        self.probe = Probe(self.rig)
        return self

    def end(self, ended: float | None = None) -> dict[str, float]:
        """Call right after the fault ends (at `ended`, monotonic, if that was earlier):
        stop probing, wait for the recovery, check it. Returns when (s after the end) GitHub
        answered again (`github`), a pass worked (`pass`) and all was well (`settled`)."""
        self.ended = time.monotonic() if ended is None else ended
        ended_at = datetime.now(UTC) - timedelta(seconds=time.monotonic() - self.ended)
        self.row["duration_s"] = round(self.ended - self.began, 1)
        assert self.probe is not None
        self.row["reads"] = self.probe.stop()
        marks: dict[str, float] = {}
        deadline = self.ended + RECOVERY_LIMIT
        while "settled" not in marks:
            now = time.monotonic()
            observation = self.rig.monitor.observation
            if "github" not in marks and self.rig.monitor.registrations.error is None:
                marks["github"] = now - self.ended
            if "pass" not in marks and observation.error is None and observation.at > ended_at:
                marks["pass"] = now - self.ended
            if settled(self.rig, ended_at):
                marks["settled"] = now - self.ended
            assert now < deadline, f"not recovered in {RECOVERY_LIMIT} s: {describe(self.rig)}"
            time.sleep(0.02)
        self.row["recover_s"] = round(marks["settled"], 2)
        check_reservations(self.rig)
        return marks

    def events(self, kind: str) -> list[models.Event]:
        return [
            event
            for event in models.recent_events(10_000)
            if event.kind == kind and event.at >= self.began_at
        ]


def check_reservations(rig: Rig) -> None:
    """Every reservation survived: its labels on GitHub, Reserved on /dashboard.json, in the
    store, and a retried take gets the same runner."""
    dashboard = request(rig.port, "GET", "/dashboard.json").json
    status = {entry["id"]: entry["status"] for entry in dashboard["runners"]}
    suffix = "@" + rig.config.github_api_suffix
    labels = {
        r["name"].removesuffix(suffix): {label["name"] for label in r["labels"]}
        for r in rig.standin.runners()
    }
    prefix = rig.monitor.runner_prefix
    for number, (unique_id, runner_id) in enumerate(rig.reservations.items()):
        assert status.get(runner_id) == "Reserved", (runner_id, status)
        assert f"reserved-for:{unique_id}" in labels[f"{prefix}-linux.{runner_id}"], labels
        assert models.get_reservation(unique_id) is not None, unique_id
        again = take(rig.port, unique_id, RUN_ID + number)
        assert again.status == 200 and [e["id"] for e in again.json] == [runner_id], again


def gaps(times: list[float]) -> list[float]:
    times = sorted(times)
    return [round(b - a, 2) for a, b in zip(times, times[1:], strict=False)]


def assert_backs_off(spacing: list[float], *, floor: float = 0.0, extra: float = 0.0) -> None:
    """Retry gaps: each at least the back-off (BACKOFF_BASE doubling up to BACKOFF_CAP, or
    `floor` when GitHub asked for longer), and not much more (`extra`: a request's own time,
    such as a client timeout)."""
    assert len(spacing) >= 2, spacing
    for attempt, gap in enumerate(spacing):
        wanted = max(floor, min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt))
        assert wanted - 0.1 <= gap <= wanted + extra + SLACK, (attempt, wanted, spacing)


@pytest.fixture
def row(request: pytest.FixtureRequest):
    """This case's row of the results table, appended to ARTIFACT once the fault ran."""
    row: dict[str, Any] = {"test": request.node.name}
    yield row
    if "duration_s" not in row:
        return  # skipped, or failed before the fault
    row.setdefault("outcome", "FAILED (see the test run)")
    row["at"] = datetime.now(UTC).isoformat(timespec="seconds")
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(ARTIFACT.read_text()) if ARTIFACT.exists() else []
    ARTIFACT.write_text(json.dumps([*rows, row], indent=1) + "\n")


def expect(row: dict[str, Any], condition: bool, problem: str) -> None:
    """Assert, noting the problem in the results table too."""
    if not condition:
        row["problem"] = problem
    assert condition, problem


# GitHub --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GitHubFault:
    name: str
    # Injects the fault; returns when (epoch seconds) it ends by itself, or None.
    inject: Callable[[GitHubStandIn], float | None]
    floor: float = 0.0  # the gap GitHub asks for (Retry-After)
    timeout: float = 10.0  # the client's
    duration: float = DURATION


GITHUB_FAULTS = [
    GitHubFault("GitHub answers 502", lambda s: s.inject_fault(502, count=FOREVER)),
    GitHubFault(
        "GitHub hangs (client timeout 0.3 s)",
        lambda s: s.inject_fault(None, count=FOREVER, delay=1.0),
        timeout=0.3,
    ),
    GitHubFault(
        "GitHub 429, Retry-After: 2",
        lambda s: s.inject_fault(429, count=FOREVER, retry_after=2),
        floor=2.0,
        duration=4.3,  # three calls
    ),
    GitHubFault(
        "GitHub 403, Retry-After: 2",
        lambda s: s.inject_fault(403, count=FOREVER, retry_after=2),
        floor=2.0,
        duration=4.3,  # three calls
    ),
    GitHubFault(
        "GitHub 403, rate limit used up until X-RateLimit-Reset",
        lambda s: s.exhaust_rate_limit(reset_in=3.0),
    ),
    GitHubFault(
        "GitHub sends malformed JSON",
        lambda s: s.inject_fault(
            None, count=FOREVER, method="GET", body='{"total_count": 3, "runners": [{"id": 4'
        ),
    ),
]


@pytest.mark.parametrize("case", GITHUB_FAULTS, ids=lambda case: case.name)
def test_github_fault(case: GitHubFault, start_rig, driver_config, standin, row):
    rig = start_rig(driver_config, driver_hypervisor(driver_config), github_timeout=case.timeout)
    row["fault"] = case.name
    began = time.monotonic()
    resets_at = case.inject(standin)
    fault = Fault(rig, row, began=began).start()
    # The list is next fetched within api_cache_timeout (1 s): the fault lasts from then.
    wait_until(lambda: rig.monitor.registrations.error, "the fault to be seen", timeout=5)
    assert healthz(rig)["github_error"]
    if resets_at is None:
        time.sleep(case.duration)
        ended = None
        standin.clear_faults()
    else:  # the stand-in ends it: the window resets
        ended = time.monotonic() + resets_at - time.time()
        time.sleep(max(0.0, ended - time.monotonic()))
    marks = fault.end(ended)

    lists = [(at, r.status) for at, r in standin.timed_requests if r.path == LIST_PATH]
    during = [at for at, _ in lists if began <= at < fault.ended]
    after = [(at, status) for at, status in lists if at >= fault.ended]
    spacing = gaps(during)
    row["measured"] = (
        f"{len(during)} list calls {spacing} s apart; GitHub answered again "
        f"{marks['github']:.2f} s after the fault"
    )
    if resets_at is None:
        assert_backs_off(spacing, floor=case.floor, extra=min(case.timeout, SLACK))
    else:
        # A refusal, then nothing until the reset GitHub named (the back-off alone would
        # have tried again after 0.2 s), then the next call works (or one more refusal, when
        # it came a few ms early: the wait counts from when the refused call was sent).
        assert after and after[0][1] in (200, 304), after[:3]
        retried = during[1] if len(during) > 1 else after[0][0]
        assert retried >= fault.ended - 0.1, (during, after[:1], fault.ended)
        assert len(during) <= 2, spacing
        assert after[0][0] - fault.ended <= 2 * BACKOFF_BASE + SLACK
    # Bounded by the back-off it was in when the fault ended (or the reset).
    assert marks["github"] <= max(case.floor, BACKOFF_CAP) + SLACK + min(case.timeout, 1.0)
    assert len(fault.events("github-error")) == 1  # once, not once per retry
    assert len(fault.events("github-ok")) == 1
    row["outcome"] = (
        "up, reads answered; list backed off and resumed; the ended job's runner replaced; "
        "no leak; reservation kept"
    )


# libvirt -------------------------------------------------------------------------------------


class FaultyLibvirt(LibvirtHypervisor):
    """The real adapter on a connection whose methods named in `failing` raise
    `libvirt.libvirtError`, as a failing libvirtd would: the adapter's own error handling
    sees the real exception type. `failures` logs (time.monotonic(), method) of each."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failing: frozenset[str] = frozenset()
        self.failures: list[tuple[float, str]] = []

    def _connection(self) -> Any:
        return _FaultyConnection(super()._connection(), self)


class _FaultyConnection:
    def __init__(self, conn: libvirt.virConnect, owner: FaultyLibvirt) -> None:
        self._conn = conn
        self._owner = owner

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._conn, name)
        if name not in self._owner.failing:
            return method

        def fail(*args: Any, **kwargs: Any) -> Any:
            self._owner.failures.append((time.monotonic(), name))
            libvirt.virResetLastError()  # else the error takes this thread's last one's code
            raise libvirt.libvirtError(f"injected fault: {name} failed")

        return fail


def test_libvirt_listing_guests_fails(start_rig, driver_config, row):
    hypervisor = FaultyLibvirt(driver_config.libvirt_uri, driver_config.libvirt_storage_pool)
    rig = start_rig(driver_config, hypervisor)
    row["fault"] = "libvirt: listing and looking up guests fails"
    hypervisor.failing = frozenset({"listAllDomains", "lookupByName"})
    fault = Fault(rig, row).start()
    wait_until(lambda: healthz(rig)["libvirt_error"], "the fault to be seen", timeout=5)
    time.sleep(max(0.0, fault.began + DURATION - time.monotonic()))
    hypervisor.failing = frozenset()
    marks = fault.end()

    passes = [at for at, name in hypervisor.failures if name == "listAllDomains"]
    spacing = gaps(passes)
    row["measured"] = (
        f"{len(passes)} failed passes, median gap {sorted(spacing)[len(spacing) // 2]} s "
        f"(the poll interval); a pass worked {marks['pass']:.2f} s after the fault"
    )
    assert marks["pass"] <= POLL + SLACK
    # Passes are retried at the poll interval (a read, one call each; a fetch of the runner
    # list queues one more), never in a tight loop.
    assert len(passes) <= 2 * (fault.ended - fault.began) / POLL + 5, spacing
    # Reported once (as GitHub errors are), not once per failed pass: a long outage must
    # not flood and trim away the event log the dashboard shows.
    row["outcome"] = "up, reads answered, /healthz showed the error; resumed; no leak; kept"
    errors = fault.events("libvirt-error")
    row["measured"] += f"; {len(errors)} libvirt-error event(s)"
    expect(
        row,
        len(errors) <= 2,
        f"{len(errors)} identical libvirt-error events in {fault.ended - fault.began:.1f} s "
        "(one per failed pass)",
    )


def test_libvirt_creating_guests_fails(start_rig, driver_config, standin, row):
    hypervisor = FaultyLibvirt(driver_config.libvirt_uri, driver_config.libvirt_storage_pool)
    rig = start_rig(driver_config, hypervisor)
    row["fault"] = "libvirt: defining guests fails (creates)"
    hypervisor.failing = frozenset({"defineXML"})
    fault = Fault(rig, row).start()
    time.sleep(DURATION + CACHE_TIMEOUT)  # GitHub's list shows the ended job within 1 s
    hypervisor.failing = frozenset()
    marks = fault.end()

    # One create fails and costs a runner id; then the monitor checks whether the profile
    # can create runners at all (defining its guest.xml under a throwaway name), and those
    # checks fail on the fault too: they, not creates, are what backs off.
    creates = [
        at
        for at, r in standin.timed_requests
        if r.path == JIT_PATH and fault.began <= at < fault.ended
    ]
    defines = [at for at, name in hypervisor.failures if name == "defineXML"]
    spacing = gaps(defines)
    row["measured"] = (
        f"{len(creates)} create, then {len(defines) - 1} checks {spacing[1:]} s apart; "
        f"pool back {marks['settled']:.2f} s after the fault"
    )
    assert len(creates) == 1 and len(fault.events("create-failed")) == 1
    assert_backs_off(spacing, extra=POLL)
    assert marks["settled"] <= BACKOFF_CAP + SLACK + 1.0
    row["outcome"] = "up, reads answered; creates backed off and resumed; no leak; kept"




@pytest.mark.libvirtd
def test_libvirtd_killed_and_restarted(real, start_rig, row):
    # `real` (conftest) is asked for before `start_rig`, which stops the monitor first, or
    # the monitor would replace the guests `real` removes meanwhile.
    config, github, _ = real
    try:
        pid = int(LIBVIRTD_PID.read_text())
    except (OSError, ValueError) as error:
        require_libvirtd(f"no libvirtd to kill ({error})")
    rig = start_rig(config, LibvirtHypervisor(config.libvirt_uri, POOL), github)
    row["fault"] = "the real libvirtd killed (SIGKILL), restarted 2 s later"
    # The job ends just before the kill: a pass after it may find no runners to pick from.
    fault = Fault(rig, row).start()
    try:
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: healthz(rig)["libvirt_error"], "the fault to be seen", timeout=10)
        time.sleep(max(0.0, fault.began + 2.0 - time.monotonic()))
    finally:
        restarted = time.monotonic()
        script = subprocess.Popen(
            ["bash", str(ROOT / "tests" / "libvirtd.sh")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        answered = wait_until(libvirtd_answers, "libvirtd to answer again", timeout=120)
        # Timed while libvirtd.sh still sets up its pool and network (seconds, varying), which
        # `fault.end` would count as well: it starts watching when the script is done.
        answered_at = datetime.now(UTC)
        worked = wait_until(
            lambda: a_pass_worked_since(rig, answered_at), "a pass to work", timeout=60
        )
        _, errors = script.communicate(timeout=120)
    assert script.returncode == 0, errors
    fault.end(answered)
    row["measured"] = (
        f"libvirtd answered {answered - restarted:.1f} s after its restart began; a pass "
        f"worked {worked - answered:.2f} s after that"
    )
    assert worked - answered <= 5.0
    row["outcome"] = (
        "up, reads answered, /healthz showed the error; reconnected by itself; guests kept; "
        "no leak; kept"
    )


def a_pass_worked_since(rig: Rig, since: datetime) -> float | None:
    """When (time.monotonic()) the monitor was seen with a pass that worked after `since`."""
    observation = rig.monitor.observation
    if observation is not None and observation.error is None and observation.at > since:
        return time.monotonic()
    return None


def libvirtd_answers() -> float | None:
    """When (time.monotonic()) a new connection to the real libvirtd worked, or None."""
    try:
        libvirt.open(URI).close()
    except libvirt.libvirtError:
        return None
    return time.monotonic()


# The data directory and the store ------------------------------------------------------------


@pytest.fixture
def small_data_dir(tmp_path: Path):
    """A 16 MiB tmpfs as the data directory (config_for_test_driver's `data`), unmounted at
    the end (ask for it before `start_rig`, which closes the store first)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs as the data directory needs root")
    data = tmp_path / "data"
    data.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(data)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield data
    subprocess.run(["umount", "--lazy", str(data)], check=False)


def fill(directory: Path) -> Path:
    """Fill the file system of `directory` to the last byte; returns the filler file."""
    filler = directory / "filler"
    descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(descriptor, b"\0" * chunk)
            except OSError as error:
                assert error.errno == errno.ENOSPC, error
    finally:
        os.close(descriptor)
    return filler


def take_during_the_fault(rig: Rig, fault: Fault) -> None:
    """A take while the store cannot be written is answered (from memory) and its record is
    written once the store works again (checked by `Fault.end`). Taken once the monitor
    knows that the ended job's registration is gone (before, a take may choose that runner,
    and GitHub refuses its labels: a 502 the client retries)."""
    gone = fault.finished
    wait_until(lambda: rig.monitor.registrations.cache.get(gone) is None, "a fetch", timeout=5)
    taken = reserve(rig)
    fault.row["take"] = f"a take during the fault got runner {taken}"


def test_data_directory_full(small_data_dir, start_rig, driver_config, row):
    rig = start_rig(driver_config, driver_hypervisor(driver_config))
    row["fault"] = "the data directory full (SQLite, screenshots)"
    filler = fill(small_data_dir)
    fault = Fault(rig, row).start()
    take_during_the_fault(rig, fault)
    time.sleep(max(0.0, fault.began + DURATION - time.monotonic()))
    filler.unlink()
    marks = fault.end()
    row["measured"] = f"pool back {marks['settled']:.2f} s after space was freed"
    assert marks["settled"] <= 5.0
    assert_reported(fault, "full")


def test_sqlite_busy(start_rig, driver_config, row):
    rig = start_rig(driver_config, driver_hypervisor(driver_config))
    busy_timeout = models.db.timeout
    row["fault"] = f"SQLite locked (BEGIN EXCLUSIVE) past the {busy_timeout:g} s busy timeout"
    locker = sqlite3.connect(driver_config.data_path / models.DB_FILENAME, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        fault = Fault(rig, row).start()
        started = time.monotonic()
        take_during_the_fault(rig, fault)
        row["take"] += f" in {time.monotonic() - started:.1f} s"
        # A write waits out the busy timeout, then fails: hold the lock a while longer.
        time.sleep(max(0.0, fault.began + busy_timeout + DURATION - time.monotonic()))
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    marks = fault.end()
    row["measured"] = f"pool back {marks['settled']:.2f} s after the lock was released"
    assert marks["settled"] <= 5.0
    # Each store write on the monitor thread waits out the busy timeout (an event that cannot
    # be recorded is dropped), so a take waits behind it, but is answered within its own
    # timeout (monitor_thread_send_timeout + recv_timeout + 1 s).
    row["outcome"] = (
        "up, reads answered; writes waited out the busy timeout on the monitor thread, "
        "failed events were dropped; resumed at once; no leak; kept"
    )


def assert_reported(fault: Fault, word: str) -> None:
    """The store's error was on /healthz while the fault lasted: a pass that cannot record
    what it saw (here: the ended job's runner is gone) is an error to show, as a libvirt
    one is."""
    assert fault.probe is not None
    fault.row["outcome"] = "up, reads answered; resumed; no leak; kept"
    shown = fault.probe.shown(word)
    fault.row["shown"] = shown
    expect(
        fault.row,
        bool(shown),
        f"/healthz never showed the error (it said {fault.probe.health[-1]}); the failed "
        "passes were only logged",
    )


# docs/reliability.md's table -----------------------------------------------------------------


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The newest row of each fault, in the order the faults first appear."""
    newest: dict[str, dict[str, Any]] = {}
    for entry in rows:
        newest.pop(entry["fault"], None)
        newest[entry["fault"]] = entry
    lines = [
        "| fault | duration | outcome | time to recover | measured |",
        "|---|---|---|---|---|",
    ]
    for entry in newest.values():
        measured = "; ".join(
            str(entry[key]) for key in ("measured", "take", "reads") if entry.get(key)
        )
        if entry.get("shown"):
            measured += "; /healthz said: " + " / ".join(entry["shown"])
        outcome = entry["outcome"]
        if entry.get("problem"):
            outcome += f"; **PROBLEM: {entry['problem']}**"
        lines.append(
            f"| {entry['fault']} | {entry['duration_s']} s | {outcome} | "
            f"{entry.get('recover_s', '—')} s | {measured} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else ARTIFACT
    print(markdown_table(json.loads(source.read_text())))
