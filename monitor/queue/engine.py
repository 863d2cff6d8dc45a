"""`SqlQueueEngine`: the queue over a `QueueStore`, and the dispatcher that serves it.

Threads:
- The web edge's threads call `enqueue`, `poll`, `cancel` and `snapshot`: each is a few
  small store transactions, nothing else (a poll never waits for a member).
- The dispatcher thread (`Dispatcher.run`, started by `start`) does one cycle every
  `poll_interval`, and only while this process holds the store's lease, so that of several
  queue processes sharing PostgreSQL one dispatches at a time: poll every member
  concurrently, expire entries nobody polls, plan (policy.plan) and claim the planned entries.
- The dispatcher's pools run the member polls and the forwarded takes and releases; the last
  take of an entry to finish records its outcome (served, or released and waiting again).

Exactly once: an entry is served only when every member reserved its share; takes carry the
entry's unique_id, so a retry (or a new leader finishing what a dead one started) gets the
same runners; a late result of an older attempt is void (`attempt`). Nothing stranded: a
release that fails is tried again with back-off, and no entry expires until the dispatcher has
led for the expiry time (polls made while the store was unreachable could not be recorded).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from concurrent.futures import Future
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait
from dataclasses import dataclass
from dataclasses import field
from dataclasses import replace
from datetime import UTC
from datetime import datetime
from datetime import timedelta
from pathlib import Path

from monitor.errors import MonitorError
from monitor.errors import TransientError
from monitor.queue import policy
from monitor.queue.contracts import ENTRY_EXPIRY_SECONDS
from monitor.queue.contracts import Counts
from monitor.queue.contracts import MemberPoll
from monitor.queue.contracts import Members
from monitor.queue.contracts import MemberView
from monitor.queue.contracts import PollAnswer
from monitor.queue.contracts import Snapshot
from monitor.queue.store import Claimed
from monitor.queue.store import QueueStore

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]

# A member polled successfully within this long is fresh for enqueue (read from the store, so
# every queue process agrees, and a dead dispatcher leaves no member fresh for long).
MEMBER_FRESH_SECONDS = 10.0
# How long a cycle waits for the answers of the polls it started: a member slower than
# that is planned on with its last answer, and marked stale once its poll has run for
# STALE_AFTER_SECONDS (the adapter gives up at 1.5 s).
POLL_WAIT_SECONDS = 0.5
STALE_AFTER_SECONDS = 2.0
LEASE_SECONDS = 5.0
RETRY_AFTER = 1.0
# A poll writes last_poll_at only when the stored one is older: 500 clients polling each
# second then cost ~100 writes a second, and expiry (30 s) is none the less exact enough.
TOUCH_EVERY_SECONDS = 5.0
# An entry whose takes failed this often ends "failed": its client falls back at once
# instead of waiting out its retries.
MAX_FAILURES = 10
# A member whose take failed is not planned on for this long (its counts may still answer):
# the entry waits in its place, or goes to other members, instead of failing again at once.
# A member that reserved fewer runners than asked (its counts said more were idle: a
# monitor's counts are of its last look, up to `monitor_poll_interval` old) is not planned
# on for that profile for as long; that is no failure of the entry, which waits again.
TAKE_BACKOFF_SECONDS = 5.0
# A release a member could not do (down, or its take still running) is tried again after
# 2, 4, 8 … s (at most RELEASE_RETRY_CAP_SECONDS), RELEASE_ATTEMPTS times in all; after that
# the runners wait for the member's own reserve timeout.
RELEASE_ATTEMPTS = 8
RELEASE_RETRY_CAP_SECONDS = 60.0
# A take's runners are not counted idle at their member until its answer shows them taken
# (our monitor re-renders within a second; upstream's within its loop and GitHub cache), or
# for at most this long (a reservation the member dropped by itself lists them untaken again).
UNSEEN_LIMIT_SECONDS = 60.0
RECENT = 50
RETAIN = timedelta(days=1)
PRUNE_EVERY_SECONDS = 600.0


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class Outcomes:
    """What this process did since it started (for /metrics): served and expired count where
    the dispatcher did it, refused where the enqueue was refused. The waits come from the
    served entries of `Snapshot.recent` (enqueued_at -> served_at), which every queue process
    sharing the store sees (monitor/queue/views.py tallies them)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    counts: dict[str, int] = field(
        default_factory=lambda: {"served": 0, "expired": 0, "refused": 0, "failed": 0}
    )

    def add(self, outcome: str, n: int = 1) -> None:
        with self.lock:
            self.counts[outcome] += n


