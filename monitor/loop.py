"""The monitor thread: the only code that decides changes to VMs or GitHub state.

One dedicated thread drains a request queue. A reconcile request runs `Monitor.tick(now)`:
observe (cached registrations + a live guest list), decide (the pure policy), and hand the slow
calls it decided on to the worker pool (`workers.Workers`) or, for reservations, the reserve
pool (`takes.Takes`). Their outcomes come back through the same queue (`post`), so one slow
GitHub answer never holds up the next request. Web threads run functions on this thread with
`call` and wait for the reply; a reply that comes after the caller gave up is dropped.

This module runs on the monitor thread only, apart from the queue's entry points (`call`,
`post`, `request_reconcile`, `ping`), which any thread may use. The parts it owns say which
thread runs what: `registrations` (GitHub's runner list, scheduler thread), `workers`,
`takes`, `guests` (lookups for web and scheduler threads) and `rebuilds`.
"""

from __future__ import annotations

import itertools
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from dataclasses import field
from dataclasses import replace
from datetime import UTC
from datetime import datetime
from datetime import timedelta
from typing import Any

from monitor import metrics
from monitor import models
from monitor import policy
from monitor import wire
from monitor.config import Config
from monitor.errors import MonitorError
from monitor.github import GitHub
from monitor.guests import Guests
from monitor.hypervisor import Hypervisor
from monitor.ratelimit import Backoff
from monitor.rebuilds import Rebuilds
from monitor.registrations import Registrations
from monitor.registrations import SeenBusy
from monitor.takes import Takes
from monitor.workers import Workers

log = logging.getLogger(__name__)

# Runners just taken show as Reserved within this (or the scheduler's half second).
VIEW_MIN_INTERVAL = timedelta(milliseconds=250)
# Housekeeping that need not run every pass.
SWEEP_INTERVAL = timedelta(minutes=1)
# A failed image rebuild is tried again after 30 s, 1 min, 2 min, … at most an hour apart.
REBUILD_BACKOFF_BASE = timedelta(seconds=30)
REBUILD_BACKOFF_CAP = timedelta(hours=1)


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Rendered:
    """The dashboard as served: rendered once per observation, not once per request."""

    observation: policy.Observation
    json: bytes


@dataclass
class Request:
    """A function a caller wants run on the monitor thread, and its reply."""

    func: Callable[[], Any]
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None
    abandoned: bool = False


STOP = object()
RECONCILE = object()
REFRESH_VIEW = object()
# The monitor thread takes requests in this order, FIFO within one: clients' requests and
# worker outcomes first (in the order they came: a take's bookkeeping is queued before its
# client is answered, so the client's next request sees it), then a reconcile pass; a stop
# request last, so everything queued before it is answered.
_CALL, _PASS, _LAST = range(3)
_OUTCOME = _CALL


