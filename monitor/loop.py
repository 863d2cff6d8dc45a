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

Imports policy, models, errors, and the GitHub/Hypervisor *protocols* only.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from dataclasses import field
from dataclasses import replace
from datetime import UTC
from datetime import datetime
from datetime import timedelta
from typing import Any
from typing import Protocol

from monitor import models
from monitor import policy
from monitor.errors import MonitorError
from monitor.errors import TransientError

log = logging.getLogger(__name__)

# Upstream's JIT work folders by image kind; everything else is Linux-like.
WORK_FOLDERS = {"windows": "C:\\a", "macos": "/Users/servo/a"}
# How soon to look at GitHub again after serving a JIT config (spec §9.2).
JIT_SERVED_REFRESH = timedelta(seconds=10)
# Back-off after a GitHub list failure with no Retry-After.
DEFAULT_GITHUB_BACKOFF = timedelta(seconds=10)


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
        self._forced_expiry: datetime | None = None
        self._not_before: datetime | None = None
        self._journal: list[tuple[int, str, Any]] = []
        self._generation = 0

    def is_due(self, now: datetime) -> bool:
        with self._lock:
            if self._not_before is not None and now < self._not_before:
                return False
            if self._registrations is None or self._fetched_at is None:
                return True
            if now - self._fetched_at >= self.timeout:
                return True
            return self._forced_expiry is not None and now >= self._forced_expiry

    def begin_fetch(self) -> int:
        with self._lock:
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
            self._forced_expiry = None
            self._not_before = None

    def back_off(self, until: datetime) -> None:
        with self._lock:
            self._not_before = until

    def invalidate(self) -> None:
        with self._lock:
            self._fetched_at = None
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


@dataclass
class _Request:
    func: Callable[[], Any]
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None
    abandoned: bool = False


