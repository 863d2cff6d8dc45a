"""The monitor thread: the only code that decides changes to VMs or GitHub state.

One dedicated thread drains a request queue. A reconcile request runs `Monitor.tick(now)`:
observe (cached registrations + a live guest list), decide (the pure policy), and hand the
slow calls it decided on (register + create + start, unregister + destroy) to a small pool of
worker threads it owns. Their outcomes come back through the same queue, so one slow GitHub
answer never holds up the next request. Other requests (from the web layer, in later issues)
are functions run on this thread with a reply the caller waits for; a reply that comes after
the caller gave up is dropped.

The registrations list is refreshed off this thread (`refresh_registrations`, called by the
scheduler) into a write-through cache: the monitor's own creates and deletes are applied to it
at once, so a decision never acts on a list that predates its own last change.

Imports policy, models, errors, screenshots (files on disk), and the GitHub/Hypervisor
*protocols* only.
"""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
import json
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from dataclasses import field
from dataclasses import replace
from datetime import UTC
from datetime import datetime
from datetime import timedelta
from pathlib import Path
from typing import Any
from typing import Protocol

from monitor import dashboard
from monitor import metrics
from monitor import models
from monitor import policy
from monitor.errors import MonitorError
from monitor.errors import TransientError
from monitor.rebuilds import Rebuilds
from monitor.rebuilds import image_volume
from monitor.screenshots import ScreenshotStore
from monitor.screenshots import to_png

log = logging.getLogger(__name__)

# Upstream's JIT work folders by image kind; everything else is Linux-like.
WORK_FOLDERS = {"windows": "C:\\a", "macos": "/Users/servo/a"}
# Threads for reservation label calls: enough for the takes of a busy CI hour at once.
RESERVE_WORKERS = 32
# How soon to look at GitHub again after serving a JIT config: the runner is about to come
# online (spec §9.2).
JIT_SERVED_REFRESH = timedelta(seconds=10)
# Unknown guest addresses trigger a fresh lookup of all guests at most this often.
ADDRESS_REFRESH_MIN_SECONDS = 1.0
# Reservations are remembered (for retried takes) this long.
RESERVATION_MEMORY = timedelta(days=2)
# Runners just taken show as Reserved within this (or the scheduler's half second).
VIEW_MIN_INTERVAL = timedelta(milliseconds=250)
# Housekeeping that need not run every pass.
SWEEP_INTERVAL = timedelta(minutes=1)
# A failed image rebuild is tried again after 30 s, 1 min, 2 min, … at most an hour apart.
REBUILD_BACKOFF_BASE = timedelta(seconds=30)
REBUILD_BACKOFF_CAP = timedelta(hours=1)
# Back-off after failed fetches of GitHub's runner list: 5 s (upstream's poll interval),
# 10 s, 20 s, … at most 5 min apart (longer when GitHub's Retry-After or X-RateLimit-Reset
# says so).
GITHUB_BACKOFF_BASE = timedelta(seconds=5)
GITHUB_BACKOFF_CAP = timedelta(minutes=5)
# Below this share of GitHub's rate limit left, the runner list is fetched less often.
LOW_BUDGET_FRACTION = 0.1
# A Reserved runner's workflow run is asked about once it has been held this long (its job
# needs a moment to be picked up), and each run at most this often: one GitHub call per
# reserved run a minute, only while runners wait for it.
RUN_CHECK_AFTER = timedelta(seconds=30)
RUN_CHECK_INTERVAL = timedelta(seconds=60)
# Registrations older than this (GitHub unreachable) are too stale to act on: a runner seen
# "offline" an hour ago may be busy now, so nothing is created or destroyed until a fetch
# succeeds. At least this long, or three cache lifetimes.
MIN_STALE_REGISTRATIONS = timedelta(seconds=90)


def utcnow() -> datetime:
    return datetime.now(UTC)


def work_folder(profile_name: str) -> str:
    for marker, folder in WORK_FOLDERS.items():
        if marker in profile_name:
            return folder
    return "/a"


class GitHub(Protocol):
    def list_runners(self) -> list[policy.Registration]: ...
    def generate_jitconfig(self, name: str, labels: Any, *, work_folder: str = ...) -> Any: ...
    def delete_runner(self, registration_id: int) -> bool: ...


class Hypervisor(Protocol):
    def list_guests(self, prefix: str) -> list[Any]: ...
    def create_guest(self, name: str, template_xml: str, base_image: Any) -> None: ...
    def start_guest(self, name: str) -> None: ...
    def destroy_guest(self, name: str) -> None: ...
    def list_volumes(self, prefix: str) -> list[str]: ...
    def screenshot_raw(self, name: str) -> bytes: ...


class RegistrationCache:
    """GitHub's runner list, refreshed off the monitor thread, written through by it.

    `journal` holds the monitor's own changes since a fetch began, replayed on top of that
    fetch's result, so a slow fetch cannot undo a create or delete that finished meanwhile.
    """

    def __init__(self, timeout: timedelta) -> None:
        self.timeout = timeout
        self._lock = threading.Lock()
        self._registrations: dict[int, policy.Registration] | None = None
        self._fetched_at: datetime | None = None
        self._invalid = False
        self._forced_expiry: datetime | None = None
        self._not_before: datetime | None = None
        self._journal: list[tuple[int, str, Any]] = []
        self._generation = 0
        # When (time.monotonic) the fetch behind the cached list began: a state GitHub was
        # in after that moment is in the list.
        self._fetch_began = 0.0
        self.stored_fetch_began = 0.0

    def is_due(self, now: datetime) -> bool:
        with self._lock:
            if self._not_before is not None and now < self._not_before:
                return False
            if self._registrations is None or self._fetched_at is None or self._invalid:
                return True
            if now - self._fetched_at >= self.timeout:
                return True
            return self._forced_expiry is not None and now >= self._forced_expiry

    def begin_fetch(self) -> int:
        with self._lock:
            self._fetch_began = time.monotonic()
            return self._generation

    def store(self, registrations: list[policy.Registration], now: datetime, began: int) -> None:
        with self._lock:
            fresh = {r.id: r for r in registrations}
            for generation, op, payload in self._journal:
                if generation > began:
                    _apply(fresh, op, payload)
            self._journal = [entry for entry in self._journal if entry[0] > began]
            self._registrations = fresh
            self._fetched_at = now
            self.stored_fetch_began = self._fetch_began
            self._invalid = False
            self._forced_expiry = None
            self._not_before = None

    def back_off(self, until: datetime) -> None:
        with self._lock:
            self._not_before = until

    def invalidate(self) -> None:
        """Fetch again at the next chance (the cached list stays usable until then)."""
        with self._lock:
            self._invalid = True
            self._forced_expiry = None

    def invalidate_in(self, delay: timedelta, now: datetime) -> None:
        """Expire at now + delay, unless an earlier expiry is already set (spec §9.2)."""
        with self._lock:
            expiry = now + delay
            if self._forced_expiry is None or expiry < self._forced_expiry:
                self._forced_expiry = expiry

    def upsert(self, registration: policy.Registration) -> None:
        self._write("upsert", registration)

    def remove(self, registration_id: int) -> None:
        self._write("remove", registration_id)

    def _write(self, op: str, payload: Any) -> None:
        with self._lock:
            self._generation += 1
            self._journal.append((self._generation, op, payload))
            if self._registrations is not None:
                _apply(self._registrations, op, payload)

    def get(self, registration_id: int) -> policy.Registration | None:
        with self._lock:
            if self._registrations is None:
                return None
            return self._registrations.get(registration_id)

    def snapshot(self) -> list[policy.Registration] | None:
        with self._lock:
            if self._registrations is None:
                return None
            return list(self._registrations.values())

    @property
    def fetched_at(self) -> datetime | None:
        with self._lock:
            return self._fetched_at


def _apply(registrations: dict[int, policy.Registration], op: str, payload: Any) -> None:
    if op == "upsert":
        registrations[payload.id] = payload
    else:
        registrations.pop(payload, None)


