"""What the queue's parts agree on: plain data and two Protocols, no I/O.

`QueueEngine` is what the web edge asks (implemented in engine.py); `Members` is how the
engine reaches the monitors it serves (implemented over HTTP in members.py, faked in tests).
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from datetime import datetime
from typing import Literal
from typing import Protocol

# An entry with no take request for this long is dropped and its runners released (upstream:
# 30 s; the client polls every second).
ENTRY_EXPIRY_SECONDS = 30.0


@dataclass(frozen=True)
class Counts:
    """One profile on one member, from its `/dashboard.json` `profile_runner_counts`."""

    idle: int
    healthy: int
    target: int


@dataclass(frozen=True)
class MemberPoll:
    """A member's `/dashboard.json` as the queue reads it: its counts, and the ids of the
    runners it lists as untaken (registered, not busy, no `reserved-for:` label). Both are
    of the member's last render, which may predate a take it has already answered: a take
    whose runners are still listed untaken is not in these counts yet. `untaken` is None
    when the answer lists no runners."""

    counts: Mapping[str, Counts]
    untaken: frozenset[int] | None = None


@dataclass(frozen=True)
class MemberView:
    """A member as the queue last saw it. `fresh` is False when its last poll failed (its
    counts are then the last good ones, shown but never planned on)."""

    url: str
    fresh: bool
    counts: Mapping[str, Counts]
    polled_at: datetime | None = None
    error: str | None = None


@dataclass(frozen=True)
class Waiting:
    """An entry waiting for runners. `seq` is its place in the enqueue order (unique and
    increasing across every process sharing the store)."""

    unique_id: str
    profile: str
    count: int
    priority: int
    seq: int


EntryState = Literal["waiting", "reserving", "served", "expired", "cancelled", "failed"]


@dataclass(frozen=True)
class Entry:
    """An entry as the page, `/dashboard.txt`, metrics and `monitor queue-status` show it."""

    unique_id: str
    profile: str
    count: int
    qualified_repo: str
    run_id: str
    priority: int
    seq: int
    state: EntryState
    enqueued_at: datetime
    last_poll_at: datetime | None
    served_at: datetime | None
    # member url -> runner ids reserved there for this entry
    reserved: Mapping[str, Sequence[int]] = field(default_factory=dict)


@dataclass(frozen=True)
class PollAnswer:
    """What `POST /take/<unique_id>?token` answers: `served` with the runner count, or
    `waiting` (503, empty body, Retry-After)."""

    served: bool
    count: int = 0
    retry_after: float = 1.0


@dataclass(frozen=True)
class Snapshot:
    """The queue's state for its page, `/dashboard.txt`, `/metrics` and the CLI."""

    entries: Sequence[Entry]  # waiting and reserving, in serving order
    members: Sequence[MemberView]
    recent: Sequence[Entry]  # the latest served, expired and failed entries, newest first
    outcomes: Mapping[str, int]  # served, expired, refused, failed: counts since start
    taken_at: datetime


class QueueEngine(Protocol):
    """The queue as the web edge sees it. Errors are `MonitorError`s with the HTTP status
    the client relies on (404 unknown entry, 403 bad token, 409 already queued, 422 no fresh
    member has a target for the profile, 503 store unreachable)."""

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
        """Queue an entry; return its token (URL-safe, no newline). `priority` None: the
        repository's from `[queue] repository_priority`, else 0."""
        ...

    def poll(self, unique_id: str, token: str) -> PollAnswer:
        """A client's take request: keeps the entry alive; served once all its runners are
        reserved (and every later poll of a served entry answers the same)."""
        ...

    def cancel(self, unique_id: str) -> None:
        """Drop an entry, releasing whatever was reserved for it."""
        ...

    def snapshot(self) -> Snapshot: ...


class Members(Protocol):
    """The monitors the queue serves. Every call raises `MonitorError` (a `TransientError`
    for timeouts and 5xx) on failure; none retries."""

    def poll(self, url: str) -> MemberPoll:
        """`GET <url>/dashboard.json` -> its `profile_runner_counts` and untaken runners
        (1.5 s timeout)."""
        ...

    def take(
        self, url: str, profile: str, count: int, unique_id: str, qualified_repo: str, run_id: str
    ) -> list[int]:
        """`POST <url>/profile/<profile>/take/<count>?unique_id&qualified_repo&run_id` with the
        API token: the ids of the runners reserved ([] if the member had too few; a retry
        with the same unique_id gets the same runners)."""
        ...

    def release(self, url: str, unique_id: str) -> bool:
        """Un-reserve what `url` reserved for `unique_id` (our monitors' authenticated
        release endpoint). False when the member cannot (upstream's monitor: its runners
        are left to the reserve timeout)."""
        ...