_STOP = object()
_RECONCILE = object()


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
        self.snapshots: dict[str, str] = {}
        self.observation: Observation | None = None
        self.github_error: str | None = None
        self._requests: queue.Queue[Any] = queue.Queue()
        self._reconcile_queued = threading.Event()
        self._workers = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="monitor-worker")
        self._in_flight: dict[int, str] = {}
        self._reported_ignored: set[str] = set()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    @property
    def runner_prefix(self) -> str:
        return self.config.libvirt_runner_guest_prefix

    # Thread and queue ---------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="monitor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the request in hand, wait for workers, and end the thread."""
        self._stopping.set()
        self._requests.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout)
        self._workers.shutdown(wait=True, cancel_futures=True)

    def request_reconcile(self) -> None:
        """Ask for a reconcile pass; requests made while one is queued are merged."""
        if not self._reconcile_queued.is_set():
            self._reconcile_queued.set()
            self._requests.put(_RECONCILE)

    def call(self, func: Callable[[], Any], timeout: float) -> Any:
        """Run `func` on the monitor thread and return its result (raising its error).

        Raises MonitorError(503) when no answer comes within `timeout`; the request is then
        abandoned and its eventual result dropped (upstream crashed here, spec §2.3).
        """
        request = _Request(func)
        self._requests.put(request)
        if not request.done.wait(timeout):
            request.abandoned = True
            raise MonitorError("the monitor thread did not answer in time", status=503)
        if request.error is not None:
            raise request.error
        return request.result

    def _run(self) -> None:
        log.info("monitor thread started")
        while True:
            item = self._requests.get()
            if item is _STOP:
                break
            try:
                self._handle(item)
            except Exception:  # noqa: BLE001 - the monitor thread must never die
                log.exception("monitor thread: unexpected error (continuing)")
        log.info("monitor thread stopped")

    def _handle(self, item: Any) -> None:
        if item is _RECONCILE:
            self._reconcile_queued.clear()
            self.tick(self.clock())
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

    def _post(self, func: Callable[[], None]) -> None:
        """Queue `func` to run on the monitor thread (worker outcomes come back this way)."""
        self._requests.put(func)

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
            delay = DEFAULT_GITHUB_BACKOFF
            if isinstance(error, TransientError) and error.retry_after is not None:
                delay = timedelta(seconds=max(1.0, error.retry_after))
            self.registrations.back_off(now + delay)
            if self.github_error != str(error):
                log.warning("GitHub runner list failed, retrying in %s: %s", delay, error)
                models.record_event("github-error", f"listing runners failed: {error}")
            self.github_error = str(error)
            return False
        suffix = "@" + self.config.github_api_suffix
        ours = [r for r in fetched if r.name.endswith(suffix)]
        self.registrations.store(ours, self.clock(), began)
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
        registrations = self.registrations.snapshot()
        if registrations is None:
            log.debug("tick: no registrations yet; waiting for the first GitHub fetch")
            return None
        try:
            guests = self.hypervisor.list_guests(self.runner_prefix + "-")
        except MonitorError as error:
            log.warning("tick: listing guests failed: %s", error)
            models.record_event("libvirt-error", f"listing guests failed: {error}", at=now)
            self._publish_error(now, f"listing guests failed: {error}")
            return None
        guest_names = [guest.name for guest in guests]

        self._adopt(registrations, guest_names, now)
        # Runners of a profile no longer configured are reported, never touched.
        records = {
            runner_id: record
            for runner_id, record in models.live_records().items()
            if record.profile in self.config.profiles
        }
        runners, ignored = policy.build_runners(
            registrations,
            guest_names,
            records,
            runner_prefix=self.runner_prefix,
            suffix=self.config.github_api_suffix,
            in_flight=self._in_flight.keys(),
        )
        self._report_ignored(ignored, now)
        present = {runner.id for runner in runners}
        gone = [rid for rid in records if rid not in present and rid not in self._in_flight]
        if gone:
            models.mark_destroyed(gone, now)
            for rid in gone:
                log.info("runner %d is gone", rid)

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
        self.observation = observation
        if changes is not None:
            self._dispatch(changes, runners, now)
        return observation

    def policy_input(self, runners: list[policy.Runner] | None) -> policy.PolicyInput:
        return policy.PolicyInput(
            profiles=self.config.profiles,
            settings=self.config,
            runners=runners,
            snapshots=self.snapshots,
            override=self.override,
        )

    def _publish_error(self, now: datetime, error: str) -> None:
        previous = self.observation
        if previous is None:
            self.observation = Observation(now, [], {}, [], None, self.override, error)
        else:
            self.observation = replace(previous, at=now, error=error)

    def _adopt(
        self, registrations: list[policy.Registration], guest_names: list[str], now: datetime
    ) -> None:
        """Count what already exists in our namespace as ours, if its profile is configured."""
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
        for runner_id, profile in sorted(found.items()):
            if profile not in self.config.profiles:
                continue  # reported as ignored by build_runners; never touched
            row = models.get_runner(runner_id)
            if row is None:
                name = policy.guest_name(self.runner_prefix, profile, runner_id)
                models.create_runner(runner_id, profile, name, now, adopted=True)
                models.ensure_runner_id_above(runner_id)
                log.info("adopted runner %d (%s) found in our namespace", runner_id, name)
                models.record_event(
                    "adopt",
                    f"adopted existing {name}",
                    runner_id=runner_id,
                    profile=profile,
                    at=now,
                )
            elif row.destroyed_at is not None and row.profile == profile:
                models.revive_runner(runner_id)
                models.record_event(
                    "adopt", f"{row.guest_name} exists again", runner_id=runner_id, at=now
                )

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
        by_id = {runner.id: runner for runner in runners}
        for runner_id in changes.destroy:
            runner = by_id.get(runner_id)
            if runner is None or runner_id in self._in_flight:
                continue
            reason = _destroy_reason(runner, self.config.destroy_all_non_busy_runners)
            log.info("destroying runner %d (%s): %s", runner_id, runner.profile, reason)
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
            for _ in range(count):
                self._start_create(profile_key, now)

    def _start_create(self, profile_key: str, now: datetime) -> None:
        profile = self.config.profiles[profile_key]
        if getattr(profile, "base_image", None) is None:
            log.error("cannot create a runner for %s: it has no base image yet", profile_key)
            return
        runner_id = models.allocate_runner_id()
        name = policy.guest_name(self.runner_prefix, profile_key, runner_id)
        models.create_runner(runner_id, profile_key, name, now)
        models.record_event(
            "create", f"creating {name}", runner_id=runner_id, profile=profile_key, at=now
        )
        log.info("creating runner %d (%s)", runner_id, name)
        self._in_flight[runner_id] = "create"
        self._workers.submit(self._create_worker, runner_id, profile, name)

    def _create_worker(self, runner_id: int, profile: Any, name: str) -> None:
        """Register (JIT), create and start one guest. On failure, undo what was done."""
        registration: policy.Registration | None = None
        error: str | None = None
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
            self.hypervisor.create_guest(name, template, profile.base_image)
            self.hypervisor.start_guest(name)
            models.record_started(runner_id, self.clock())
        except (MonitorError, OSError) as failure:
            error = str(failure)
            self._undo_create(name, registration)
            registration = None
        except Exception as failure:  # noqa: BLE001 - a worker must report, not vanish
            log.exception("create worker for %s crashed", name)
            error = f"unexpected error: {failure}"
            self._undo_create(name, registration)
            registration = None
        self._post(lambda: self._create_done(runner_id, name, registration, error))

    def _undo_create(self, name: str, registration: policy.Registration | None) -> None:
        if registration is not None:
            try:
                self.github.delete_runner(registration.id)
            except MonitorError as error:
                log.warning("undo create %s: unregister failed (will retry): %s", name, error)
        try:
            self.hypervisor.destroy_guest(name)
        except MonitorError as error:
            log.warning("undo create %s: destroy failed (will retry): %s", name, error)

    def _create_done(
        self,
        runner_id: int,
        name: str,
        registration: policy.Registration | None,
        error: str | None,
    ) -> None:
        self._in_flight.pop(runner_id, None)
        if error is None:
            if registration is not None:
                self.registrations.upsert(registration)
            log.info("created runner %d (%s)", runner_id, name)
            models.record_event("created", f"created and started {name}", runner_id=runner_id)
        else:
            log.error("creating runner %d (%s) failed: %s", runner_id, name, error)
            models.record_event("create-failed", f"{name}: {error}", runner_id=runner_id)
        # Look at GitHub again soon, as upstream does after every create (spec §9.2); the
        # write-through above already keeps decisions correct until then.
        self.registrations.invalidate()
        self.request_reconcile()

    def _destroy_worker(self, runner: policy.Runner) -> None:
        """Unregister, then destroy the guest and its disk. Errors are reported; the next
        tick sees what is left and tries again."""
        errors: list[str] = []
        unregistered = False
        if runner.registration is not None:
            try:
                self.github.delete_runner(runner.registration.id)
                unregistered = True
            except MonitorError as error:
                errors.append(f"unregister: {error}")
        if runner.guest_name is not None:
            try:
                self.hypervisor.destroy_guest(runner.guest_name)
            except MonitorError as error:
                errors.append(f"destroy guest: {error}")
        unregistered_id = runner.registration.id if unregistered and runner.registration else None
        self._post(lambda: self._destroy_done(runner, unregistered_id, errors))

    def _destroy_done(
        self, runner: policy.Runner, unregistered_id: int | None, errors: list[str]
    ) -> None:
        self._in_flight.pop(runner.id, None)
        if unregistered_id is not None:
            self.registrations.remove(unregistered_id)
        if errors:
            message = "; ".join(errors)
            log.error("destroying runner %d failed (will retry): %s", runner.id, message)
            models.record_event("destroy-failed", message, runner_id=runner.id)
        else:
            log.info("destroyed runner %d", runner.id)
            models.record_event("destroyed", f"destroyed runner {runner.id}", runner_id=runner.id)
        self.registrations.invalidate()
        self.request_reconcile()

    @property
    def in_flight(self) -> dict[int, str]:
        # Copying a dict is one C call under the GIL, so other threads may read this safely
        # while the monitor thread changes it.
        return dict(self._in_flight)

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

    def clear_override(self) -> policy.Override | None:
        """Cancel the override, returning it (None if there was none)."""
        previous = self.override
        self.override = None
        models.save_override(None)
        if previous is not None:
            models.record_event("override", "override cancelled")
            self.request_reconcile()
        return previous


def _destroy_reason(runner: policy.Runner, destroy_all: bool) -> str:
    if destroy_all:
        return f"destroy_all_non_busy_runners is set (runner is {runner.status.value})"
    return {
        policy.Status.INVALID: "its guest is gone; unregistering",
        policy.Status.DONE_OR_UNREGISTERED: "its job is done (no registration)",
        policy.Status.STARTED_OR_CRASHED: "it did not come online in time",
        policy.Status.RESERVED: "it stayed reserved too long",
        policy.Status.IDLE: "more idle runners than the target",
        policy.Status.BUSY: "destroy requested",
    }[runner.status]
