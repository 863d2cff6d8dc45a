"""A hand-written `QueueEngine` for tests of the queue's web edge and service: it keeps real
state (entries, tokens, FIFO order, runners to hand out per profile) in memory, and any call
can be made to fail (`fail_next`, from `tests.fakes.Armable`)."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterable
from datetime import UTC
from datetime import datetime

from monitor.errors import MonitorError
from monitor.queue.contracts import Counts
from monitor.queue.contracts import Entry
from monitor.queue.contracts import MemberView
from monitor.queue.contracts import PollAnswer
from monitor.queue.contracts import Snapshot
from tests.fakes import Armable


class FakeQueueEngine(Armable):
    """Entries of `profiles` wait until `free(profile, n)` gives runners; the oldest entry
    that fits is served on its next poll. `retry_after` is what waiting polls answer."""

    def __init__(self, profiles: Iterable[str] = ("linux",), retry_after: float = 0.2) -> None:
        super().__init__()
        self.profiles = set(profiles)
        self.retry_after = retry_after
        self.idle: dict[str, int] = dict.fromkeys(self.profiles, 0)
        self.entries: dict[str, Entry] = {}
        self.tokens: dict[str, str] = {}
        self.polls: dict[str, int] = {}
        self.started = self.stopped = False
        self.lock = threading.Lock()

    # Lifecycle (service.RunningEngine)

    def start(self) -> None:
        self._call("start")
        self.started = True

    def stop(self) -> None:
        self._call("stop")
        self.stopped = True

    # QueueEngine

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
        self._call("enqueue", (unique_id, profile, count, qualified_repo, run_id, priority))
        with self.lock:
            if unique_id in self.entries:
                raise MonitorError(f"Already in queue: {unique_id}", 409)
            if profile not in self.profiles:
                raise MonitorError(f"Request for profile not satisfiable: {profile!r}", 422)
            now = datetime.now(UTC)
            self.entries[unique_id] = Entry(
                unique_id=unique_id,
                profile=profile,
                count=count,
                qualified_repo=qualified_repo,
                run_id=run_id,
                priority=priority or 0,
                seq=len(self.entries),
                state="waiting",
                enqueued_at=now,
                last_poll_at=None,
                served_at=None,
            )
            self.tokens[unique_id] = token = secrets.token_urlsafe(24)
            return token

    def poll(self, unique_id: str, token: str) -> PollAnswer:
        self._call("poll", (unique_id, token))
        with self.lock:
            entry = self.entries.get(unique_id)
            if entry is None:
                raise MonitorError(f"Not found: {unique_id}", 404)
            if not secrets.compare_digest(self.tokens[unique_id], token):
                raise MonitorError(f"Bad token for {unique_id}", 403)
            self.polls[unique_id] = self.polls.get(unique_id, 0) + 1
            if entry.state == "waiting" and self._first_waiting(entry.profile) is entry:
                if self.idle[entry.profile] >= entry.count:
                    self.idle[entry.profile] -= entry.count
                    entry = self._replace(entry, state="served", served_at=datetime.now(UTC))
            if entry.state == "served":
                return PollAnswer(served=True, count=entry.count)
            return PollAnswer(served=False, retry_after=self.retry_after)

    def cancel(self, unique_id: str) -> None:
        self._call("cancel", unique_id)
        with self.lock:
            if unique_id not in self.entries:
                raise MonitorError(f"Not found: {unique_id}", 404)
            self._replace(self.entries[unique_id], state="cancelled")

    def snapshot(self) -> Snapshot:
        self._call("snapshot")
        with self.lock:
            waiting = [e for e in self.entries.values() if e.state == "waiting"]
            counts = {p: Counts(idle=n, healthy=n, target=n) for p, n in self.idle.items()}
        return Snapshot(
            entries=waiting,
            members=[MemberView(url="http://127.0.0.1:9", fresh=True, counts=counts)],
            recent=[],
            outcomes={},
            taken_at=datetime.now(UTC),
        )

    # For tests

    def free(self, profile: str, count: int) -> None:
        with self.lock:
            self.idle[profile] += count

    def _first_waiting(self, profile: str) -> Entry | None:
        waiting = [
            e for e in self.entries.values() if e.state == "waiting" and e.profile == profile
        ]
        return min(waiting, key=lambda e: e.seq, default=None)

    def _replace(self, entry: Entry, **changes: object) -> Entry:
        from dataclasses import replace

        new = replace(entry, **changes)  # type: ignore[arg-type]
        self.entries[entry.unique_id] = new
        return new
