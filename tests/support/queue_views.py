"""Hand-built queue snapshots, a fake `QueueEngine` that answers with whatever snapshot a test
sets, and a bottle app serving the queue's views over it (as the queue's own app does: the
security headers and the error plugin of monitor.web)."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from collections.abc import Sequence
from datetime import UTC
from datetime import datetime
from datetime import timedelta
from typing import Any

import bottle

from monitor import web
from monitor.errors import MonitorError
from monitor.queue.contracts import Counts
from monitor.queue.contracts import Entry
from monitor.queue.contracts import MemberView
from monitor.queue.contracts import PollAnswer
from monitor.queue.contracts import Snapshot
from monitor.queue.pages import QueueFragment
from monitor.queue.pages import install_view_routes

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
MEMBER_A = "http://ci1.example:8000"
MEMBER_B = "http://ci2.example:8000"


def entry(
    unique_id: str,
    *,
    seq: int,
    profile: str = "servo-ubuntu2204",
    count: int = 1,
    repo: str = "servo/servo",
    run_id: str = "1000",
    priority: int = 0,
    state: str = "waiting",
    enqueued: float = 0.0,
    polled: float | None = None,
    served: float | None = None,
    reserved: Mapping[str, Sequence[int]] | None = None,
) -> Entry:
    """An entry; times are seconds after T0."""
    return Entry(
        unique_id=unique_id,
        profile=profile,
        count=count,
        qualified_repo=repo,
        run_id=run_id,
        priority=priority,
        seq=seq,
        state=state,  # type: ignore[arg-type]
        enqueued_at=T0 + timedelta(seconds=enqueued),
        last_poll_at=None if polled is None else T0 + timedelta(seconds=polled),
        served_at=None if served is None else T0 + timedelta(seconds=served),
        reserved=dict(reserved or {}),
    )


def member(
    url: str, fresh: bool = True, polled: float | None = 0.0, error: str | None = None, **counts
) -> MemberView:
    """A member; `counts` maps a profile to (idle, healthy, target)."""
    return MemberView(
        url=url,
        fresh=fresh,
        counts={key: Counts(*value) for key, value in counts.items()},
        polled_at=None if polled is None else T0 + timedelta(seconds=polled),
        error=error,
    )


def snapshot(
    entries: Sequence[Entry] = (),
    members: Sequence[MemberView] = (),
    recent: Sequence[Entry] = (),
    outcomes: Mapping[str, int] | None = None,
    at: float = 10.0,
) -> Snapshot:
    return Snapshot(
        entries=tuple(entries),
        members=tuple(members),
        recent=tuple(recent),
        outcomes=dict(outcomes or {}),
        taken_at=T0 + timedelta(seconds=at),
    )


class FakeEngine:
    """A `QueueEngine` whose snapshot a test sets (`current`), or that fails (`failure`).
    The other calls are not used by the views."""

    def __init__(self, current: Snapshot) -> None:
        self._lock = threading.Lock()
        self._current = current
        self.failure: MonitorError | None = None
        self.snapshots_taken = 0

    @property
    def current(self) -> Snapshot:
        return self._current

    @current.setter
    def current(self, value: Snapshot) -> None:
        with self._lock:
            self._current = value

    def snapshot(self) -> Snapshot:
        with self._lock:
            self.snapshots_taken += 1
            if self.failure is not None:
                raise self.failure
            return self._current

    def enqueue(self, **kwargs: Any) -> str:
        raise MonitorError("not in this fake", 501)

    def poll(self, unique_id: str, token: str) -> PollAnswer:
        raise MonitorError("not in this fake", 501)

    def cancel(self, unique_id: str) -> None:
        raise MonitorError("not in this fake", 501)


def view_app(engine: FakeEngine) -> tuple[bottle.Bottle, QueueFragment]:
    """A bottle app with the queue's view routes over `engine`, secured and with errors
    mapped as the monitor's apps are."""
    app = web.SecuredBottle()
    lookup = [str(web.VIEWS)]

    def render(name: str, **values: Any) -> str:
        return bottle.template(name, template_lookup=lookup, **values)

    app.install(web.error_plugin(render))
    return app, install_view_routes(app, engine)
