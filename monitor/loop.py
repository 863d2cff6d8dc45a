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
# Back-off after a GitHub list failure with no Retry-After.
DEFAULT_GITHUB_BACKOFF = timedelta(seconds=10)
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
        self._create_backoff = Backoff()
        self._destroy_backoff = Backoff()
        self._stale_reported = False
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
        if changes is None or self._registrations_too_stale(now):
            return observation
        self._dispatch(changes, runners, now)
        self._sweep_orphan_volumes(guest_names, now)
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
            if not self._destroy_backoff.ready(runner_id, now):
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
            if not self._create_backoff.ready(profile_key, now):
                continue
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
            self.hypervisor.create_guest(name, template, profile.base_image)
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
            log.info("created runner %d (%s)", runner_id, name)
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
            if runner.guest_name is not None:
                self.hypervisor.destroy_guest(runner.guest_name)
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
            log.error("destroying runner %d failed (retry in %s): %s", runner.id, delay, message)
            models.record_event(
                "destroy-failed", f"{message} (retry in {delay})", runner_id=runner.id
            )
        else:
            self._destroy_backoff.succeeded(runner.id)
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


def _retry_after(error: BaseException) -> float | None:
    return error.retry_after if isinstance(error, TransientError) else None


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
