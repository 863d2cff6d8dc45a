"""The test thread playing the monitor thread of a Monitor that was not started: it runs what
the workers post back, so every step of a test is deterministic."""

from __future__ import annotations

import queue
from collections.abc import Callable
from typing import Any

from monitor import loop
from tests.support.clock import Clock
from tests.support.waiting import wait_until


def settle(
    monitor: loop.Monitor,
    until: Callable[[], Any] | None = None,
    what: str = "nothing in flight",
    timeout: float = 10.0,
) -> None:
    """Handle queued items on this thread, as the monitor thread would, until `until()` holds;
    without `until`, until the queue is empty and nothing is in flight. Queued reconcile and
    view refreshes are dropped: the tests tick explicitly."""

    def handled_enough() -> bool:
        if until is not None and until():
            return True
        try:
            item = monitor.next_request(timeout=0.02)
        except queue.Empty:
            return until is None and not monitor.in_flight
        if item is loop._RECONCILE:
            monitor._reconcile_queued.clear()
        elif item is loop._REFRESH_VIEW:
            monitor._view_refresh_queued.clear()
        else:
            monitor._handle(item)
        return False

    wait_until(handled_enough, what, timeout, interval=0)


def step(monitor: loop.Monitor, clock: Clock):
    """One scheduler refresh plus one reconcile, then let the workers finish."""
    monitor.refresh_registrations(force=True)
    observation = monitor.tick(clock())
    settle(monitor)
    return observation