class Backoff:
    """Exponential back-off per key (a profile, a runner id) after failed operations,
    honouring a peer's Retry-After, so a persistent fault is retried at a bounded rate."""

    def __init__(
        self,
        base: timedelta = timedelta(seconds=5),
        cap: timedelta = timedelta(minutes=5),
    ) -> None:
        self.base = base
        self.cap = cap
        self._state: dict[Any, tuple[int, datetime]] = {}

    def ready(self, key: Any, now: datetime) -> bool:
        state = self._state.get(key)
        return state is None or now >= state[1]

    def failed(self, key: Any, now: datetime, retry_after: float | None = None) -> timedelta:
        failures = self._state.get(key, (0, now))[0] + 1
        delay = min(self.cap, self.base * 2 ** min(failures - 1, 16))
        if retry_after is not None:
            delay = max(delay, timedelta(seconds=retry_after))
        self._state[key] = (failures, now + delay)
        return delay

    def succeeded(self, key: Any) -> None:
        self._state.pop(key, None)


@dataclass
class Observation:
    """What the last tick saw and decided: read by the dashboard, never mutated after."""

    at: datetime
    runners: list[policy.Runner]
    counts: dict[str, policy.RunnerCounts]
    ignored: list[str]
    changes: policy.RunnerChanges | None
    override: policy.Override | None
    error: str | None = None


@dataclass(frozen=True)
class Rendered:
    """The dashboard as served: rendered once per observation, not once per request."""

    observation: Observation
    json: bytes


@dataclass
class _Take:
    """A reservation in progress for one workflow job (its `unique_id`)."""

    unique_id: str
    profile: str
    count: int
    qualified_repo: str
    run_id: str
    runners: list[policy.Runner]
    future: Future = field(default_factory=Future)
    lock: threading.Lock = field(default_factory=threading.Lock)
    reserved: dict[int, policy.Registration] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    unclear: list[int] = field(default_factory=list)
    pending: int = 0


@dataclass
class _Request:
    func: Callable[[], Any]
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None
    abandoned: bool = False


_STOP = object()
_RECONCILE = object()
_REFRESH_VIEW = object()
# The monitor thread takes requests in this order, FIFO within one: clients' requests and
# worker outcomes first (in the order they came: a take's bookkeeping is queued before its
# client is answered, so the client's next request sees it), then a reconcile pass; a stop
# request last, so everything queued before it is answered.
_CALL, _PASS, _LAST = range(3)
_OUTCOME = _CALL


