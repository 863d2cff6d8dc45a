"""Reservations: a workflow job takes Idle runners by labelling them `reserved-for:<unique_id>`.

Threads:
- `Takes.request` runs on a web thread: it hands the take to the monitor thread (`call`),
  waits for the answer, and records the take's history and metrics.
- `Takes.take` runs on the monitor thread, which alone decides which runners go to which job,
  so concurrent takes never share one. It remembers every reservation by `unique_id`: a client
  retrying gets the same runners, never more.
- `_reserve_worker` and `_finish_take` run on the reserve pool this module owns (the label
  calls, concurrently with other takes'); a take that fails half-way is rolled back there.
- `_take_done` runs on the monitor thread again (through `post`) for the bookkeeping.
- `release` (the queue giving back what it reserved for an entry it could not serve) is the
  same in reverse: decided on the monitor thread, the label calls on the reserve pool
  (`_release_worker`), the bookkeeping back on the monitor thread (`_release_done`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from collections.abc import Mapping
from concurrent.futures import Future
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from dataclasses import field
from dataclasses import replace
from datetime import datetime
from datetime import timedelta
from typing import Any

from monitor import metrics
from monitor import models
from monitor import policy
from monitor import wire
from monitor.config import Config
from monitor.errors import MonitorError
from monitor.errors import TransientError
from monitor.github import GitHub
from monitor.registrations import RegistrationCache

log = logging.getLogger(__name__)

# Threads for reservation label calls: enough for the takes of a busy CI hour at once.
RESERVE_WORKERS = 32
# Reservations are remembered (for retried takes) this long.
RESERVATION_MEMORY = timedelta(days=2)
# Remembered reservations are pruned at most this often.
PRUNE_INTERVAL = timedelta(minutes=1)

TakeAnswer = list[dict[str, Any]] | None
# The reservation labels, removed in this order: `reserved-for` last, so a runner whose
# release fails half-way still shows Reserved (and the reserve timeout ends it).
_RELEASE_ORDER = (policy.RESERVED_BY, policy.RESERVED_SINCE, policy.RESERVED_FOR)
_RELEASED_PREFIXES = tuple(f"{key}:" for key in _RELEASE_ORDER)


@dataclass
class _Take:
    """A reservation in progress for one workflow job (its `unique_id`)."""

    unique_id: str
    profile: str
    count: int
    qualified_repo: str
    run_id: str
    runners: list[policy.Runner]
    future: Future[TakeAnswer] = field(default_factory=Future)
    lock: threading.Lock = field(default_factory=threading.Lock)
    reserved: dict[int, policy.Registration] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    unclear: list[int] = field(default_factory=list)
    pending: int = 0


class Takes:
    """Takes in progress, the reservations remembered for retries, and the reserve pool.

    `reserving` (runners whose label calls are under way) and `held` (runners whose failed
    rollback may have left labels) are kept from other takes and from the policy."""

    def __init__(
        self,
        config: Config,
        github: GitHub,
        *,
        observe: Callable[[], policy.Observation | None],
        registrations: RegistrationCache,
        in_flight: Mapping[int, Any],
        addresses: Callable[[], Mapping[str, str]],
        call: Callable[[Callable[[], Any], float], Any],
        post: Callable[[Callable[[], None]], None],
        view_changed: Callable[[], None],
        stopping: threading.Event,
        metrics: metrics.Metrics,
        clock: Callable[[], datetime],
    ) -> None:
        self.config = config
        self.github = github
        self.observe = observe
        self.registrations = registrations
        self.in_flight = in_flight
        self.addresses = addresses
        self.call = call
        self.post = post
        self.view_changed = view_changed
        self.stopping = stopping
        self.metrics = metrics
        self.clock = clock
        self.reserving: set[int] = set()
        self.held: dict[int, float] = {}
        self._takes: dict[str, _Take] = {}
        self._unsaved: dict[str, models.ReservationRecord] = {}
        # Every remembered reservation, by unique_id: a take must not wait on the database.
        self._reservations = models.load_reservations(clock() - RESERVATION_MEMORY)
        self._last_prune: datetime | None = None
        # Reservations are short GitHub calls that clients wait for: their own, wide pool, so
        # a slow create never delays a take and concurrent takes' label calls overlap.
        self._reservers = ThreadPoolExecutor(
            max_workers=RESERVE_WORKERS, thread_name_prefix="monitor-reserve"
        )
        # One thread writes the reservation history, in the order the takes were answered.
        self._history = ThreadPoolExecutor(max_workers=1, thread_name_prefix="history")

    def start(self) -> None:
        # Start every reserve worker now: the pool starts threads on demand, and each start
        # would be paid by a take, on the monitor thread, in the middle of a burst.
        started = threading.Barrier(RESERVE_WORKERS)
        for _ in range(RESERVE_WORKERS):
            self._reservers.submit(started.wait, 5.0)

    def shutdown(self) -> None:
        """Let takes in progress complete: their clients are waiting, and their bookkeeping
        must reach the store."""
        self._reservers.shutdown(wait=True)

    # Web threads ---------------------------------------------------------------------------

    def request(
        self,
        profile_key: str,
        count: int,
        unique_id: str,
        qualified_repo: str,
        run_id: str,
        timeout: float,
    ) -> TakeAnswer:
        """Take runners for a client (a web thread), recording the take in the history and
        the metrics whatever its outcome; raises the take's MonitorError."""
        asked_at = self.clock()

        def remember(runner_ids: list[int], outcome: str) -> None:
            answered_at = self.clock()

            def write() -> None:
                try:
                    models.record_take(
                        unique_id,
                        profile_key,
                        qualified_repo,
                        run_id,
                        runner_ids,
                        outcome,
                        asked_at,
                        answered_at,
                    )
                except Exception as error:  # noqa: BLE001 - history must not fail a take
                    log.warning("cannot record take %s in the history: %s", unique_id, error)

            # Off the request: a locked store would make the client wait out its busy timeout.
            self._history.submit(write)

        try:
            answer: TakeAnswer = self.call(
                lambda: self.take(profile_key, count, unique_id, qualified_repo, run_id), timeout
            )
        except MonitorError as error:
            self.metrics.take_failed()
            if error.status >= 500:  # the monitor or GitHub failed (not a refused request)
                remember([], "failed")
            raise
        self.metrics.take_answered(answer)
        remember([entry["id"] for entry in answer or []], "reserved" if answer else "null")
        return answer

    # Monitor thread ------------------------------------------------------------------------

    def take(
        self, profile_key: str, count: int, unique_id: str, qualified_repo: str, run_id: str
    ) -> Future[TakeAnswer]:
        """Reserve up to `count` Idle runners of a profile for one job (spec §3.3).

        The Future resolves to upstream's answer: a list of {"id", "runner"} (the runner as
        it was before the reservation), or None when no runner is idle. The same
        `unique_id` again (a client retrying) gets the same runners; with another profile
        or count it is a 409. A reservation that fails half-way is rolled back and answered
        with 502 (servo/ci-runners#56).
        """
        if profile_key not in self.config.profiles:
            raise MonitorError(f"No profile with key: {profile_key}", status=404)
        if self.observe() is None:
            raise MonitorError("Monitor thread is still starting", status=503)
        asked = (profile_key, count, qualified_repo, run_id)
        take = self._takes.get(unique_id)
        failed = take is not None and take.future.done() and take.future.exception() is not None
        if take is not None and not failed:
            given = (take.profile, take.count, take.qualified_repo, take.run_id)
            _check_same_take(unique_id, given, asked)
            return take.future
        done: Future[TakeAnswer] = Future()
        previous = self._reservations.get(unique_id) or self._reservation_on_github(
            unique_id, count, qualified_repo, run_id
        )
        if previous is not None:
            given = (previous.profile, previous.count, previous.qualified_repo, previous.run_id)
            _check_same_take(unique_id, given, asked)
            # Runners gone since (their jobs ran) are left out; none left is `null`, as
            # `jq -e .` must not take an empty array for a runner.
            done.set_result(self._remembered_answer(previous.runner_ids) or None)
            return done
        chosen = [] if self.stopping.is_set() else self._idle_runners(profile_key, count)
        if not chosen:
            done.set_result(None)
            return done
        take = _Take(unique_id, profile_key, count, qualified_repo, run_id, chosen)
        take.pending = len(chosen)
        self._takes[unique_id] = take
        self.reserving.update(runner.id for runner in chosen)
        labels = policy.reservation_labels(unique_id, qualified_repo, run_id, self.clock())
        for runner in chosen:
            self._reservers.submit(self._reserve_worker, take, runner, labels)
        return take.future

    def save_unsaved(self) -> None:
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

    def is_held(self, runner_id: int) -> bool:
        held_since = self.held.get(runner_id)
        if held_since is None:
            return False
        if self.registrations.stored_fetch_began > held_since:
            del self.held[runner_id]  # the cache now shows GitHub's view after the failure
            return False
        return True

    def _idle_runners(self, profile_key: str, limit: int) -> list[policy.Runner]:
        """Up to `limit` Idle runners of a profile as of now, lowest ids first: the last
        observation's runners with the registration the cache holds now (it has every
        reservation already made). Runs for every take: cheap checks first, and it stops as
        soon as it has enough."""
        observation = self.observe()
        assert observation is not None
        idle: list[policy.Runner] = []
        for runner in observation.runners:  # ascending ids
            if runner.profile != profile_key or runner.registration is None:
                continue
            if runner.id in self.reserving or runner.id in self.in_flight:
                continue
            if self.is_held(runner.id):
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

    def _reservation_on_github(
        self, unique_id: str, count: int, qualified_repo: str, run_id: str
    ) -> models.ReservationRecord | None:
        """Runners GitHub shows labelled `reserved-for:<unique_id>` though no record says so:
        the monitor was killed between adding the labels and saving the record (found by
        bench/crash.py). The labels are the record, so a retried take gets those runners
        instead of a second set."""
        observation = self.observe()
        assert observation is not None
        found = [
            runner
            for runner in observation.runners
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
        observation = self.observe()
        observed = {r.id: r for r in observation.runners} if observation else {}
        runners = [observed[i] for i in sorted(runner_ids) if i in observed]
        return wire.take_answer(runners, self.addresses())

    def release(self, unique_id: str) -> Future[dict[str, Any]]:
        """Un-reserve the runners Reserved for `unique_id` whose job has not started (monitor
        thread): they go back to Idle. The Future resolves to {"unique_id", "released": ids,
        "kept": ids of its runners left alone (busy, or being changed)}. 404 if nothing here
        was ever reserved for it; 503 while its take is still under way (try again); 502 if
        GitHub refused a label removal (that runner is kept from takes until GitHub is asked
        again)."""
        take = self._takes.get(unique_id)
        if take is not None and not take.future.done():
            raise TransientError(f"the take for {unique_id} is still under way", retry_after=1)
        observation = self.observe()
        if observation is None:
            raise MonitorError("Monitor thread is still starting", status=503)
        record = self._reservations.get(unique_id)
        labelled: list[policy.Runner] = []
        for runner in observation.runners:
            registration = runner.registration and self.registrations.get(runner.registration.id)
            if registration and registration.label_value(policy.RESERVED_FOR) == unique_id:
                labelled.append(replace(runner, registration=registration))
        if record is None and not labelled:
            raise MonitorError(f"No reservation for {unique_id}", status=404)
        chosen = [
            runner
            for runner in labelled
            if runner.status is policy.Status.RESERVED
            and runner.id not in self.reserving
            and runner.id not in self.in_flight
        ]
        kept = sorted({*(record.runner_ids if record else ()), *(r.id for r in labelled)})
        kept = [runner_id for runner_id in kept if runner_id not in {r.id for r in chosen}]
        done: Future[dict[str, Any]] = Future()
        if not chosen:
            self._forget(unique_id, kept)
            done.set_result({"unique_id": unique_id, "released": [], "kept": kept})
            return done
        self.reserving.update(runner.id for runner in chosen)
        self._reservers.submit(self._release_worker, unique_id, chosen, kept, done)
        return done

    def _forget(self, unique_id: str, kept: list[int]) -> None:
        """The reservation now holds only `kept` (none: it is forgotten, so the same
        unique_id may take again)."""
        record = self._reservations.get(unique_id)
        if record is None:
            return
        if kept:
            record = replace(record, runner_ids=kept)
            self._reservations[unique_id] = record
            if unique_id in self._unsaved:
                self._unsaved[unique_id] = record
        else:
            del self._reservations[unique_id]
            self._unsaved.pop(unique_id, None)
        try:
            models.forget_reservation(unique_id, kept)
        except Exception:  # noqa: BLE001 - memory answers retries; a restart may resurrect it
            log.exception("cannot write the release of %s to the store", unique_id)

    # Reserve pool --------------------------------------------------------------------------

    def _release_worker(
        self,
        unique_id: str,
        runners: list[policy.Runner],
        kept: list[int],
        done: Future[dict[str, Any]],
    ) -> None:
        """Remove the reservation labels from each runner; the bookkeeping follows on the
        monitor thread, and then the answer."""
        released: dict[int, policy.Registration] = {}
        errors: list[str] = []
        for runner in runners:
            assert runner.registration is not None
            registration = runner.registration
            try:
                for key in _RELEASE_ORDER:
                    for label in registration.labels:
                        if label.startswith(f"{key}:"):
                            self.github.remove_label(registration.id, label)
                labels = tuple(
                    n for n in registration.labels if not n.startswith(_RELEASED_PREFIXES)
                )
                released[runner.id] = replace(registration, labels=labels)
            except Exception as failure:  # noqa: BLE001 - reported in the answer
                errors.append(f"runner {runner.id}: {failure}")
        self.post(lambda: self._release_done(unique_id, runners, released, kept, errors, done))

    def _release_done(
        self,
        unique_id: str,
        runners: list[policy.Runner],
        released: dict[int, policy.Registration],
        kept: list[int],
        errors: list[str],
        done: Future[dict[str, Any]],
    ) -> None:
        """Monitor thread: the cache learns the labels are gone, the reservation forgets the
        released runners, and the caller gets its answer."""
        self.reserving.difference_update(runner.id for runner in runners)
        for registration in released.values():
            self.registrations.upsert(registration)
        failed = [runner.id for runner in runners if runner.id not in released]
        for runner_id in failed:
            self.held[runner_id] = time.monotonic()  # labels unknown until GitHub is asked
        if failed:
            self.registrations.invalidate()
        self._forget(unique_id, sorted([*kept, *failed]))
        profile = runners[0].profile
        for runner_id in sorted(released):
            models.record_event(
                "release",
                f"released from {unique_id}",
                runner_id=runner_id,
                profile=profile,
                at=self.clock(),
            )
        self.view_changed()
        if errors:
            message = "GitHub refused to remove the reservation: " + "; ".join(errors)
            log.error("release of %s failed: %s", unique_id, message)
            done.set_exception(MonitorError(message, status=502))
        else:
            log.info("released %s: runner(s) %s", unique_id, sorted(released))
            answer = {"unique_id": unique_id, "released": sorted(released), "kept": kept}
            done.set_result(answer)

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
        self.post(lambda: self._take_done(take))
        if take.errors:
            message = "GitHub refused the reservation: " + "; ".join(take.errors)
            log.error("take %s for %s failed: %s", take.unique_id, take.profile, message)
            take.future.set_exception(MonitorError(message, status=502))
        else:
            take.future.set_result(wire.take_answer(take.runners, self.addresses()))

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

    # Back on the monitor thread -------------------------------------------------------------

    def _take_done(self, take: _Take) -> None:
        now = self.clock()
        if self._takes.get(take.unique_id) is take:  # a retry of a failed take may replace it
            del self._takes[take.unique_id]
        self.reserving.difference_update(runner.id for runner in take.runners)
        if take.errors:
            # A runner whose rollback failed may still carry this take's labels: keep it from
            # other jobs until GitHub has been asked again (the reserve timeout ends it).
            for runner_id in take.unclear:
                self.held[runner_id] = time.monotonic()
            if take.unclear:
                self.registrations.invalidate()
            models.record_event(
                "take-failed",
                f"{take.unique_id} for {take.qualified_repo} run {take.run_id}: "
                + "; ".join(take.errors),
                profile=take.profile,
                at=now,
            )
            return
        for registration in take.reserved.values():
            self.registrations.upsert(registration)
        ids = sorted(take.reserved)
        record = models.ReservationRecord(
            take.profile, take.count, ids, now, take.qualified_repo, take.run_id
        )
        self._reservations[take.unique_id] = record
        self._unsaved[take.unique_id] = record
        if self._last_prune is None or now - self._last_prune >= PRUNE_INTERVAL:
            self._last_prune = now
            cutoff = now - RESERVATION_MEMORY
            models.prune_reservations(cutoff)
            self._reservations = {
                key: record
                for key, record in self._reservations.items()
                if record.created_at >= cutoff
            }
        self.view_changed()


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
