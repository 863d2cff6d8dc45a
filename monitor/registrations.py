"""GitHub's runner list as the monitor knows it: a write-through cache, the refresher that
fills it, and the check of the workflow runs that Reserved runners wait for.

Threads: `Registrations.refresh` and `Registrations.check_reserved_runs` run on the
scheduler's thread (GitHub reads only; they never raise). `Registrations.too_stale` runs on the
monitor thread, which also writes its own creates, deletes and reservations through the cache
(`RegistrationCache.upsert`/`remove`). Web threads read the cache and `error`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from collections.abc import Iterable
from datetime import datetime
from datetime import timedelta
from typing import Any

from monitor import models
from monitor import policy
from monitor.errors import MonitorError
from monitor.errors import TransientError
from monitor.github import GitHub
from monitor.github import RateLimit
from monitor.ratelimit import Backoff

log = logging.getLogger(__name__)

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
        # The generation at the last `invalidate()`: one made while a fetch was in flight
        # outlives that fetch, whose list may predate what made the caller invalidate.
        self._invalidated_at = 0
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
            self._invalid = self._invalidated_at > began
            self._forced_expiry = None
            self._not_before = None

    def back_off(self, until: datetime) -> None:
        with self._lock:
            self._not_before = until

    @property
    def not_before(self) -> datetime | None:
        """No fetch before this (a back-off after a failure, or a low budget)."""
        with self._lock:
            return self._not_before

    def invalidate(self) -> None:
        """Fetch again at the next chance (the cached list stays usable until then)."""
        with self._lock:
            self._generation += 1
            self._invalidated_at = self._generation
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

    def add(self, registration: policy.Registration) -> None:
        """A registration the monitor just made, as GitHub answered its creation: kept
        unless the list already has it, which is then newer (its agent may be online)."""
        self._write("add", registration)

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
    elif op == "add":
        registrations.setdefault(payload.id, payload)
    else:
        registrations.pop(payload, None)


class Registrations:
    """The runner list and what the monitor learns about it from GitHub.

    `cache` is the list (read by every thread); `error` the last failure to fetch it (None
    while fetches work); `finished_runs` the workflow runs (`reserved-by` values) GitHub
    reports completed, with their conclusion, for Reserved runners of the monitor's last
    observation (`observe()`). `refresh` and `check_reserved_runs` run on the
    scheduler's thread and ask for a reconcile (`request_reconcile`) when they learned
    something; `too_stale` runs on the monitor thread.
    """

    def __init__(
        self,
        github: GitHub,
        *,
        suffix: str,
        cache_timeout: timedelta,
        clock: Callable[[], datetime],
        observe: Callable[[], policy.Observation | None],
        request_reconcile: Callable[[], None],
    ) -> None:
        self.github = github
        self.observe = observe
        self.suffix = suffix
        self.cache_timeout = cache_timeout
        self.clock = clock
        self.request_reconcile = request_reconcile
        self.cache = RegistrationCache(cache_timeout)
        self.error: str | None = None
        self.finished_runs: dict[str, str] = {}
        # When each run Reserved runners wait for was last asked about.
        self.run_checked_at: dict[str, datetime] = {}
        self._list_backoff = Backoff(base=GITHUB_BACKOFF_BASE, cap=GITHUB_BACKOFF_CAP)
        self._stale_reported = False

    @property
    def fetched_at(self) -> datetime | None:
        return self.cache.fetched_at

    def refresh(self, force: bool = False) -> bool:
        """Fetch GitHub's runner list if the cache is due; queue a reconcile after a fetch.

        A read that cannot race the monitor thread. A failure is logged and backed off
        (honouring Retry-After); it never raises.
        """
        now = self.clock()
        if not force and not self.cache.is_due(now):
            return False
        began = self.cache.begin_fetch()
        try:
            fetched = self.github.list_runners()
        except MonitorError as error:
            # From the failure, not from before the request: Retry-After counts from its answer.
            failed_at = self.clock()
            delay = self._list_backoff.failed("list", failed_at, retry_after(error))
            self.cache.back_off(failed_at + delay)
            if self.error != str(error):
                log.warning("GitHub runner list failed, retrying in %s: %s", delay, error)
                models.record_event("github-error", f"listing runners failed: {error}")
            self.error = str(error)
            return False
        suffix = "@" + self.suffix
        ours = [r for r in fetched if r.name.endswith(suffix)]
        self.cache.store(ours, self.clock(), began)
        slower = polling_delay(self.github.rate_limit, now, self.cache_timeout)
        if slower is not None:
            # GitHub's budget is running out: look less often, keeping the rest for the
            # calls that create runners and serve takes.
            self.cache.back_off(now + slower)
            log.warning("GitHub API budget low: next look at the runner list in %s", slower)
        self._list_backoff.succeeded("list")
        if self.error is not None:
            log.info("GitHub runner list works again")
            models.record_event("github-ok", "listing runners works again")
            self.error = None
        self.request_reconcile()
        return True

    def check_reserved_runs(self) -> list[str]:
        """Ask GitHub about the workflow runs Reserved runners wait for; note those that
        completed (cancelled, failed or done without using their runner) and queue a
        reconcile, which reclaims the runners (`policy.PolicyInput.finished_runs`) instead of
        letting them wait out `monitor_reserve_timeout`. Returns the runs it asked about.

        Read-only; a failure is logged and tried again later. Skipped while GitHub's budget
        is low (the runner list comes first)."""
        observation = self.observe()
        if observation is None:
            return []
        now = self.clock()
        if polling_delay(self.github.rate_limit, now, self.cache_timeout) is not None:
            return []
        waiting = policy.runs_to_check(observation.runners, now, RUN_CHECK_AFTER)
        finished = {run: c for run, c in self.finished_runs.items() if run in waiting}
        checked_at = {run: at for run, at in self.run_checked_at.items() if run in waiting}
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
        self.run_checked_at = checked_at
        newly = set(finished) - set(self.finished_runs)
        self.finished_runs = finished  # replaced whole: the monitor thread reads it
        if newly:
            self.request_reconcile()
        return asked

    def too_stale(self, now: datetime) -> bool:
        """Whether the list is too old to act on (monitor thread); said once when it becomes
        so."""
        fetched_at = self.cache.fetched_at
        limit = max(MIN_STALE_REGISTRATIONS, 3 * self.cache_timeout)
        stale = fetched_at is None or now - fetched_at > limit
        if stale and not self._stale_reported:
            message = f"GitHub's runner list is older than {limit}; changing nothing until it works"
            log.warning("%s", message)
            models.record_event("stale", message, at=now)
        self._stale_reported = stale
        return stale


class SeenBusy:
    """Runners GitHub has reported busy at least once (`ids`), kept in the store.

    GitHub's `busy` flag reads false for up to a minute after a job starts, and may flap; a
    runner in this set counts as Busy while it is online (`policy.Runner.seen_busy`), so it is
    never reclaimed as Idle or Reserved again. Monitor thread only.
    """

    def __init__(self) -> None:
        self.ids: frozenset[int] = frozenset(models.load_seen_busy())

    def note(self, busy: Iterable[int], live: Iterable[int]) -> None:
        """Add the runners seen `busy` now and forget those no longer `live` (ids are never
        reused); stored only when the set changes."""
        ids = (self.ids | frozenset(busy)) & frozenset(live)
        if ids != self.ids:
            models.save_seen_busy(ids)
            self.ids = ids

    def add(self, runner_id: int) -> None:
        if runner_id not in self.ids:
            self.note([runner_id], self.ids | {runner_id})


def polling_delay(
    rate_limit: RateLimit | None, now: datetime, normal: timedelta
) -> timedelta | None:
    """How long to wait before the next runner-list fetch when GitHub's budget runs low
    (under LOW_BUDGET_FRACTION of the limit left), or None while it does not: the time to
    the reset spread over half the calls left, never less often than `normal`."""
    if rate_limit is None or rate_limit.remaining >= rate_limit.limit * LOW_BUDGET_FRACTION:
        return None
    until_reset = rate_limit.reset_at - now
    if until_reset <= timedelta(0):
        return None
    return max(normal, until_reset / max(1, rate_limit.remaining // 2))


def retry_after(error: BaseException) -> float | None:
    """The delay a peer asked for with a transient failure, if it asked."""
    return error.retry_after if isinstance(error, TransientError) else None
