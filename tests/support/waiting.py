"""Polling for a condition: the one way tests and benchmarks wait for something to happen."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

WAIT = 30.0  # generous: every wait polls and ends as soon as its condition holds


def wait_until(
    condition: Callable[[], Any], what: str, timeout: float = WAIT, interval: float = 0.05
) -> Any:
    """Poll `condition` until it is truthy and return it; fail (AssertionError) after `timeout`
    seconds, saying what was waited for."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(interval)
