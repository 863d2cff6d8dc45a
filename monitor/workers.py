"""Creating, destroying and cleaning up runners: decided on the monitor thread, run on the
worker pool this module owns.

`Workers.dispatch` and `Workers.sweep_orphan_volumes` run on the monitor thread: they pick
what to start (honouring each profile's and runner's back-off) and mark it in flight. The
`_…_worker` methods run on the pool (the slow GitHub and libvirt calls); each always reports
back through `post`, and the `_…_done` methods then run on the monitor thread again, so
`in_flight` and the back-offs are only ever changed there.

Before a profile's first create, and again after one fails, a worker asks the hypervisor
whether creating a runner of that profile is possible at all (`creation_blocker`: the storage
pool, `qemu-img`, the profile's guest.xml, its networks and base image). A profile that is
not is reported once (log, event log, dashboard notice via `blocked`) and looked at again
every `profile_check_interval`, without allocating runner ids meanwhile.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import secrets
import threading
from collections.abc import Callable
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from monitor import models
from monitor import policy
from monitor.config import Config
from monitor.config import Profile
from monitor.errors import MonitorError
from monitor.github import GitHub
from monitor.hypervisor import Hypervisor
from monitor.preflight import Check
from monitor.ratelimit import Backoff
from monitor.rebuilds import image_volume
from monitor.registrations import RegistrationCache
from monitor.registrations import SeenBusy
from monitor.registrations import retry_after

log = logging.getLogger(__name__)


class Work(enum.StrEnum):
    """What a worker is doing to a runner."""

    CREATE = "create"
    DESTROY = "destroy"
    CLEANUP = "cleanup"  # removing a volume whose guest is gone


@dataclass(frozen=True)
class ProfileCheck:
    """The last answer to "can this profile create runners?": `blocker` None means yes."""

    blocker: Check | None
    at: datetime


class Workers:
    """The worker pool and what it is doing (`in_flight`: runner id -> Work)."""

    def __init__(
        self,
        config: Config,
        github: GitHub,
        hypervisor: Hypervisor,
        *,
        registrations: RegistrationCache,
        snapshots: Mapping[str, str],
        seen_busy: SeenBusy,
        post: Callable[[Callable[[], None]], None],
        request_reconcile: Callable[[], None],
        stopping: threading.Event,
        clock: Callable[[], datetime],
        workers: int = 4,
    ) -> None:
        self.config = config
        self.github = github
        self.hypervisor = hypervisor
        self.registrations = registrations
        self.snapshots = snapshots
        self.seen_busy = seen_busy
        self.post = post
        self.request_reconcile = request_reconcile
        self.stopping = stopping
        self.clock = clock
        self.in_flight: dict[int, Work] = {}
        # Profiles whose creation check is running, and each profile's last answer (absent:
        # to be checked before its next create).
        self.checking: set[str] = set()
        self.checked: dict[str, ProfileCheck] = {}
        self._creates_after_checks: dict[str, int] = {}
        # The profiles that cannot create runners, with why and the fix: replaced whole when
        # it changes, so web threads read it without a lock (the dashboard's notices).
        self.blocked: dict[str, Check] = {}
        self.create_backoff = Backoff()
        self.destroy_backoff = Backoff()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="monitor-worker")

    @property
    def runner_prefix(self) -> str:
        return self.config.libvirt_runner_guest_prefix

    def idle(self) -> bool:
        """Nothing in flight: no create, destroy, cleanup or creation check."""
        return not self.in_flight and not self.checking

    def destroying(self) -> set[int]:
        return {i for i, work in self.in_flight.items() if work is Work.DESTROY}

    def shutdown(self) -> None:
        """Let running work finish (its outcomes are queued) and drop what has not started."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    # Monitor thread -------------------------------------------------------------------------

    def dispatch(
        self, changes: policy.RunnerChanges, runners: list[policy.Runner], now: datetime
    ) -> None:
        """Start the destroys the policy decided, then (only when nothing is being destroyed)
        its creates."""
        if self.stopping.is_set():
            return
        by_id = {runner.id: runner for runner in runners}
        for runner_id in changes.destroy:
            runner = by_id.get(runner_id)
            if runner is None or runner_id in self.in_flight:
                continue
            if not self.destroy_backoff.ready(runner_id, now):
                continue
            reason = changes.reasons.get(runner_id, "the policy decided so")
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
            self.in_flight[runner_id] = Work.DESTROY
            self._pool.submit(self._destroy_worker, runner, runner_id in changes.look_first)
        # Destroys may fail, so their resources are not assumed free until they are done
        # (upstream clears the create map when destroying, spec §5.4 step 11).
        if changes.destroy or Work.DESTROY in self.in_flight.values():
            return
        for profile_key, count in sorted(changes.create.items()):
            waiting = profile_key in self.checking or profile_key in self._creates_after_checks
            if waiting or not self.create_backoff.ready(profile_key, now):
                continue
            checked = self.checked.get(profile_key)
            due = self.config.profile_check_interval
            if checked is None or (checked.blocker is not None and now - checked.at >= due):
                self._start_check(profile_key, count)
            elif checked.blocker is None:
                for _ in range(count):
                    self._start_create(profile_key, now)

    def _start_check(self, profile_key: str, count: int) -> None:
        """Ask, on the pool, whether `profile_key` can create runners; `count` creates follow
        if it can (`_check_done`)."""
        self.checking.add(profile_key)
        self._pool.submit(self._check_worker, profile_key, count)

    def _start_create(self, profile_key: str, now: datetime) -> None:
        profile = self.config.profiles[profile_key]
        image = None
        if profile.base_image is None:
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
        self.in_flight[runner_id] = Work.CREATE
        self._pool.submit(self._create_worker, runner_id, profile, name, image)

    def sweep_orphan_volumes(self, guest_names: list[str], now: datetime) -> None:
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
            if runner_id in self.in_flight or not self.destroy_backoff.ready(volume, now):
                continue
            log.info("removing orphaned volume %s", volume)
            models.record_event("sweep", f"removing orphaned volume {volume}", at=now)
            self.in_flight[runner_id] = Work.CLEANUP
            self._pool.submit(self._cleanup_worker, runner_id, name, volume)

    # Worker pool ----------------------------------------------------------------------------

    def _check_worker(self, profile_key: str, count: int) -> None:
        """Whether a runner of the profile can be created now; always reports back."""
        profile = self.config.profiles[profile_key]
        blocker: Check | None = None
        error: Exception | None = None
        try:
            try:
                template = profile.guest_xml.read_text()
            except OSError as failure:
                blocker = Check.fail(
                    "profile",
                    f"cannot read {profile.guest_xml}: {failure.strerror or failure}",
                    f"put the profile's libvirt domain XML at {profile.guest_xml}",
                )
            else:
                blocker = self.hypervisor.creation_blocker(template, self._checked_image(profile))
        except Exception as failure:  # noqa: BLE001 - a worker must report, not vanish
            if not isinstance(failure, MonitorError):
                log.exception("creation check for %s crashed", profile_key)
            error = failure
        finally:
            self.post(lambda: self._check_done(profile_key, count, blocker, error))

    def _checked_image(self, profile: Profile) -> Path | None:
        """The base image a profile's runners would get now, if it has one yet."""
        if profile.base_image is not None:
            return profile.base_image
        snapshot = self.snapshots.get(profile.profile_name)
        if snapshot is None:
            return None
        return self.hypervisor.volume_path(self._image_volume(profile, snapshot))

    def _base_image(self, profile: Profile, image: str | None) -> Path:
        """The disk a runner's overlay goes on: the prebuilt `base_image`, or the rebuilt
        image of snapshot `image` in the storage pool."""
        if image is None:
            assert profile.base_image is not None
            return profile.base_image
        volume = self._image_volume(profile, image)
        path = self.hypervisor.volume_path(volume)
        if path is None:
            raise MonitorError(f"the image {volume} of {profile.profile_name} is missing", 503)
        return path

    def _image_volume(self, profile: Profile, snapshot: str) -> str:
        """The storage volume of the profile's rebuilt image `snapshot`."""
        prefix = self.config.libvirt_template_guest_prefix
        return image_volume(prefix, profile.profile_name, snapshot)

    def _create_worker(
        self, runner_id: int, profile: Profile, name: str, image: str | None = None
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
                    work_folder=policy.work_folder(profile.profile_name),
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
            self.post(lambda: self._create_done(runner_id, profile, name, registration, error))

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

    def _destroy_worker(self, runner: policy.Runner, look_first: bool = False) -> None:
        """Unregister, then destroy the guest and its disk. The guest is kept when the
        unregister fails: GitHub refuses to delete a runner that is running a job, and a
        busy VM must not vanish under it. Always reports back, whatever happens.

        With `look_first` (the cached list shows it Idle or Reserved, and that list may be
        out of date), GitHub is asked about this one runner first: busy, and nothing is
        done; gone, and only the guest is removed; no answer, and nothing is done until the
        back-off has passed."""
        errors: list[str] = []
        delay: float | None = None
        unregistered = False
        busy: policy.Registration | None = None
        step = "look at GitHub" if look_first and runner.registration else "unregister"
        try:
            registration = runner.registration
            if registration is not None and look_first:
                fresh = self.github.get_runner(registration.id)
                step = "unregister"
                if fresh is not None and fresh.busy:
                    busy = fresh
                    return
                if fresh is None:
                    registration, unregistered = None, True  # GitHub removed it already
            if registration is not None:
                self.github.delete_runner(registration.id)
                unregistered = True
            step = "destroy guest"
            # Also without a guest: a create killed between its volume and its domain left
            # `<guest>.qcow2` behind (destroy_guest is idempotent; ids are never reused).
            self.hypervisor.destroy_guest(
                runner.guest_name
                or policy.guest_name(self.runner_prefix, runner.profile, runner.id)
            )
        except Exception as failure:  # noqa: BLE001 - a worker must report, not vanish
            if not isinstance(failure, MonitorError):
                log.exception("destroy worker for runner %d crashed", runner.id)
            errors.append(f"{step}: {failure}")
            delay = retry_after(failure)
        finally:
            if busy is not None:
                fresh_busy = busy
                self.post(lambda: self._destroy_aborted(runner, fresh_busy))
            else:
                unregistered_id = (
                    runner.registration.id if unregistered and runner.registration else None
                )
                self.post(lambda: self._destroy_done(runner, unregistered_id, errors, delay))

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
            self.post(lambda: self._cleanup_done(runner_id, volume, error))

    # Outcomes, back on the monitor thread --------------------------------------------------

    def _check_done(
        self, key: str, count: int, blocker: Check | None, error: Exception | None
    ) -> None:
        self.checking.discard(key)
        now = self.clock()
        if error is not None:
            # libvirt out of reach says nothing about the profile: ask again after a pause.
            delay = self.create_backoff.failed(key, now, retry_after(error))
            log.warning(
                "cannot check whether %s can create runners (retry in %s): %s", key, delay, error
            )
        else:
            self._note_check(key, blocker, now)
            if blocker is None:
                self._creates_after_checks[key] = count
        self._start_creates_after_checks(now)

    def _note_check(self, key: str, blocker: Check | None, now: datetime) -> None:
        """Keep the answer; say so when it changed (once per new reason, not every look)."""
        previous = self.checked.get(key)
        self.checked[key] = ProfileCheck(blocker, now)
        was = previous.blocker if previous is not None else None
        if blocker is not None and was != blocker:
            message = f"{blocker.subject}: {blocker.detail}. Fix: {blocker.fix}"
            log.error("profile %s cannot create runners: %s", key, message)
            models.record_event(
                "profile-failed", f"cannot create runners: {message}", profile=key, at=now
            )
            self.blocked = {**self.blocked, key: blocker}
        elif blocker is None and was is not None:
            log.info("profile %s can create runners again", key)
            models.record_event("profile-ok", "can create runners again", profile=key, at=now)
            self.blocked = {k: v for k, v in self.blocked.items() if k != key}

    def _start_creates_after_checks(self, now: datetime) -> None:
        """Once no check is under way, the creates of the profiles that passed, in profile
        order, so that runner ids follow the profiles as they do without checks."""
        if self.checking:
            return
        ready, self._creates_after_checks = self._creates_after_checks, {}
        if self.stopping.is_set() or Work.DESTROY in self.in_flight.values():
            return
        for profile_key, creates in sorted(ready.items()):
            for _ in range(creates):
                self._start_create(profile_key, now)

    def _create_done(
        self,
        runner_id: int,
        profile: Profile,
        name: str,
        registration: policy.Registration | None,
        error: Exception | None,
    ) -> None:
        self.in_flight.pop(runner_id, None)
        key = profile.profile_name
        if error is None:
            self.create_backoff.succeeded(key)
            if registration is not None:
                self.registrations.add(registration)
            log.info("created runner %d (%s)", runner_id, name, extra={"runner_id": runner_id})
            models.record_event("created", f"created and started {name}", runner_id=runner_id)
            # Look at GitHub again soon, as upstream does after every create (spec §9.2);
            # the write-through above keeps decisions correct until then.
            self.registrations.invalidate()
            self.request_reconcile()
        else:
            # No immediate retry: the profile waits out its back-off, and a later periodic
            # pass tries again (a broken profile must not hammer GitHub or libvirt), after
            # checking first that the profile can create runners at all.
            self.checked.pop(key, None)
            delay = self.create_backoff.failed(key, self.clock(), retry_after(error))
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

    def _destroy_done(
        self,
        runner: policy.Runner,
        unregistered_id: int | None,
        errors: list[str],
        retry_after_seconds: float | None,
    ) -> None:
        self.in_flight.pop(runner.id, None)
        if unregistered_id is not None:
            self.registrations.remove(unregistered_id)
        if errors:
            message = "; ".join(errors)
            delay = self.destroy_backoff.failed(runner.id, self.clock(), retry_after_seconds)
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
            self.destroy_backoff.succeeded(runner.id)
            log.info("destroyed runner %d", runner.id, extra={"runner_id": runner.id})
            models.record_event("destroyed", f"destroyed runner {runner.id}", runner_id=runner.id)
            self.registrations.invalidate()
            self.request_reconcile()

    def _destroy_aborted(self, runner: policy.Runner, fresh: policy.Registration) -> None:
        """GitHub says the runner is running a job that the cached list did not show: it
        stays, and counts as Busy from now on, whatever the flag says later."""
        self.in_flight.pop(runner.id, None)
        self.destroy_backoff.succeeded(runner.id)
        self.seen_busy.add(runner.id)
        self.registrations.upsert(fresh)
        message = f"GitHub says runner {runner.id} is busy (running a job): keeping it"
        log.warning(
            "not destroying runner %d: %s", runner.id, message, extra={"runner_id": runner.id}
        )
        models.record_event("destroy-aborted", message, runner_id=runner.id, profile=runner.profile)
        self.request_reconcile()

    def _cleanup_done(self, runner_id: int, volume: str, error: MonitorError | None) -> None:
        self.in_flight.pop(runner_id, None)
        if error is None:
            self.destroy_backoff.succeeded(volume)
        else:
            delay = self.destroy_backoff.failed(volume, self.clock(), retry_after(error))
            log.warning("removing volume %s failed (retry in %s): %s", volume, delay, error)