class Monitor:
    """Owns the monitor thread, its request queue and its worker pool."""

    def __init__(
        self,
        config: Any,
        github: GitHub,
        hypervisor: Hypervisor,
        *,
        clock: Callable[[], datetime] = utcnow,
        workers: int = 4,
    ) -> None:
        self.config = config
        self.github = github
        self.hypervisor = hypervisor
        self.clock = clock
        self.registrations = RegistrationCache(config.api_cache_timeout)
        self.override: policy.Override | None = models.load_override()
        self.holds: policy.Holds = models.load_holds()
        # Runners the operator asked to destroy, until they are gone (request_destroy).
        self._destroy_requests: set[int] = set()
        self.screenshots = ScreenshotStore(config.data_path)
        self.observation: Observation | None = None
        self.github_error: str | None = None
        self.metrics = metrics.Metrics()
        self.metrics.attach(self)
        # Workflow runs (`reserved-by` values) GitHub reports completed, with their conclusion,
        # and when each run Reserved runners wait for was last asked about (check_reserved_runs).
        self.finished_runs: dict[str, str] = {}
        self._run_checked_at: dict[str, datetime] = {}
        self._requests: queue.PriorityQueue[tuple[int, int, Any]] = queue.PriorityQueue()
        self._sequence = itertools.count()
        self._reconcile_queued = threading.Event()
        self._view_refresh_queued = threading.Event()
        self._view_stale = False
        self._last_view_render = 0.0
        self._workers = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="monitor-worker")
        # Reservations are short GitHub calls that clients wait for: their own, wider pool, so
        # a slow create never delays a take and concurrent takes' label calls overlap.
        self._reservers = ThreadPoolExecutor(
            max_workers=RESERVE_WORKERS, thread_name_prefix="monitor-reserve"
        )
        self._takes: dict[str, _Take] = {}
        self._unsaved: dict[str, models.ReservationRecord] = {}
        # Every remembered reservation, by unique_id: a take must not wait on the database.
        self._reservations = models.load_reservations(clock() - RESERVATION_MEMORY)
        self._reserving: set[int] = set()
        self._held: dict[int, float] = {}
        self._addresses: dict[str, str] = {}
        self._last_address_refresh = 0.0
        self.rendered: Rendered | None = None
        self._in_flight: dict[int, str] = {}
        self._create_backoff = Backoff()
        self._list_backoff = Backoff(base=GITHUB_BACKOFF_BASE, cap=GITHUB_BACKOFF_CAP)
        self._destroy_backoff = Backoff()
        self._stale_reported = False
        self._last_sweep: datetime | None = None
        self._last_prune: datetime | None = None
        self._reported_ignored: set[str] = set()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.rebuilds = Rebuilds(
            config,
            hypervisor,
            post=self._post,
            backoff=Backoff(base=REBUILD_BACKOFF_BASE, cap=REBUILD_BACKOFF_CAP),
            stopping=self._stopping,
            clock=clock,
        )
        # Each profile's current image snapshot (the rebuilds keep it current).
        self.snapshots: dict[str, str] = self.rebuilds.snapshots

    @property
    def runner_prefix(self) -> str:
        return self.config.libvirt_runner_guest_prefix

    # Thread and queue ---------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="monitor", daemon=True)
        self._thread.start()
        # Start every reserve worker now: the pool starts threads on demand, and each start
        # would be paid by a take, on the monitor thread, in the middle of a burst.
        started = threading.Barrier(RESERVE_WORKERS)
        for _ in range(RESERVE_WORKERS):
            self._reservers.submit(started.wait, 5.0)

    def stop(self, timeout: float = 30.0) -> None:
        """Answer what is queued, let running work finish, and end the thread.

        Takes in progress complete (their clients are waiting, and their bookkeeping must
        reach the store); creates not started yet are dropped. The workers' outcomes are
        queued before the stop request, so the monitor thread records them first."""
        self._stopping.set()
        self._reservers.shutdown(wait=True)
        self.rebuilds.shutdown()
        self._workers.shutdown(wait=True, cancel_futures=True)
        self._enqueue(_LAST, _STOP)
        if self._thread is not None:
            self._thread.join(timeout)

    def request_reconcile(self) -> None:
        """Ask for a reconcile pass; requests made while one is queued are merged."""
        if not self._reconcile_queued.is_set():
            self._reconcile_queued.set()
            self._enqueue(_PASS, _RECONCILE)

    def call(self, func: Callable[[], Any], timeout: float) -> Any:
        """Run `func` on the monitor thread and return its result (raising its error).

        If `func` returns a Future (work it handed to its workers), wait for that too, within
        the same `timeout`. Raises MonitorError(503) when no answer comes in time; the request
        is then abandoned and its eventual result dropped (upstream crashed here, spec §2.3).
        """
        deadline = time.monotonic() + timeout
        request = _Request(func)
        self._enqueue(_CALL, request)
        if not request.done.wait(timeout):
            request.abandoned = True
            raise MonitorError("the monitor thread did not answer in time", status=503)
        if request.error is not None:
            raise request.error
        result = request.result
        if isinstance(result, Future):
            try:
                return result.result(max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise MonitorError("the monitor did not finish in time", status=503) from None
        return result

    def ping(self, timeout: float) -> bool:
        """True if the monitor thread ran a no-op request within `timeout` seconds: it is
        not wedged (systemd's watchdog is fed only then)."""
        try:
            self.call(lambda: None, timeout)
        except MonitorError:
            return False
        return True

    def _run(self) -> None:
        log.info("monitor thread started")
        while True:
            item = self.next_request()
            if item is _STOP:
                self._save_unsaved()
                break
            try:
                self._handle(item)
            except Exception:  # noqa: BLE001 - the monitor thread must never die
                log.exception("monitor thread: unexpected error (continuing)")
        log.info("monitor thread stopped")

    def _handle(self, item: Any) -> None:
        if item is _RECONCILE:
            self._reconcile_queued.clear()
            started = time.perf_counter()
            now = self.clock()
            try:
                self.tick(now)
            except Exception as error:  # noqa: BLE001 - e.g. the store full or locked: this pass
                message = f"reconcile pass failed: {error}"
                previous = self.observation
                if previous is None or previous.error != message:  # once, not once per pass
                    log.exception("%s", message)
                self._publish_error(now, message)
            self.metrics.reconcile_seconds.observe(time.perf_counter() - started)
        elif item is _REFRESH_VIEW:
            self._view_refresh_queued.clear()
            self._refresh_view()
        elif isinstance(item, _Request):
            if item.abandoned:
                return
            try:
                item.result = item.func()
            except BaseException as error:  # noqa: BLE001 - handed to the caller
                item.error = error
            item.done.set()
        elif callable(item):
            item()

    def _enqueue(self, priority: int, item: Any) -> None:
        self._requests.put((priority, next(self._sequence), item))

    def next_request(self, timeout: float | None = None) -> Any:
        """The next request for the monitor thread (raises queue.Empty after `timeout`)."""
        return self._requests.get(timeout=timeout)[2]

    def _post(self, func: Callable[[], None]) -> None:
        """Queue `func` to run on the monitor thread (worker outcomes come back this way)."""
        self._enqueue(_OUTCOME, func)

    # Registrations (scheduler thread) -----------------------------------------------------

    def refresh_registrations(self, force: bool = False) -> bool:
        """Fetch GitHub's runner list if the cache is due; queue a reconcile after a fetch.

        Runs on the scheduler's thread: a read that cannot race the monitor thread. A
        failure is logged and backed off (honouring Retry-After); it never raises.
        """
        now = self.clock()
        if not force and not self.registrations.is_due(now):
            return False
        began = self.registrations.begin_fetch()
        try:
            fetched = self.github.list_runners()
        except MonitorError as error:
            # From the failure, not from before the request: Retry-After counts from its answer.
            failed_at = self.clock()
            delay = self._list_backoff.failed("list", failed_at, _retry_after(error))
            self.registrations.back_off(failed_at + delay)
            if self.github_error != str(error):
                log.warning("GitHub runner list failed, retrying in %s: %s", delay, error)
                models.record_event("github-error", f"listing runners failed: {error}")
            self.github_error = str(error)
            return False
        suffix = "@" + self.config.github_api_suffix
        ours = [r for r in fetched if r.name.endswith(suffix)]
        self.registrations.store(ours, self.clock(), began)
        slower = polling_delay(
            getattr(self.github, "rate_limit", None), now, self.config.api_cache_timeout
        )
        if slower is not None:
            # GitHub's budget is running out: look less often, keeping the rest for the
            # calls that create runners and serve takes.
            self.registrations.back_off(now + slower)
            log.warning("GitHub API budget low: next look at the runner list in %s", slower)
        self._list_backoff.succeeded("list")
        if self.github_error is not None:
            log.info("GitHub runner list works again")
            models.record_event("github-ok", "listing runners works again")
            self.github_error = None
        self.request_reconcile()
        return True

    # One reconcile pass (monitor thread) --------------------------------------------------

    def tick(self, now: datetime) -> Observation | None:
        """One pass: observe, decide, dispatch.

        1. Take the cached registrations (none yet: wait for the first fetch).
        2. List our guests (a libvirt failure ends this pass only).
        3. Adopt guests and registrations of configured profiles that have no store row.
        4. Build runners (the pure pairing), forget runners that are gone.
        5. Keep the override's bookkeeping; compute counts and changes.
        6. Hand destroys, then (only when nothing is being destroyed) creates to workers.
        """
        self._save_unsaved()
        registrations = self.registrations.snapshot()
        if registrations is None:
            log.debug("tick: no registrations yet; waiting for the first GitHub fetch")
            return None
        try:
            guests = self.hypervisor.list_guests(self.runner_prefix + "-")
        except MonitorError as error:
            message = f"listing guests failed: {error}"
            previous = self.observation
            if previous is None or previous.error != message:  # once, not once per pass
                log.warning("tick: %s", message)
                models.record_event("libvirt-error", message, at=now)
            self._publish_error(now, message)
            return None
        guest_names = [guest.name for guest in guests]

        live = models.live_records()
        if self._adopt(registrations, guest_names, live, now):
            live = models.live_records()
        # Runners of a profile no longer configured are reported, never touched.
        records = {
            runner_id: record
            for runner_id, record in live.items()
            if record.profile in self.config.profiles
        }
        runners, ignored = policy.build_runners(
            registrations,
            guest_names,
            records,
            runner_prefix=self.runner_prefix,
            suffix=self.config.github_api_suffix,
            in_flight=self._in_flight.keys() | self._reserving | self._held.keys(),
            destroying={i for i, kind in self._in_flight.items() if kind == "destroy"},
        )
        self._report_ignored(ignored, now)
        present = {runner.id for runner in runners}
        gone = [rid for rid in records if rid not in present and rid not in self._in_flight]
        if gone:
            models.mark_destroyed(gone, now)
            for rid in gone:
                log.info("runner %d is gone", rid, extra={"runner_id": rid})

        self._destroy_requests &= {r.id for r in runners}
        override = policy.update_override(self.override, runners)
        if override != self.override:
            self.override = override
            models.save_override(override)
        inp = self.policy_input(runners)
        counts = policy.runner_counts(inp, now)
        try:
            changes = policy.decide(inp, now)
        except MonitorError as error:
            log.error("tick: policy failed: %s", error)
            changes = None
        observation = Observation(now, runners, counts, ignored, changes, self.override)
        self._observe(observation)
        self.rebuilds.start_due(inp, now)
        if changes is None or self._registrations_too_stale(now):
            return observation
        self._dispatch(changes, runners, now)
        if self._last_sweep is None or now - self._last_sweep >= SWEEP_INTERVAL:
            self._last_sweep = now
            self._sweep_orphan_volumes(guest_names, now)
            self._sweep_rebuild_guests()
        return observation

    def _registrations_too_stale(self, now: datetime) -> bool:
        fetched_at = self.registrations.fetched_at
        limit = max(MIN_STALE_REGISTRATIONS, 3 * self.config.api_cache_timeout)
        stale = fetched_at is None or now - fetched_at > limit
        if stale and not self._stale_reported:
            message = f"GitHub's runner list is older than {limit}; changing nothing until it works"
            log.warning("%s", message)
            models.record_event("stale", message, at=now)
        self._stale_reported = stale
        return stale

    def _sweep_rebuild_guests(self) -> None:
        try:
            guests = self.hypervisor.list_guests(self.config.libvirt_rebuild_guest_prefix + "-")
        except MonitorError as error:
            log.warning("listing rebuild guests failed: %s", error)
            return
        self.rebuilds.sweep([guest.name for guest in guests])

    def _sweep_orphan_volumes(self, guest_names: list[str], now: datetime) -> None:
        """Remove runner overlay volumes whose guest is gone (a create or destroy that failed
        half-way while libvirt was away). Only volumes of configured profiles, never one
        with an operation in flight."""
        try:
            volumes = self.hypervisor.list_volumes(self.runner_prefix + "-")
        except MonitorError as error:
            log.debug("listing volumes failed: %s", error)
            return
        existing = set(guest_names)
        for volume in volumes:
            name = volume.removesuffix(".qcow2")
            parsed = policy.parse_guest_name(name, self.runner_prefix)
            if name in existing or parsed is None or parsed[0] not in self.config.profiles:
                continue
            runner_id = parsed[1]
            if runner_id in self._in_flight or not self._destroy_backoff.ready(volume, now):
                continue
            log.info("removing orphaned volume %s", volume)
            models.record_event("sweep", f"removing orphaned volume {volume}", at=now)
            self._in_flight[runner_id] = "cleanup"
            self._workers.submit(self._cleanup_worker, runner_id, name, volume)

    def _cleanup_worker(self, runner_id: int, name: str, volume: str) -> None:
        error: MonitorError | None = None
        try:
            self.hypervisor.destroy_guest(name)
        except MonitorError as failure:
            error = failure
        except Exception as failure:  # noqa: BLE001 - report, never vanish
            log.exception("cleanup worker for %s crashed", name)
            error = MonitorError(f"unexpected error: {failure}")
        finally:
            self._post(lambda: self._cleanup_done(runner_id, volume, error))

    def _cleanup_done(self, runner_id: int, volume: str, error: MonitorError | None) -> None:
        self._in_flight.pop(runner_id, None)
        if error is None:
            self._destroy_backoff.succeeded(volume)
        else:
            delay = self._destroy_backoff.failed(volume, self.clock(), _retry_after(error))
            log.warning("removing volume %s failed (retry in %s): %s", volume, delay, error)

    def policy_input(self, runners: list[policy.Runner] | None) -> policy.PolicyInput:
        return policy.PolicyInput(
            profiles=self.config.profiles,
            settings=self.config,
            runners=runners,
            snapshots=self.snapshots,
            override=self.override,
            finished_runs=frozenset(self.finished_runs),
            drained=self.holds.drained_profiles(self.config.profiles),
            paused=self.holds.paused,
            destroy_requested=frozenset(self._destroy_requests),
        )

    # Reserved runners whose workflow run is over (scheduler thread) ---------------------------

    def check_reserved_runs(self) -> list[str]:
        """Ask GitHub about the workflow runs Reserved runners wait for; note those that
        completed (cancelled, failed or done without using their runner) and queue a
        reconcile, which reclaims the runners (`policy.PolicyInput.finished_runs`) instead of
        letting them wait out `monitor_reserve_timeout`. Returns the runs it asked about.

        Read-only and off the monitor thread; a failure is logged and tried again later.
        Skipped while GitHub's budget is low (the runner list comes first)."""
        observation = self.observation
        if observation is None:
            return []
        now = self.clock()
        rate_limit = getattr(self.github, "rate_limit", None)
        if polling_delay(rate_limit, now, self.config.api_cache_timeout) is not None:
            return []
        waiting = policy.runs_to_check(observation.runners, now, RUN_CHECK_AFTER)
        finished = {run: c for run, c in self.finished_runs.items() if run in waiting}
        checked_at = {run: at for run, at in self._run_checked_at.items() if run in waiting}
        asked = []
        for run in waiting:
            last = checked_at.get(run)
            if run in finished or (last is not None and now - last < RUN_CHECK_INTERVAL):
                continue
            repo, _, run_id = run.rpartition("/actions/runs/")
            checked_at[run] = now
            asked.append(run)
            try:
                status, conclusion = self.github.workflow_run_status(repo, run_id)
            except MonitorError as error:
                log.info("cannot see how workflow run %s is doing: %s", run, error)
                continue
            if status == "completed":
                finished[run] = conclusion or "no conclusion"
                log.info("workflow run %s completed (%s); reclaiming its runners", run, conclusion)
        self._run_checked_at = checked_at
        newly = set(finished) - set(self.finished_runs)
        self.finished_runs = finished  # replaced whole: the monitor thread reads it
        if newly:
            self.request_reconcile()
        return asked

    def _publish_error(self, now: datetime, error: str) -> None:
        previous = self.observation
        if previous is None:
            self._observe(Observation(now, [], {}, [], None, self.override, error))
        else:
            self._observe(replace(previous, at=now, error=error))

    def _observe(self, observation: Observation) -> None:
        """Publish an observation and its rendered dashboard (served as is, per request)."""
        body = dashboard.dashboard_json(
            observation, self.config.external_base_url, self._addresses, self.holds
        )
        self.metrics.note_transitions(self.observation, observation)
        self._note_history(self.observation, observation)
        self.observation = observation
        self.rendered = Rendered(observation, json.dumps(body, sort_keys=True).encode())

    def _note_history(self, before: Observation | None, after: Observation) -> None:
        """Reservation history: a runner's job started (it is Busy now) or the runner is gone."""
        if before is None or before.runners is after.runners:
            return
        was = {r.id: r.status for r in before.runners}
        now = {r.id: r.status for r in after.runners}
        started = [i for i, s in now.items() if s is policy.Status.BUSY and was.get(i) is not s]
        ended = [i for i in was if i not in now]
        try:
            models.record_job_started(started, after.at)
            models.record_runner_ended(ended, after.at)
        except Exception as error:  # noqa: BLE001 - history must never stop a pass
            log.warning("cannot update the reservation history: %s", error)

    def _adopt(
        self,
        registrations: list[policy.Registration],
        guest_names: list[str],
        live: dict[int, policy.RunnerRecord],
        now: datetime,
    ) -> bool:
        """Count what already exists in our namespace as ours, if its profile is configured.
        Returns whether any runner was adopted or revived (`live`: the store's live runners)."""
        found: dict[int, str] = {}
        for registration in registrations:
            parsed = policy.parse_registration_name(
                registration.name, self.runner_prefix, self.config.github_api_suffix
            )
            if parsed is not None:
                found.setdefault(parsed[1], parsed[0])
        for name in guest_names:
            parsed = policy.parse_guest_name(name, self.runner_prefix)
            if parsed is not None:
                found.setdefault(parsed[1], parsed[0])
        unknown = {rid: profile for rid, profile in found.items() if rid not in live}
        if not unknown:
            return False
        rows = models.runners_by_id(unknown)
        changed = False
        for runner_id, profile in sorted(unknown.items()):
            if profile not in self.config.profiles:
                continue  # reported as ignored by build_runners; never touched
            row = rows.get(runner_id)
            if row is None:
                name = policy.guest_name(self.runner_prefix, profile, runner_id)
                models.create_runner(runner_id, profile, name, now, adopted=True)
                models.ensure_runner_id_above(runner_id)
                log.info(
                    "adopted runner %d (%s) found in our namespace",
                    runner_id,
                    name,
                    extra={"runner_id": runner_id},
                )
                models.record_event(
                    "adopt",
                    f"adopted existing {name}",
                    runner_id=runner_id,
                    profile=profile,
                    at=now,
                )
                changed = True
            elif row.destroyed_at is not None and row.profile == profile:
                models.revive_runner(runner_id)
                models.record_event(
                    "adopt", f"{row.guest_name} exists again", runner_id=runner_id, at=now
                )
                changed = True
        return changed

    def _report_ignored(self, ignored: list[str], now: datetime) -> None:
        for description in ignored:
            if description not in self._reported_ignored:
                log.warning("not ours, left alone: %s", description)
                models.record_event("ignored", description, at=now)
        self._reported_ignored = set(ignored)

    # Dispatch to workers ------------------------------------------------------------------

    def _dispatch(
        self, changes: policy.RunnerChanges, runners: list[policy.Runner], now: datetime
    ) -> None:
        if self._stopping.is_set():
            return
        by_id = {runner.id: runner for runner in runners}
        for runner_id in changes.destroy:
            runner = by_id.get(runner_id)
            if runner is None or runner_id in self._in_flight:
                continue
            if not self._destroy_backoff.ready(runner_id, now):
                continue
            reason = _destroy_reason(
                runner, self.config.destroy_all_non_busy_runners, self.snapshots.get(runner.profile)
            )
            if runner_id in self._destroy_requests:
                reason = "the operator asked for it"
            run = runner.reserved_by() if runner.status is policy.Status.RESERVED else None
            if run in self.finished_runs:
                reason = (
                    f"its workflow run {run} ended ({self.finished_runs[run]}) without using it"
                )
            log.info(
                "destroying runner %d (%s): %s",
                runner_id,
                runner.profile,
                reason,
                extra={"runner_id": runner_id},
            )
            models.record_event(
                "destroy", reason, runner_id=runner_id, profile=runner.profile, at=now
            )
            self._in_flight[runner_id] = "destroy"
            self._workers.submit(self._destroy_worker, runner)
        # Destroys may fail, so their resources are not assumed free until they are done
        # (upstream clears the create map when destroying, spec §5.4 step 11).
        if changes.destroy or "destroy" in self._in_flight.values():
            return
        for profile_key, count in sorted(changes.create.items()):
            if not self._create_backoff.ready(profile_key, now):
                continue
            for _ in range(count):
                self._start_create(profile_key, now)

    def _start_create(self, profile_key: str, now: datetime) -> None:
        profile = self.config.profiles[profile_key]
        image = None
        if getattr(profile, "base_image", None) is None:
            image = self.snapshots.get(profile_key)
            if image is None:
                log.error("cannot create a runner for %s: it has no image yet", profile_key)
                return
        runner_id = models.allocate_runner_id()
        name = policy.guest_name(self.runner_prefix, profile_key, runner_id)
        models.create_runner(runner_id, profile_key, name, now, image=image)
        models.record_event(
            "create", f"creating {name}", runner_id=runner_id, profile=profile_key, at=now
        )
        log.info("creating runner %d (%s)", runner_id, name, extra={"runner_id": runner_id})
        self._in_flight[runner_id] = "create"
        self._workers.submit(self._create_worker, runner_id, profile, name, image)

    def _base_image(self, profile: Any, image: str | None) -> Path:
        """The disk a runner's overlay goes on: the prebuilt `base_image`, or the rebuilt
        image of snapshot `image` in the storage pool."""
        if image is None:
            return profile.base_image
        volume = image_volume(
            self.config.libvirt_template_guest_prefix, profile.profile_name, image
        )
        path = self.hypervisor.volume_path(volume)
        if path is None:
            raise MonitorError(f"the image {volume} of {profile.profile_name} is missing", 503)
        return path

    def _create_worker(
        self, runner_id: int, profile: Any, name: str, image: str | None = None
    ) -> None:
        """Register (JIT), create and start one guest. On failure, undo what was done.
        Always reports back to the monitor thread, whatever happens."""
        registration: policy.Registration | None = None
        error: Exception | None = None
        try:
            if not self.config.dont_register_runners:
                jit = self.github.generate_jitconfig(
                    policy.registration_name(name, self.config.github_api_suffix),
                    ["self-hosted", "X64", profile.github_runner_label],
                    work_folder=work_folder(profile.profile_name),
                )
                registration = jit.registration
                models.record_registration(
                    runner_id, registration.id, jit.encoded_jit_config, self.clock()
                )
            template = profile.guest_xml.read_text()
            token = None
            if self.config.guest_auth == "token":
                # Its hash is stored before the guest exists: a guest never holds a token
                # the monitor does not know.
                token = secrets.token_urlsafe(32)
                models.set_guest_token(runner_id, hashlib.sha256(token.encode()).hexdigest())
            self.hypervisor.create_guest(
                name, template, self._base_image(profile, image), guest_token=token
            )
            self.hypervisor.start_guest(name)
            models.record_started(runner_id, self.clock())
        except Exception as failure:  # noqa: BLE001 - a worker must report, not vanish
            if not isinstance(failure, (MonitorError, OSError)):
                log.exception("create worker for %s crashed", name)
            error = failure
            # A 409 means a guest of that name already existed: it is not ours to undo.
            created_guest = not (isinstance(failure, MonitorError) and failure.status == 409)
            self._undo_create(name, registration, created_guest)
            registration = None
        finally:
            self._post(lambda: self._create_done(runner_id, profile, name, registration, error))

    def _undo_create(
        self, name: str, registration: policy.Registration | None, created_guest: bool
    ) -> None:
        """Best effort; whatever is left is found and removed by a later pass."""
        try:
            if registration is not None:
                self.github.delete_runner(registration.id)
        except Exception as error:  # noqa: BLE001 - best effort
            log.warning("undo create %s: unregister failed (will retry): %s", name, error)
        try:
            if created_guest:
                self.hypervisor.destroy_guest(name)
        except Exception as error:  # noqa: BLE001 - best effort
            log.warning("undo create %s: destroy failed (will retry): %s", name, error)

    def _create_done(
        self,
        runner_id: int,
        profile: Any,
        name: str,
        registration: policy.Registration | None,
        error: Exception | None,
    ) -> None:
        self._in_flight.pop(runner_id, None)
        key = profile.profile_name
        if error is None:
            self._create_backoff.succeeded(key)
            if registration is not None:
                self.registrations.upsert(registration)
            log.info("created runner %d (%s)", runner_id, name, extra={"runner_id": runner_id})
            models.record_event("created", f"created and started {name}", runner_id=runner_id)
            # Look at GitHub again soon, as upstream does after every create (spec §9.2);
            # the write-through above keeps decisions correct until then.
            self.registrations.invalidate()
            self.request_reconcile()
        else:
            # No immediate retry: the profile waits out its back-off, and a later periodic
            # pass tries again (a broken profile must not hammer GitHub or libvirt).
            delay = self._create_backoff.failed(key, self.clock(), _retry_after(error))
            log.error(
                "creating runner %d (%s) failed, next try for %s in %s: %s",
                runner_id,
                name,
                key,
                delay,
                error,
            )
            models.record_event(
                "create-failed", f"{name}: {error} (retry in {delay})", runner_id=runner_id
            )

    def _destroy_worker(self, runner: policy.Runner) -> None:
        """Unregister, then destroy the guest and its disk. The guest is kept when the
        unregister fails: GitHub refuses to delete a runner that is running a job, and a
        busy VM must not vanish under it. Always reports back, whatever happens."""
        errors: list[str] = []
        retry_after: float | None = None
        unregistered = False
        try:
            if runner.registration is not None:
                self.github.delete_runner(runner.registration.id)
                unregistered = True
            # Also without a guest: a create killed between its volume and its domain left
            # `<guest>.qcow2` behind (destroy_guest is idempotent; ids are never reused).
            self.hypervisor.destroy_guest(
                runner.guest_name
                or policy.guest_name(self.runner_prefix, runner.profile, runner.id)
            )
        except Exception as failure:  # noqa: BLE001 - a worker must report, not vanish
            if not isinstance(failure, MonitorError):
                log.exception("destroy worker for runner %d crashed", runner.id)
            step = "destroy guest" if unregistered or runner.registration is None else "unregister"
            errors.append(f"{step}: {failure}")
            retry_after = _retry_after(failure)
        finally:
            unregistered_id = (
                runner.registration.id if unregistered and runner.registration else None
            )
            self._post(lambda: self._destroy_done(runner, unregistered_id, errors, retry_after))

    def _destroy_done(
        self,
        runner: policy.Runner,
        unregistered_id: int | None,
        errors: list[str],
        retry_after: float | None,
    ) -> None:
        self._in_flight.pop(runner.id, None)
        if unregistered_id is not None:
            self.registrations.remove(unregistered_id)
        if errors:
            message = "; ".join(errors)
            delay = self._destroy_backoff.failed(runner.id, self.clock(), retry_after)
            log.error(
                "destroying runner %d failed (retry in %s): %s",
                runner.id,
                delay,
                message,
                extra={"runner_id": runner.id},
            )
            models.record_event(
                "destroy-failed", f"{message} (retry in {delay})", runner_id=runner.id
            )
        else:
            self._destroy_backoff.succeeded(runner.id)
            log.info("destroyed runner %d", runner.id, extra={"runner_id": runner.id})
            models.record_event("destroyed", f"destroyed runner {runner.id}", runner_id=runner.id)
            self.registrations.invalidate()
            self.request_reconcile()

    @property
    def addresses(self) -> dict[str, str]:
        """Guest name -> IPv4 address, as the address job last found them (a read of a dict
        the job replaces whole, safe from any thread)."""
        return self._addresses

    @property
    def in_flight(self) -> dict[int, str]:
        # Copying a dict is one C call under the GIL, so other threads may read this safely
        # while the monitor thread changes it.
        return dict(self._in_flight)

    # Takes (monitor thread; the web layer reaches this through `call`) --------------------

    def take(
        self, profile_key: str, count: int, unique_id: str, qualified_repo: str, run_id: str
    ) -> Future:
        """Reserve up to `count` Idle runners of a profile for one job (spec §3.3).

        Decides here, on the monitor thread, which runners go to this job (so concurrent
        takes never share one); the label calls run on the reserve pool, concurrently with
        other takes'. The Future resolves to upstream's answer: a list of
        {"id", "runner"} (the runner as it was before the reservation), or None when no
        runner is idle. The same `unique_id` again (a client retrying) gets the same
        runners; with another profile or count it is a 409. A reservation that fails
        half-way is rolled back and answered with 502 (servo/ci-runners#56).
        """
        if profile_key not in self.config.profiles:
            raise MonitorError(f"No profile with key: {profile_key}", status=404)
        if self.observation is None:
            raise MonitorError("Monitor thread is still starting", status=503)
        asked = (profile_key, count, qualified_repo, run_id)
        take = self._takes.get(unique_id)
        failed = take is not None and take.future.done() and take.future.exception() is not None
        if take is not None and not failed:
            given = (take.profile, take.count, take.qualified_repo, take.run_id)
            self._check_same_take(unique_id, given, asked)
            return take.future
        done: Future = Future()
        previous = self._reservations.get(unique_id) or self._reservation_on_github(
            unique_id, count, qualified_repo, run_id
        )
        if previous is not None:
            given = (previous.profile, previous.count, previous.qualified_repo, previous.run_id)
            self._check_same_take(unique_id, given, asked)
            # Runners gone since (their jobs ran) are left out; none left is `null`, as
            # `jq -e .` must not take an empty array for a runner.
            done.set_result(self._remembered_answer(previous.runner_ids) or None)
            return done
        chosen = [] if self._stopping.is_set() else self._idle_runners(profile_key, count)
        if not chosen:
            done.set_result(None)
            return done
        take = _Take(unique_id, profile_key, count, qualified_repo, run_id, chosen)
        take.pending = len(chosen)
        self._takes[unique_id] = take
        self._reserving.update(runner.id for runner in chosen)
        labels = _reservation_labels(unique_id, qualified_repo, run_id, self.clock())
        for runner in chosen:
            self._reservers.submit(self._reserve_worker, take, runner, labels)
        return take.future

    @staticmethod
    def _check_same_take(
        unique_id: str, given: tuple[str, int, str, str], asked: tuple[str, int, str, str]
    ) -> None:
        """A unique_id names one job: a retry must ask exactly what was asked before."""
        if given != asked:
            profile, count, repo, run = given
            raise MonitorError(
                f"unique_id {unique_id} was already used to take {count} runner(s) of "
                f"{profile} for {repo} run {run}",
                status=409,
            )

    def _idle_runners(self, profile_key: str, limit: int) -> list[policy.Runner]:
        """Up to `limit` Idle runners of a profile as of now, lowest ids first: the last
        observation's runners with the registration the cache holds now (it has every
        reservation already made). Runs for every take on the monitor thread: cheap checks
        first, and it stops as soon as it has enough."""
        assert self.observation is not None
        idle: list[policy.Runner] = []
        for runner in self.observation.runners:  # ascending ids
            if runner.profile != profile_key or runner.registration is None:
                continue
            if runner.id in self._reserving or runner.id in self._in_flight:
                continue
            if self._is_held(runner.id):
                continue
            registration = self.registrations.get(runner.registration.id)
            if registration is None or registration.busy or registration.status != "online":
                continue
            if registration.label_value(policy.RESERVED_FOR) is not None:
                continue  # Reserved: most runners a burst of takes scans past are
            runner = replace(runner, registration=registration)
            if runner.status is policy.Status.IDLE:
                idle.append(runner)
                if len(idle) == limit:
                    break
        return idle

    def _is_held(self, runner_id: int) -> bool:
        held_since = self._held.get(runner_id)
        if held_since is None:
            return False
        if self.registrations.stored_fetch_began > held_since:
            del self._held[runner_id]  # the cache now shows GitHub's view after the failure
            return False
        return True

    def _take_answer(self, runners: list[policy.Runner]) -> list[dict[str, Any]]:
        """Upstream's take answer: {"id", "runner"} per runner, in the order given."""
        addresses = self._addresses
        return [
            {"id": r.id, "runner": dashboard.runner_json(r, addresses.get(r.guest_name or ""))}
            for r in runners
        ]

    def _reservation_on_github(
        self, unique_id: str, count: int, qualified_repo: str, run_id: str
    ) -> models.ReservationRecord | None:
        """Runners GitHub shows labelled `reserved-for:<unique_id>` though no record says so:
        the monitor was killed between adding the labels and saving the record (found by
        bench/crash.py). The labels are the record, so a retried take gets those runners
        instead of a second set."""
        assert self.observation is not None
        found = [
            runner
            for runner in self.observation.runners
            if runner.status is policy.Status.RESERVED
            and runner.registration is not None
            and runner.registration.label_value(policy.RESERVED_FOR) == unique_id
        ]
        if not found:
            return None
        record = models.ReservationRecord(
            found[0].profile,
            count,
            sorted(r.id for r in found),
            self.clock(),
            qualified_repo,
            run_id,
        )
        log.warning(
            "take %s: GitHub already has it on runner(s) %s (from before a restart); "
            "answering with them",
            unique_id,
            record.runner_ids,
        )
        self._reservations[unique_id] = record
        self._unsaved[unique_id] = record
        return record

    def _remembered_answer(self, runner_ids: list[int]) -> list[dict[str, Any]]:
        """The answer for a reservation made earlier, leaving out runners gone since."""
        observed = {r.id: r for r in self.observation.runners} if self.observation else {}
        return self._take_answer([observed[i] for i in sorted(runner_ids) if i in observed])

    def _reserve_worker(self, take: _Take, runner: policy.Runner, labels: list[str]) -> None:
        """Add the reservation labels to one runner; the last of a take's workers answers."""
        assert runner.registration is not None
        error: str | None = None
        registration = runner.registration
        try:
            names = self.github.add_labels(registration.id, labels)
            registration = replace(registration, labels=tuple(names))
        except Exception as failure:  # noqa: BLE001 - reported in the answer
            error = f"runner {runner.id}: {failure}"
        with take.lock:
            if error is None:
                take.reserved[runner.id] = registration
            else:
                take.errors.append(error)
            take.pending -= 1
            last = take.pending == 0
        if last:
            self._finish_take(take, labels)

    def _finish_take(self, take: _Take, labels: list[str]) -> None:
        """Answer the client as soon as the label calls are back; bookkeeping follows on the
        monitor thread."""
        if take.errors:
            # Every chosen runner, not only those whose call succeeded: a call whose answer
            # was lost may have added its labels all the same (a 404 here is fine).
            for runner in take.runners:
                assert runner.registration is not None
                if not self._unreserve(runner.id, runner.registration.id, labels):
                    take.unclear.append(runner.id)
        # Bookkeeping first, then the answer: whatever the client asks next is queued after it.
        self._post(lambda: self._take_done(take))
        if take.errors:
            message = "GitHub refused the reservation: " + "; ".join(take.errors)
            log.error("take %s for %s failed: %s", take.unique_id, take.profile, message)
            take.future.set_exception(MonitorError(message, status=502))
        else:
            take.future.set_result(self._take_answer(take.runners))

    def _unreserve(self, runner_id: int, registration_id: int, labels: list[str]) -> bool:
        """Remove a failed take's labels; False if that may not have worked."""
        clean = True
        for label in labels:
            try:
                self.github.remove_label(registration_id, label)
            except Exception as error:  # noqa: BLE001 - reported; the runner is held
                clean = False
                log.error(
                    "rolling back runner %d's label %s failed: %s",
                    runner_id,
                    label,
                    error,
                    extra={"runner_id": runner_id},
                )
        return clean

    def _take_done(self, take: _Take) -> None:
        now = self.clock()
        if self._takes.get(take.unique_id) is take:  # a retry of a failed take may replace it
            del self._takes[take.unique_id]
        self._reserving.difference_update(runner.id for runner in take.runners)
        if take.errors:
            # A runner whose rollback failed may still carry this take's labels: keep it from
            # other jobs until GitHub has been asked again (the reserve timeout ends it).
            for runner_id in take.unclear:
                self._held[runner_id] = time.monotonic()
            if take.unclear:
                self.registrations.invalidate()
            models.record_event(
                "take-failed",
                f"{take.unique_id} for {take.qualified_repo} run {take.run_id}: "
                + "; ".join(take.errors),
                profile=take.profile,
                at=now,
            )
        else:
            for registration in take.reserved.values():
                self.registrations.upsert(registration)
            ids = sorted(take.reserved)
            record = models.ReservationRecord(
                take.profile, take.count, ids, now, take.qualified_repo, take.run_id
            )
            self._reservations[take.unique_id] = record
            self._unsaved[take.unique_id] = record
            if self._last_prune is None or now - self._last_prune >= SWEEP_INTERVAL:
                self._last_prune = now
                cutoff = now - RESERVATION_MEMORY
                models.prune_reservations(cutoff)
                self._reservations = {
                    key: record
                    for key, record in self._reservations.items()
                    if record.created_at >= cutoff
                }
            self._request_view_refresh()

    def _save_unsaved(self) -> None:
        """Write a burst of takes' records in one transaction, after their clients have
        their answers (the in-memory reservations answer retries meanwhile)."""
        if not self._unsaved:
            return
        try:
            models.save_reservations(self._unsaved)
        except Exception:  # noqa: BLE001 - kept for the next try; the answers were given
            log.exception("writing %d take record(s) failed; will retry", len(self._unsaved))
            return
        self._unsaved = {}

    def _request_view_refresh(self) -> None:
        """Write takes' records and show their runners as Reserved soon (upstream cleared
        its dashboard after a take, so that nobody would send a take for runners no longer
        idle). Merged like reconcile requests and queued behind clients' requests."""
        self._view_stale = True
        if not self._view_refresh_queued.is_set():
            self._view_refresh_queued.set()
            self._enqueue(_PASS, _REFRESH_VIEW)

    def refresh_view_if_stale(self) -> None:
        """The scheduler's half-second job: re-render what a burst of takes left stale."""
        if self._view_stale:
            self._request_view_refresh()

    def _refresh_view(self) -> None:
        """A reservation changes no decision, so patch the last observation with the
        registrations the cache holds now instead of running a whole pass. Records are
        written at once; the render waits VIEW_MIN_INTERVAL after the last one, so a burst
        of takes is not slowed by one render per take (the scheduler catches up)."""
        self._save_unsaved()
        observation = self.observation
        if observation is None or self._reconcile_queued.is_set():
            return  # the coming pass renders anyway
        now = time.monotonic()
        if now - self._last_view_render < VIEW_MIN_INTERVAL.total_seconds():
            return
        self._view_stale = False
        self._last_view_render = now
        current = {r.id: r for r in self.registrations.snapshot() or []}
        runners = [
            replace(runner, registration=current.get(runner.registration.id, runner.registration))
            if runner.registration is not None
            else runner
            for runner in observation.runners
        ]
        counts = policy.runner_counts(self.policy_input(runners), observation.at)
        self._observe(replace(observation, runners=runners, counts=counts))

    # Guests (read-only; called from web and scheduler threads) ----------------------------

    def refresh_addresses(self) -> dict[str, str]:
        """Look up the IPv4 address of every runner guest (libvirt reads only)."""
        observation = self.observation
        if observation is None:
            return {}
        addresses: dict[str, str] = {}
        for runner in observation.runners:
            if runner.guest_name is None:
                continue
            try:
                address = self.hypervisor.ipv4_address(runner.guest_name)
            except MonitorError as error:
                log.debug("no address for %s: %s", runner.guest_name, error)
                continue
            if address is not None:
                addresses[runner.guest_name] = address
        for name, address in addresses.items():
            if self._addresses.get(name) != address:
                log.info("%s has address %s", name, address)
        self._addresses = addresses
        return addresses

    def runner_for_address(self, address: str) -> policy.Runner:
        """The runner whose guest has `address` (looked up again on a miss: the DHCP lease
        may be newer than the last refresh). MonitorError(503) if there is none."""
        wanted = _ipv4(address)
        moved = False
        for attempt in range(2):
            if attempt == 1:
                # Anyone can ask: a full lookup (one libvirt call per guest) at most once a
                # second for unknown addresses, at once when a known one has moved.
                now = time.monotonic()
                recent = now - self._last_address_refresh < ADDRESS_REFRESH_MIN_SECONDS
                if recent and not moved:
                    break
                self._last_address_refresh = now
                self.refresh_addresses()
            observation = self.observation
            if wanted is None or observation is None:
                break
            for runner in observation.runners:
                name = runner.guest_name
                if name and self._addresses.get(name) == wanted:
                    if self._still_at(name, wanted):
                        return runner
                    moved = True
        raise MonitorError(f"No runner found with IP address: {address}", status=503)

    def _still_at(self, guest_name: str, address: str) -> bool:
        """Ask libvirt again before trusting a remembered address: DHCP may have given a
        destroyed guest's address to a new one since the last refresh."""
        try:
            return self.hypervisor.ipv4_address(guest_name) == address
        except MonitorError:
            return False

    def runner_for_guest_token(self, token: str) -> models.Runner:
        """The live runner whose guest was given `token`: MonitorError 403 if none."""
        row = models.runner_by_guest_token(hashlib.sha256(token.encode()).hexdigest())
        if row is None:
            raise MonitorError("unknown or expired guest token", status=403)
        return row

    def jit_config_for_token(self, token: str) -> str | None:
        """The JIT config of the runner whose guest holds `token`, served once: a second
        request (a replayed or stolen token) is 410 Gone."""
        row = self.runner_for_guest_token(token)
        if not models.claim_jit_config(row.id, self.clock()):
            raise MonitorError(
                f"the JIT config of runner {row.id} has already been served", status=410
            )
        if row.jit_config is not None:
            log.info(
                "serving the JIT config of runner %d to its guest (token)",
                row.id,
                extra={"runner_id": row.id},
            )
            self.registrations.invalidate_in(JIT_SERVED_REFRESH, self.clock())
        return row.jit_config

    def boot_script_for_token(self, token: str) -> str:
        """The boot script for the runner or image rebuild guest that holds `token`; 410
        once the runner's JIT config has been served (its token is spent)."""
        profile = self.rebuilds.token_owner(token)
        if profile is None:
            row = self.runner_for_guest_token(token)
            if row.jit_served_at is not None:
                raise MonitorError(f"the guest token of runner {row.id} is spent", status=410)
            profile = row.profile
        return self._boot_script(profile)

    def jit_config_for(self, address: str) -> str | None:
        """The JIT config of the runner at `address` (None if it has none)."""
        runner = self.runner_for_address(address)
        row = models.get_runner(runner.id)
        config = row.jit_config if row is not None else None
        if config is not None:
            log.info(
                "serving the JIT config of runner %d to %s",
                runner.id,
                address,
                extra={"runner_id": runner.id},
            )
            self.registrations.invalidate_in(JIT_SERVED_REFRESH, self.clock())
        return config

    def boot_script_for(self, address: str) -> str:
        """The boot script of the profile of the runner, or of the image rebuild guest, at
        `address` (upstream recognised rebuild guests by their address too)."""
        try:
            profile = self.runner_for_address(address).profile
        except MonitorError:
            profile = self.rebuilds.image_address_owner(_ipv4(address) or "")
            if profile is None:
                raise
        return self._boot_script(profile)

    def _boot_script(self, profile: str) -> str:
        if profile not in self.config.profiles:
            raise MonitorError(f"profile {profile} is no longer configured", status=404)
        path = self.config.profiles[profile].config_dir / "boot-script"
        try:
            return path.read_text()
        except OSError as error:
            raise MonitorError(f"cannot read {path}: {error.strerror}", status=503) from None

    def screenshot_now(self, runner_id: int) -> bytes:
        """A fresh screenshot of a runner's guest, as PNG. It is saved too (unless unchanged),
        so the page's thumbnail shows it at once."""
        observation = self.observation
        runner = (
            next((r for r in observation.runners if r.id == runner_id), None)
            if observation
            else None
        )
        if runner is None:
            raise MonitorError(f"No runner with id: {runner_id}", status=404)
        if runner.guest_name is None:
            raise MonitorError(f"Runner {runner_id} has no libvirt guest", status=404)
        raw = self.hypervisor.screenshot_raw(runner.guest_name)
        try:
            self.screenshots.save(runner_id, raw)
        except MonitorError as error:
            # Not saved (say the disk is full), but the picture may be fine: the click gets it.
            log.warning(
                "cannot save the screenshot of runner %d: %s",
                runner_id,
                error,
                extra={"runner_id": runner_id},
            )
        # A PNG (what QEMU 7.1+ and the test driver give) is returned as it is, not encoded
        # again; only a PPM pays a second encode, on a click.
        return to_png(raw)

    def refresh_screenshots(self) -> int:
        """One screenshot pass (scheduler thread; libvirt reads only): save the screen of every
        runner guest under data/runners/<id>/ unless it is unchanged, and drop the files of
        runners that are gone. A guest that fails is logged and skipped. Returns how many
        screenshots were encoded (the pass's other counts are in `screenshots.last_pass`)."""
        observation = self.observation
        if observation is None:
            return 0  # Nothing observed yet: no runner is known to be gone either.
        guests = {r.id: r.guest_name for r in observation.runners if r.guest_name is not None}
        started = time.perf_counter()
        encoded = self.screenshots.refresh(guests, self.hypervisor.screenshot_raw).encoded
        self.metrics.screenshot_pass_seconds.observe(time.perf_counter() - started)
        return encoded

    def screenshot_version(self, runner_id: int) -> str | None:
        """A short string that changes with the runner's saved screenshot (for cache-busting
        thumbnail URLs), or None while it has none."""
        return self.screenshots.version(runner_id)

    # Override (monitor thread; the web layer reaches these through `call`) -----------------

    def set_override(self, counts: dict[str, int]) -> policy.Override:
        """Apply a policy override (spec §5.6) and persist it (upstream forgot it on restart)."""
        runners = self.observation.runners if self.observation is not None else None
        override = policy.try_override(self.policy_input(runners), counts, self.clock())
        self.override = override
        models.save_override(override)
        models.record_event("override", f"override set: {override.profile_override_counts}")
        self.request_reconcile()
        return override

    def request_destroy(self, runner_id: int, force: bool = False) -> dict[str, Any]:
        """Destroy a runner at the next pass (unregister, stop, delete its disk); the policy
        replaces it. A Busy runner is running a job: only with `force`."""
        observation = self.observation
        runner = (
            next((r for r in observation.runners if r.id == runner_id), None)
            if (observation is not None)
            else None
        )
        if runner is None:
            raise MonitorError(f"No runner with id: {runner_id}", status=404)
        if runner.status is policy.Status.BUSY and not force:
            raise MonitorError(
                f"runner {runner_id} is Busy (running a job); add force=1 to destroy it anyway",
                status=409,
            )
        if runner_id not in self._destroy_requests:
            self._destroy_requests.add(runner_id)
            models.record_event(
                "destroy-requested",
                f"the operator asked to destroy runner {runner_id} ({runner.status.value})",
                runner_id=runner_id,
                profile=runner.profile,
            )
            self.request_reconcile()
        return {"id": runner_id, "status": runner.status.value, "destroying": True}

    # Drain, pause, maintenance (monitor thread, through `call`) ------------------------------

    def set_drained(self, profile_key: str, drained: bool) -> policy.Holds:
        """Drain a profile (target 0: Idle runners go, Busy and Reserved ones finish, none are
        made) or undrain it (its target again)."""
        if profile_key not in self.config.profiles:
            raise MonitorError(f"No profile with key: {profile_key}", status=404)
        keys = self.holds.drained | {profile_key} if drained else self.holds.drained - {profile_key}
        what = "drained: nothing new is made, busy runners finish" if drained else "undrained"
        return self._hold(replace(self.holds, drained=keys), f"profile {profile_key} {what}")

    def set_paused(self, paused: bool) -> policy.Holds:
        """Pause the host (create and rebuild nothing; runners that exist keep serving)."""
        what = "paused: nothing is created or rebuilt" if paused else "resumed"
        return self._hold(replace(self.holds, paused=paused), f"host {what}")

    def set_maintenance(self, on: bool) -> policy.Holds:
        """Maintenance: every profile drained until it is switched off again."""
        what = "in maintenance: every profile drained" if on else "out of maintenance"
        return self._hold(replace(self.holds, maintenance=on), f"host {what}")

    def _hold(self, holds: policy.Holds, message: str) -> policy.Holds:
        if holds != self.holds:
            models.save_holds(holds)
            self.holds = holds
            log.warning("%s", message)
            models.record_event("hold", message)
            self.request_reconcile()
        return holds

    def clear_override(self) -> policy.Override | None:
        """Cancel the override, returning it (None if there was none)."""
        previous = self.override
        self.override = None
        models.save_override(None)
        if previous is not None:
            models.record_event("override", "override cancelled")
            self.request_reconcile()
        return previous


def _reservation_labels(
    unique_id: str, qualified_repo: str, run_id: str, now: datetime
) -> list[str]:
    """Upstream's reservation labels (spec §4.6)."""
    return [
        f"{policy.RESERVED_FOR}:{unique_id}",
        f"{policy.RESERVED_SINCE}:{int(now.timestamp())}",
        f"reserved-by:{qualified_repo}/actions/runs/{run_id}",
    ]


def parse_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An IP address, with an IPv4-mapped IPv6 one unwrapped to IPv4; None if not one."""
    try:
        parsed = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return parsed.ipv4_mapped
    return parsed


def _ipv4(address: str) -> str | None:
    """An IPv4 address as text (IPv4-mapped IPv6 unwrapped); None for anything else."""
    parsed = parse_address(address)
    return str(parsed) if isinstance(parsed, ipaddress.IPv4Address) else None


def polling_delay(rate_limit: Any, now: datetime, normal: timedelta) -> timedelta | None:
    """How long to wait before the next runner-list fetch when GitHub's budget runs low
    (under LOW_BUDGET_FRACTION of the limit left), or None while it does not: the time to
    the reset spread over half the calls left, never less often than `normal`."""
    if rate_limit is None or rate_limit.remaining >= rate_limit.limit * LOW_BUDGET_FRACTION:
        return None
    until_reset = rate_limit.reset_at - now
    if until_reset <= timedelta(0):
        return None
    return max(normal, until_reset / max(1, rate_limit.remaining // 2))


def _retry_after(error: BaseException) -> float | None:
    return error.retry_after if isinstance(error, TransientError) else None


def _destroy_reason(runner: policy.Runner, destroy_all: bool, image: str | None = None) -> str:
    if destroy_all:
        return f"destroy_all_non_busy_runners is set (runner is {runner.status.value})"
    if runner.status is policy.Status.IDLE and image and runner.image and runner.image != image:
        # policy.outdated_to_replace: a rolling rebuild replaces Idle runners of older images.
        return f"its image {runner.image} is outdated (the profile's is {image})"
    return {
        policy.Status.INVALID: "its guest is gone; unregistering",
        policy.Status.DONE_OR_UNREGISTERED: "its job is done (no registration)",
        policy.Status.STARTED_OR_CRASHED: "it did not come online in time",
        policy.Status.RESERVED: "it stayed reserved too long",
        policy.Status.IDLE: "more idle runners than the target",
        policy.Status.BUSY: "destroy requested",
    }[runner.status]