@dataclass(frozen=True)
class Unseen:
    """Runners a take reserved that the member's counts may not show yet."""

    url: str
    profile: str
    runner_ids: frozenset[int]
    unique_id: str
    done_at: float  # time.monotonic()

    def shown_by(self, poll: MemberPoll, started: float) -> bool:
        """Whether `poll` (of this member, begun at `started`) counts these runners as taken.
        A member that lists no runners: a poll begun after the take (upstream's monitor
        shows no counts between a take and its next render)."""
        if poll.untaken is None:
            return started > self.done_at
        return not self.runner_ids & poll.untaken


@dataclass
class InFlight:
    """An entry's takes in flight: member url -> ids reserved, or the error."""

    claim: Claimed
    pending: int
    results: dict[str, list[int] | str] = field(default_factory=dict)
    short: set[str] = field(default_factory=set)  # members that reserved fewer than asked


class Dispatcher:
    """The dispatcher thread and its pools (see the module docstring)."""

    def __init__(
        self,
        store: QueueStore,
        members: Members,
        servers: Sequence[str],
        outcomes: Outcomes,
        *,
        clock: Clock,
        poll_interval: float,
        lease_seconds: float,
        holder: str,
    ) -> None:
        self.store = store
        self.members = members
        self.servers = list(servers)
        self.outcomes = outcomes
        self.clock = clock
        self.poll_interval = poll_interval
        self.lease_seconds = lease_seconds
        self.holder = holder
        self.leading = False
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()  # guards inflight, unseen, unrecorded
        self.inflight: dict[str, InFlight] = {}
        # Takes done but maybe not yet in the member's counts (a member answers a take
        # before it renders again): not idle there until a poll shows them taken.
        self.unseen: list[Unseen] = []
        self.unrecorded: list[InFlight] = []  # outcomes the store could not take yet
        self.views: dict[str, MemberView] = {
            url: MemberView(url, fresh=False, counts={}) for url in self.servers
        }
        self.polling: dict[str, Future[MemberPoll]] = {}
        self.poll_started: dict[str, float] = {}
        self.take_backoff = TAKE_BACKOFF_SECONDS
        self.take_failed_at: dict[str, float] = {}  # member url -> time.monotonic()
        self.take_short_at: dict[tuple[str, str], float] = {}  # (url, profile) -> monotonic
        self.last_prune = 0.0
        self.store_down = False
        # No entry expires before this: polls could not be recorded while this process did
        # not dispatch (the store unreachable, another process leading, or not started), so
        # a last poll older than the expiry says nothing about a client until then.
        self.expire_from: datetime | None = None
        # (member url, unique_id) -> (failed attempts, next try by the clock)
        self.failed_releases: dict[tuple[str, str], tuple[int, datetime]] = {}
        workers = max(4, 2 * len(self.servers))
        self.poll_pool = ThreadPoolExecutor(workers, thread_name_prefix="queue-poll")
        self.take_pool = ThreadPoolExecutor(max(8, workers), thread_name_prefix="queue-take")

    # -- the thread ----------------------------------------------------------------------

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="queue-dispatcher", daemon=True)
        self.thread.start()

    def stop(self, release_lease: bool = True) -> None:
        self.stopping.set()
        self.wake.set()
        if self.thread is not None:
            self.thread.join(timeout=30)
        self.poll_pool.shutdown(wait=False, cancel_futures=True)
        self.take_pool.shutdown(wait=True)
        if release_lease and self.leading:
            try:
                self.store.release_lease(self.holder)
            except TransientError as error:
                log.warning("queue: could not release the dispatcher lease: %s", error)
        self.leading = False

    def run(self) -> None:
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                self.cycle()
                if self.store_down:
                    log.warning("queue: store %s reachable again", self.store.url)
                self.store_down = False
            except TransientError as error:
                if not self.store_down:
                    log.warning("queue: dispatcher paused: %s", error)
                self.store_down = True
                # Without the store the lease cannot be renewed: another process may take it.
                self.leading = False
            except Exception:
                log.exception("queue: dispatcher cycle failed")
            elapsed = time.monotonic() - started
            self.wake.wait(max(0.0, self.poll_interval - elapsed))
            self.wake.clear()

    def cycle(self) -> None:
        self.record_unrecorded()
        now = self.clock()
        leading = self.store.acquire_lease(self.holder, now, self.lease_seconds)
        if leading and not self.leading:
            log.info("queue: %s dispatches now", self.holder)
            self.leading = True
            self.expire_from = now + timedelta(seconds=ENTRY_EXPIRY_SECONDS)
            self.remember_recent_takes(now)
            self.resume_reserving()
        elif not leading and self.leading:
            log.warning("queue: %s lost the dispatcher lease", self.holder)
        self.leading = leading
        if not leading:
            return
        views = self.poll_members()
        self.store.save_members(views)
        self.expire(self.clock())
        self.retry_releases(self.clock())
        waiting = [r.waiting for r in self.store.active() if r.entry.state == "waiting"]
        planned = policy.plan(waiting, self.plannable(views), self.reserving())
        for claim in self.store.claim(planned):
            self.forward(claim)
        if time.monotonic() - self.last_prune > PRUNE_EVERY_SECONDS:
            self.last_prune = time.monotonic()
            self.store.prune(self.clock() - RETAIN)

    # -- members -------------------------------------------------------------------------

    def poll_members(self) -> list[MemberView]:
        """Every member's counts, concurrently; one that fails or is slow is marked stale,
        keeps its last counts, and holds up no one (a poll still running is not repeated)."""
        now = self.clock()
        submitted = []
        for url in self.servers:
            if url not in self.polling:
                self.poll_started[url] = time.monotonic()
                self.polling[url] = self.poll_pool.submit(self.members.poll, url)
                submitted.append(self.polling[url])
        wait(submitted, timeout=POLL_WAIT_SECONDS)
        for url in self.servers:
            future = self.polling[url]
            last = self.views[url]
            if not future.done():
                if time.monotonic() - self.poll_started[url] > STALE_AFTER_SECONDS:
                    error = f"no answer within {STALE_AFTER_SECONDS:g} s"
                    self.views[url] = MemberView(url, False, last.counts, last.polled_at, error)
                continue
            del self.polling[url]
            try:
                answer = future.result()
            except Exception as error:  # MonitorError from the adapter, or a bug in it
                if last.fresh:
                    log.warning("queue: member %s is stale: %s", url, error)
                self.views[url] = MemberView(url, False, last.counts, last.polled_at, str(error))
                continue
            self.views[url] = MemberView(url, True, dict(answer.counts), now, None)
            started = self.poll_started[url]
            oldest = time.monotonic() - UNSEEN_LIMIT_SECONDS
            with self.lock:
                self.unseen = [
                    u
                    for u in self.unseen
                    if u.url != url or not (u.shown_by(answer, started) or u.done_at < oldest)
                ]
        return [self.views[url] for url in self.servers]

    def plannable(self, views: list[MemberView]) -> list[MemberView]:
        """The members as the plan sees them: one whose take failed lately is not fresh, and
        one that lately reserved fewer runners of a profile than asked has none idle."""
        now = time.monotonic()
        with self.lock:
            backed_off = {
                url for url, at in self.take_failed_at.items() if now - at < self.take_backoff
            }
            short = {key for key, at in self.take_short_at.items() if now - at < self.take_backoff}
        plannable = []
        for view in views:
            if view.url in backed_off:
                view = replace(view, fresh=False)
            elif any(url == view.url for url, _ in short):
                counts = {
                    profile: Counts(0, c.healthy, c.target) if (view.url, profile) in short else c
                    for profile, c in view.counts.items()
                }
                view = replace(view, counts=counts)
            plannable.append(view)
        return plannable

    def reserving(self) -> dict[str, dict[str, int]]:
        """member url -> profile -> runners being reserved there, or reserved but not yet
        seen in its counts: not idle, whatever its last answer said."""
        totals: dict[str, dict[str, int]] = {}

        def add(url: str, profile: str, n: int) -> None:
            per_profile = totals.setdefault(url, {})
            per_profile[profile] = per_profile.get(profile, 0) + n

        with self.lock:
            for flight in self.inflight.values():
                for url, n in flight.claim.plan.items():
                    add(url, flight.claim.profile, n)
            for unseen in self.unseen:
                add(unseen.url, unseen.profile, len(unseen.runner_ids))
        return totals

    # -- expiry --------------------------------------------------------------------------

    def expire(self, now: datetime) -> None:
        if self.expire_from is not None and now < self.expire_from:
            return
        for record in self.store.expire(now, ENTRY_EXPIRY_SECONDS):
            log.info("queue: entry %s expired (no poll for 30 s)", record.entry.unique_id)
            self.outcomes.add("expired")
            self.release(record.entry.unique_id, record.entry.reserved)

    def release(self, unique_id: str, reserved: Mapping[str, object]) -> None:
        for url in reserved:
            try:
                self.take_pool.submit(self.release_now, url, unique_id)
            except RuntimeError:  # the pool is shut down (a cancel after stop): release here
                self.release_now(url, unique_id)

    def release_now(self, url: str, unique_id: str) -> None:
        try:
            if not self.members.release(url, unique_id):
                log.warning(
                    "queue: %s cannot release %s: its runners wait for its reserve timeout",
                    url,
                    unique_id,
                )
        except Exception as error:
            with self.lock:
                attempts = self.failed_releases.get((url, unique_id), (0, self.clock()))[0] + 1
                if attempts < RELEASE_ATTEMPTS:
                    delay = min(2.0**attempts, RELEASE_RETRY_CAP_SECONDS)
                    retry_at = self.clock() + timedelta(seconds=delay)
                    self.failed_releases[(url, unique_id)] = (attempts, retry_at)
                else:
                    self.failed_releases.pop((url, unique_id), None)
            if attempts < RELEASE_ATTEMPTS:
                log.warning(
                    "queue: releasing %s on %s failed (retry in %.0f s): %s",
                    unique_id,
                    url,
                    delay,
                    error,
                )
            else:
                log.error(
                    "queue: releasing %s on %s failed %d times, giving up (its runners wait "
                    "for the member's reserve timeout): %s",
                    unique_id,
                    url,
                    attempts,
                    error,
                )
        else:
            with self.lock:
                self.failed_releases.pop((url, unique_id), None)
                # Its runners are idle again: counted as the member says.
                self.unseen = [u for u in self.unseen if (u.url, u.unique_id) != (url, unique_id)]

    def retry_releases(self, now: datetime) -> None:
        with self.lock:
            due = [key for key, (_, at) in self.failed_releases.items() if at <= now]
            for key in due:  # not due again until this try has failed
                attempts, _ = self.failed_releases[key]
                self.failed_releases[key] = (attempts, datetime.max.replace(tzinfo=UTC))
        for url, unique_id in due:
            self.take_pool.submit(self.release_now, url, unique_id)

    # -- takes ---------------------------------------------------------------------------

    def remember_recent_takes(self, now: datetime) -> None:
        """The runners of entries served lately, by whichever process led then, are not idle
        at their members until a poll shows them taken (a queue restarted right after a take
        would otherwise plan on the member's render from before it)."""
        since = now - timedelta(seconds=UNSEEN_LIMIT_SECONDS)
        moment = time.monotonic()
        with self.lock:
            known = {(u.url, u.unique_id) for u in self.unseen}
            for entry in self.store.served_since(since):
                done_at = moment - (now - (entry.served_at or now)).total_seconds()
                for url, ids in entry.reserved.items():
                    if ids and (url, entry.unique_id) not in known:
                        unseen = Unseen(
                            url, entry.profile, frozenset(ids), entry.unique_id, done_at
                        )
                        self.unseen.append(unseen)

    def resume_reserving(self) -> None:
        """Finish the takes a previous dispatcher left in flight (it died, or lost the lease):
        the same plan with the same unique_id gets the same runners."""
        for claim in self.store.reserving():
            with self.lock:
                known = claim.unique_id in self.inflight
            if not known:
                log.info("queue: resuming the takes of %s", claim.unique_id)
                self.forward(claim)

    def forward(self, claim: Claimed) -> None:
        flight = InFlight(claim, pending=len(claim.plan))
        if not claim.plan:  # an entry for 0 runners: nothing to take
            self.finish(flight)
            return
        with self.lock:
            self.inflight[claim.unique_id] = flight
        for url, n in claim.plan.items():
            self.take_pool.submit(self.take, flight, url, n)

    def take(self, flight: InFlight, url: str, n: int) -> None:
        claim = flight.claim
        short = False
        try:
            ids = self.members.take(
                url, claim.profile, n, claim.unique_id, claim.qualified_repo, claim.run_id
            )
            short = len(ids) != n
            result: list[int] | str = (
                f"{url} reserved {len(ids)} of {n} runners" if short else list(ids)
            )
        except Exception as error:  # MonitorError from the adapter, or a bug in it
            result = f"{url}: {error}"
            with self.lock:
                self.take_failed_at[url] = time.monotonic()
        with self.lock:
            if short:
                flight.short.add(url)
                self.take_short_at[(url, claim.profile)] = time.monotonic()
            flight.results[url] = result
            flight.pending -= 1
            last = flight.pending == 0
            if isinstance(result, list):
                taken = Unseen(
                    url, claim.profile, frozenset(result), claim.unique_id, time.monotonic()
                )
                self.unseen.append(taken)
        if last:
            self.finish(flight)

    def finish(self, flight: InFlight) -> None:
        try:
            self.record(flight)
        except TransientError as error:
            log.warning("queue: outcome of %s kept for later: %s", flight.claim.unique_id, error)
            with self.lock:
                self.unrecorded.append(flight)
            return
        with self.lock:
            self.inflight.pop(flight.claim.unique_id, None)
        self.wake.set()

    def record_unrecorded(self) -> None:
        with self.lock:
            flights, self.unrecorded = self.unrecorded, []
        for flight in flights:
            self.finish(flight)

    def record(self, flight: InFlight) -> None:
        """Served if every member reserved its share; else release what was reserved and
        put the entry back in its place (or give up after MAX_FAILURES)."""
        claim = flight.claim
        reserved = {url: r for url, r in flight.results.items() if isinstance(r, list)}
        errors = [r for r in flight.results.values() if isinstance(r, str)]
        now = self.clock()
        if not errors:
            state = self.store.serve(claim.unique_id, claim.attempt, reserved, now)
            if state is None:
                self.outcomes.add("served")
                log.info("queue: served %s: %s", claim.unique_id, reserved)
                return
            if state == "served":  # another dispatcher's result for the same runners
                return
            log.info("queue: %s is %s: releasing what its take got", claim.unique_id, state)
            self.release(claim.unique_id, flight.results)
            return
        error = "; ".join(errors)
        # Members that only had fewer idle runners than their counts said are no failure:
        # the entry waits again without coming closer to MAX_FAILURES (a burst of takes on
        # counts a few seconds old would otherwise fail entries whose clients wait on).
        failed = any(
            isinstance(r, str) and url not in flight.short for url, r in flight.results.items()
        )
        # Every member that was asked is released, the failed ones too: a take that timed out
        # may have reserved runners all the same.
        self.release(claim.unique_id, flight.results)
        if not failed:
            log.info("queue: %s: %s; it waits again", claim.unique_id, error)
            self.store.put_back(
                claim.unique_id, claim.attempt, error, give_up=False, now=now, failed=False
            )
            return
        self.outcomes.add("failed")
        record = self.store.get(claim.unique_id)
        give_up = record is not None and record.failures + 1 >= MAX_FAILURES
        log.warning(
            "queue: take for %s failed (%s); %s",
            claim.unique_id,
            error,
            "giving up" if give_up else "it waits again",
        )
        self.store.put_back(claim.unique_id, claim.attempt, error, give_up=give_up, now=now)


