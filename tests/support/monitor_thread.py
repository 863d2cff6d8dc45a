"""The test thread playing the monitor thread of a Monitor that was not started: it runs what
the workers post back, so every step of a test is deterministic."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from monitor import loop
from tests.support.clock import Clock


def settle(
    monitor: loop.Monitor,
    until: Callable[[], Any] | None = None,
    what: str = "nothing in flight",
    timeout: float = 10.0,
) -> None:
    """Handle queued items on this thread, as the monitor thread would, until `until()` holds;
    without `until`, until the queue is empty and nothing is in flight. Queued reconcile and
    view refreshes are dropped: the tests tick explicitly."""
    try:
        monitor.run_pending(timeout, until=None if until is None else lambda: bool(until()))
    except TimeoutError as error:
        raise AssertionError(f"timed out waiting for {what}: {error}") from None


def step(monitor: loop.Monitor, clock: Clock):
    """One scheduler refresh plus one reconcile, then let the workers finish."""
    monitor.registrations.refresh(force=True)
    observation = monitor.tick(clock())
    settle(monitor)
    return observation