class Monitor:
    """Owns the monitor thread, its request queue and the parts that do its work."""

    def __init__(
        self,
        config: Config,
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
        self.override: policy.Override | None = models.load_override()
        self.holds: policy.Holds = models.load_holds()
        # Runners the operator asked to destroy, until they are gone (request_destroy), and
        # those of them asked with force (destroyed even when Busy, without a look first).
        self._destroy_requests: set[int] = set()
        self._destroy_forced: set[int] = set()
        self.seen_busy = SeenBusy()
        self.observation: policy.Observation | None = None
        self.rendered: Rendered | None = None
        self.metrics = metrics.Metrics()
        self._requests: queue.PriorityQueue[tuple[int, int, Any]] = queue.PriorityQueue()
        self._sequence = itertools.count()
        self._reconcile_queued = threading.Event()
        self._view_refresh_queued = threading.Event()
        self._view_stale = False
        self._last_view_render = 0.0
        self._last_sweep: datetime | None = None
        self._reported_ignored: set[str] = set()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.registrations = Registrations(
            github,
            suffix=config.github_api_suffix,
            cache_timeout=config.api_cache_timeout,
            clock=self.now,
            observe=lambda: self.observation,
            request_reconcile=self.request_reconcile,
        )
        self.rebuilds = Rebuilds(
            config,
            hypervisor,
            post=self.post,
            backoff=Backoff(base=REBUILD_BACKOFF_BASE, cap=REBUILD_BACKOFF_CAP),
            stopping=self._stopping,
            clock=self.now,
        )
        # Each profile's current image snapshot (the rebuilds keep it current).
        self.snapshots: dict[str, str] = self.rebuilds.snapshots
        self.workers = Workers(
            config,
            github,
            hypervisor,
            registrations=self.registrations.cache,
            snapshots=self.snapshots,
            seen_busy=self.seen_busy,
            post=self.post,
            request_reconcile=self.request_reconcile,
            stopping=self._stopping,
            clock=self.now,
            workers=workers,
        )
        self.guests = Guests(
            config,
            hypervisor,
            observe=lambda: self.observation,
            registrations=self.registrations.cache,
            rebuilds=self.rebuilds,
            metrics=self.metrics,
            clock=self.now,
        )
        self.takes = Takes(
            config,
            github,
            observe=lambda: self.observation,
            registrations=self.registrations.cache,
            in_flight=self.workers.in_flight,
            addresses=lambda: self.guests.addresses,
            call=self.call,
            post=self.post,
            view_changed=self._request_view_refresh,
            stopping=self._stopping,
            metrics=self.metrics,
            clock=self.now,
        )
        self.metrics.attach(self)

    def now(self) -> datetime:
        """The monitor's clock, as its parts read it (tests may swap `clock`)."""
        return self.clock()

    @property
    def runner_prefix(self) -> str:
        return self.config.libvirt_runner_guest_prefix

    @property
    def in_flight(self) -> dict[int, str]:
        """Runner id -> the work under way on it. Copying a dict is one C call under the
        GIL, so other threads may read this safely while the monitor thread changes it."""
        return dict(self.workers.in_flight)

    # The thread and its queue (any thread) ------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="monitor", daemon=True)
        self._thread.start()
        self.takes.start()

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        """Answer what is queued, let running work finish, and end the thread.

        Takes in progress complete (their clients are waiting, and their bookkeeping must
        reach the store); creates not started yet are dropped. The workers' outcomes are
        queued before the stop request, so the monitor thread records them first."""
        self._stopping.set()
        self.takes.shutdown()
        self.rebuilds.shutdown()
        self.workers.shutdown()
        self._enqueue(_LAST, STOP)
        if self._thread is not None:
            self._thread.join(timeout)

    def request_reconcile(self) -> None:
        """Ask for a reconcile pass; requests made while one is queued are merged."""
        if not self._reconcile_queued.is_set():
            self._reconcile_queued.set()
            self._enqueue(_PASS, RECONCILE)

    def call(self, func: Callable[[], Any], timeout: float) -> Any:
        """Run `func` on the monitor thread and return its result (raising its error).

        If `func` returns a Future (work it handed to its workers), wait for that too, within
        the same `timeout`. Raises MonitorError(503) when no answer comes in time; the request
        is then abandoned and its eventual result dropped (upstream crashed here, spec §2.3).
        """
        deadline = time.monotonic() + timeout
        request = Request(func)
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

    def post(self, func: Callable[[], None]) -> None:
        """Queue `func` to run on the monitor thread (worker outcomes come back this way)."""
        self._enqueue(_OUTCOME, func)

    def next_request(self, timeout: float | None = None) -> Any:
        """The next request for the monitor thread (raises queue.Empty after `timeout`)."""
        return self._requests.get(timeout=timeout)[2]

    def run_pending(
        self, timeout: float = 10.0, until: Callable[[], bool] | None = None
    ) -> None:
        """Without the thread (tests drive the passes by calling `tick`): run queued calls
        and worker outcomes on the calling thread until `until()` holds or, without it, until
        no work is in flight. Queued reconcile passes and view refreshes are dropped.
        Raises TimeoutError when that takes longer than `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while until is None or not until():
            if time.monotonic() >= deadline:
                raise TimeoutError(f"gave up after {timeout} s; in flight: {self.in_flight}")
            try:
                item = self.next_request(timeout=0.02)
            except queue.Empty:
                if until is None and self.workers.idle():
                    return
                continue
            if item is RECONCILE:
                self._reconcile_queued.clear()
            elif item is REFRESH_VIEW:
                self._view_refresh_queued.clear()
            else:
                self.handle(item)

    def _enqueue(self, priority: int, item: Any) -> None:
        self._requests.put((priority, next(self._sequence), item))

    def _run(self) -> None:
        log.info("monitor thread started")
        while True:
            item = self.next_request()
            if item is STOP:
                self.takes.save_unsaved()
                break
            try:
                self.handle(item)
            except Exception:  # noqa: BLE001 - the monitor thread must never die
                log.exception("monitor thread: unexpected error (continuing)")
        log.info("monitor thread stopped")

    def handle(self, item: Any) -> None:
        """Run one request taken from the queue (`next_request`)."""
        if item is RECONCILE:
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
        elif item is REFRESH_VIEW:
            self._view_refresh_queued.clear()
            self._refresh_view()
        elif isinstance(item, Request):
            if item.abandoned:
                return
            try:
                item.result = item.func()
            except BaseException as error:  # noqa: BLE001 - handed to the caller
                item.error = error
            item.done.set()
        elif callable(item):
            item()

    # One reconcile pass --------------------------------------------------------------------

    def tick(self, now: datetime) -> policy.Observation | None:
        """One pass: observe, decide, dispatch.

        1. Take the cached registrations (none yet: wait for the first fetch).
        2. List our guests (a libvirt failure ends this pass only).
        3. Adopt guests and registrations of configured profiles that have no store row.
        4. Build runners (the pure pairing), forget runners that are gone.
        5. Keep the override's bookkeeping; compute counts and changes.
        6. Hand destroys, then (only when nothing is being destroyed) creates to workers.
        """
        self.takes.save_unsaved()
        registrations = self.registrations.cache.snapshot()
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
        runners, ignored = self._runners(registrations, guest_names, now)
        self._destroy_requests &= {r.id for r in runners}
        self._destroy_forced &= self._destroy_requests
        override = policy.update_override(self.override, runners)
        if override != self.override:
            self.override = override
            models.save_override(override)
        inp = self.policy_input(runners)
        counts = policy.runner_counts(inp, now)
        try:
            changes: policy.RunnerChanges | None = policy.decide(inp, now)
        except MonitorError as error:
            log.error("tick: policy failed: %s", error)
            changes = None
        observation = policy.Observation(now, runners, counts, ignored, changes, self.override)
        self._observe(observation)
        self.rebuilds.start_due(inp, now)
        if changes is None or self.registrations.too_stale(now):
            return observation
        self.workers.dispatch(changes, runners, now)
        if self._last_sweep is None or now - self._last_sweep >= SWEEP_INTERVAL:
            self._last_sweep = now
            self.workers.sweep_orphan_volumes(guest_names, now)
            self._sweep_rebuild_guests()
        return observation

    def _runners(
        self, registrations: list[policy.Registration], guest_names: list[str], now: datetime
    ) -> tuple[list[policy.Runner], list[str]]:
        """Pair registrations and guests into the runners of configured profiles (adopting
        what has no store row yet) and forget the runners that are gone. Also returns what
        in our namespace is not ours (reported, never touched)."""
        live = models.live_records()
        if self._adopt(registrations, guest_names, live, now):
            live = models.live_records()
        # Runners of a profile no longer configured are reported, never touched.
        records = {
            runner_id: record
            for runner_id, record in live.items()
            if record.profile in self.config.profiles
        }
        in_flight = self.workers.in_flight
        runners, ignored = policy.build_runners(
            registrations,
            guest_names,
            records,
            runner_prefix=self.runner_prefix,
            suffix=self.config.github_api_suffix,
            in_flight=in_flight.keys() | self.takes.reserving | self.takes.held.keys(),
            destroying=self.workers.destroying(),
            seen_busy=self.seen_busy.ids,
        )
        self._report_ignored(ignored, now)
        present = {runner.id for runner in runners}
        self.seen_busy.note(
            (r.id for r in runners if r.registration is not None and r.registration.busy),
            live=present,
        )
        gone = [rid for rid in records if rid not in present and rid not in in_flight]
        if gone:
            models.mark_destroyed(gone, now)
            for rid in gone:
                log.info("runner %d is gone", rid, extra={"runner_id": rid})
        return runners, ignored

    def _sweep_rebuild_guests(self) -> None:
        try:
            guests = self.hypervisor.list_guests(self.config.libvirt_rebuild_guest_prefix + "-")
        except MonitorError as error:
            log.warning("listing rebuild guests failed: %s", error)
            return
        self.rebuilds.sweep([guest.name for guest in guests])

    def policy_input(self, runners: list[policy.Runner] | None) -> policy.PolicyInput:
        return policy.PolicyInput(
            profiles=self.config.profiles,
            settings=self.config,
            runners=runners,
            snapshots=self.snapshots,
            override=self.override,
            finished_runs=self.registrations.finished_runs,
            drained=self.holds.drained_profiles(self.config.profiles),
            paused=self.holds.paused,
            destroy_requested=frozenset(self._destroy_requests),
            destroy_forced=frozenset(self._destroy_forced),
        )

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

    # Publishing what a pass saw ------------------------------------------------------------

    def _publish_error(self, now: datetime, error: str) -> None:
        previous = self.observation
        if previous is None:
            self._observe(policy.Observation(now, [], {}, [], None, self.override, error))
        else:
            self._observe(replace(previous, at=now, error=error))

    def _observe(self, observation: policy.Observation) -> None:
        """Publish an observation and its rendered dashboard (served as is, per request)."""
        body = wire.dashboard_json(
            observation, self.config.external_base_url, self.guests.addresses, self.holds
        )
        self.metrics.note_transitions(self.observation, observation)
        self._note_history(self.observation, observation)
        self.observation = observation
        self.rendered = Rendered(observation, json.dumps(body, sort_keys=True).encode())

    def _note_history(
        self, before: policy.Observation | None, after: policy.Observation
    ) -> None:
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

    def _request_view_refresh(self) -> None:
        """Write takes' records and show their runners as Reserved soon (upstream cleared
        its dashboard after a take, so that nobody would send a take for runners no longer
        idle). Merged like reconcile requests and queued behind clients' requests."""
        self._view_stale = True
        if not self._view_refresh_queued.is_set():
            self._view_refresh_queued.set()
            self._enqueue(_PASS, REFRESH_VIEW)

    def refresh_view_if_stale(self) -> None:
        """The scheduler's half-second job: re-render what a burst of takes left stale."""
        if self._view_stale:
            self._request_view_refresh()

    def _refresh_view(self) -> None:
        """A reservation changes no decision, so patch the last observation with the
        registrations the cache holds now instead of running a whole pass. Records are
        written at once; the render waits VIEW_MIN_INTERVAL after the last one, so a burst
        of takes is not slowed by one render per take (the scheduler catches up)."""
        self.takes.save_unsaved()
        observation = self.observation
        if observation is None or self._reconcile_queued.is_set():
            return  # the coming pass renders anyway
        now = time.monotonic()
        if now - self._last_view_render < VIEW_MIN_INTERVAL.total_seconds():
            return
        self._view_stale = False
        self._last_view_render = now
        current = {r.id: r for r in self.registrations.cache.snapshot() or []}
        runners = [
            replace(runner, registration=current.get(runner.registration.id, runner.registration))
            if runner.registration is not None
            else runner
            for runner in observation.runners
        ]
        counts = policy.runner_counts(self.policy_input(runners), observation.at)
        self._observe(replace(observation, runners=runners, counts=counts))

    # Operator requests (run here through `call`) -------------------------------------------

    def set_override(self, counts: dict[str, int]) -> policy.Override:
        """Apply a policy override (spec §5.6) and persist it (upstream forgot it on restart)."""
        runners = self.observation.runners if self.observation is not None else None
        override = policy.try_override(self.policy_input(runners), counts, self.clock())
        self.override = override
        models.save_override(override)
        models.record_event("override", f"override set: {override.profile_override_counts}")
        self.request_reconcile()
        return override

    def clear_override(self) -> policy.Override | None:
        """Cancel the override, returning it (None if there was none)."""
        previous = self.override
        self.override = None
        models.save_override(None)
        if previous is not None:
            models.record_event("override", "override cancelled")
            self.request_reconcile()
        return previous

    def request_destroy(self, runner_id: int, force: bool = False) -> dict[str, Any]:
        """Destroy a runner at the next pass (unregister, stop, delete its disk); the policy
        replaces it. A Busy runner is running a job: only with `force`. Without it, the
        worker first asks GitHub whether the runner is busy (the cached list may not say so
        yet), and a runner that turns Busy meanwhile is left to finish its job."""
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
        if force:
            self._destroy_forced.add(runner_id)
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