class SqlQueueEngine:
    """`contracts.QueueEngine` over a `QueueStore`; `start` runs its dispatcher."""

    def __init__(
        self,
        store: QueueStore,
        members: Members,
        servers: Sequence[str],
        *,
        repository_priority: Mapping[str, int],
        clock: Clock,
        poll_interval: float = 0.5,
        lease_seconds: float = LEASE_SECONDS,
        holder: str | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.repository_priority = dict(repository_priority)
        self.outcomes = Outcomes()
        holder = holder or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.dispatcher = Dispatcher(
            store,
            members,
            servers,
            self.outcomes,
            clock=clock,
            poll_interval=poll_interval,
            lease_seconds=lease_seconds,
            holder=holder,
        )

    def start(self) -> None:
        self.dispatcher.start()

    def stop(self, release_lease: bool = True) -> None:
        """Stop dispatching; `release_lease=False` leaves the lease to expire, as a killed
        process would."""
        self.dispatcher.stop(release_lease)

    def close(self) -> None:
        self.store.close()

    @property
    def leading(self) -> bool:
        return self.dispatcher.leading

    # -- contracts.QueueEngine -------------------------------------------------------------

    def enqueue(
        self,
        *,
        unique_id: str,
        profile: str,
        count: int,
        qualified_repo: str,
        run_id: str,
        priority: int | None = None,
    ) -> str:
        if not unique_id or not profile or count < 0:
            self.outcomes.add("refused")
            raise MonitorError("unique_id and profile are required, count must be >= 0", 422)
        now = self.clock()
        if not policy.satisfiable(profile, self.store.members(now, MEMBER_FRESH_SECONDS)):
            self.outcomes.add("refused")
            raise MonitorError(
                f'Request for profile not satisfiable: "{profile}" '
                "(no member polled in the last seconds has a target for it)",
                status=422,
            )
        if priority is None:
            priority = self.repository_priority.get(qualified_repo, 0)
        token = secrets.token_urlsafe(24)
        try:
            self.store.add(
                unique_id=unique_id,
                token_sha256=token_hash(token),
                profile=profile,
                count=count,
                qualified_repo=qualified_repo,
                run_id=run_id,
                priority=priority,
                now=now,
            )
        except MonitorError as error:
            if error.status == 409:
                self.outcomes.add("refused")
            raise
        self.dispatcher.wake.set()
        return token

    def poll(self, unique_id: str, token: str) -> PollAnswer:
        record = self.store.get(unique_id)
        if record is None:
            raise MonitorError(f'Not found: UniqueId("{unique_id}")', status=404)
        if not hmac.compare_digest(record.token_sha256, token_hash(token)):
            raise MonitorError(f'Bad token: UniqueId("{unique_id}")', status=403)
        entry = record.entry
        now = self.clock()
        if entry.state == "served" and self.store.answer(unique_id, now):
            return PollAnswer(served=True, count=entry.count)
        if entry.state in ("waiting", "reserving"):
            last = entry.last_poll_at
            if last is None or (now - last).total_seconds() >= TOUCH_EVERY_SECONDS:
                self.store.touch(unique_id, now)
            return PollAnswer(served=False, retry_after=RETRY_AFTER)
        # Ended (or ended between the read and the answer): the client falls back at once
        # (410 is not one of the statuses it retries).
        state = self.store.get(unique_id)
        ended = state.entry.state if state else "cancelled"
        raise MonitorError(f'Gone: UniqueId("{unique_id}") {ended}', status=410)

    def cancel(self, unique_id: str) -> None:
        record = self.store.cancel(unique_id, self.clock())
        if record is None:
            raise MonitorError(f'Not found: UniqueId("{unique_id}")', status=404)
        # A reserving entry's takes release on their own when they see it cancelled.
        if record.entry.state == "served":
            self.dispatcher.release(unique_id, record.entry.reserved)

    def snapshot(self) -> Snapshot:
        now = self.clock()
        with self.outcomes.lock:
            outcomes = dict(self.outcomes.counts)
        return Snapshot(
            entries=[record.entry for record in self.store.active()],
            members=self.store.members(now, MEMBER_FRESH_SECONDS),
            recent=self.store.recent(RECENT),
            outcomes=outcomes,
            taken_at=now,
        )


def utc_now() -> datetime:
    return datetime.now(UTC)


def open_engine(
    store_url: str,
    members: Members,
    servers: Sequence[str],
    *,
    repository_priority: Mapping[str, int],
    clock: Clock = utc_now,
    poll_interval: float = 0.5,
    data_path: Path | None = None,
    lease_seconds: float = LEASE_SECONDS,
) -> SqlQueueEngine:
    """An engine on the store at `store_url` (`sqlite:////abs/path`, `postgresql://...`, or "" for
    `<data_path>/queue.sqlite3`), its dispatcher not started yet."""
    return SqlQueueEngine(
        QueueStore(store_url, data_path),
        members,
        servers,
        repository_priority=repository_priority,
        clock=clock,
        poll_interval=poll_interval,
        lease_seconds=lease_seconds,
    )
