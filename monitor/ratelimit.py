"""How often may we try again: limits on others, and back-off for ourselves. Pure: the caller
passes the time.

`FixedWindowLimiter` limits requests per key (the tokenless `/select-runner`, per repository).
As GitHub's and rerobots' limits: `limit` requests per window of `window` seconds, counted from
the window's start; the answer says how many are left and when the window resets (epoch
seconds), for the `X-RateLimit-*` headers.

`Backoff` spaces our own retries of a failing operation (a profile's creates, a runner's
destroy, GitHub's runner list) exponentially, honouring a peer's Retry-After.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Hashable
from dataclasses import dataclass
from datetime import datetime
from datetime import timedelta

# Past this many keys, windows that have ended are dropped (anyone can send any repo name).
PRUNE_AT = 10_000


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset: int  # epoch seconds when the window ends

    def headers(self) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(self.reset),
        }

    def retry_after(self, now: float) -> int:
        """Whole seconds until the window resets (at least 1)."""
        return max(1, math.ceil(self.reset - now))


class FixedWindowLimiter:
    """At most `limit` requests per key in each window of `window` seconds. Thread-safe."""

    def __init__(self, limit: int, window: float = 60.0) -> None:
        if limit < 1 or window <= 0:
            raise ValueError("a limit needs at least 1 request in a positive window")
        self.limit = limit
        self.window = window
        self._lock = threading.Lock()
        self._windows: dict[str, tuple[float, int]] = {}  # key -> (window start, requests)

    def hit(self, key: str, now: float) -> Decision:
        """Count a request for `key` at `now` (epoch seconds) and say whether it may go on.
        A refused request is not counted: it costs the client nothing more."""
        with self._lock:
            start, count = self._windows.get(key, (now, 0))
            if now >= start + self.window:
                start, count = now, 0
            allowed = count < self.limit
            if allowed:
                count += 1
            self._windows[key] = (start, count)
            if len(self._windows) > PRUNE_AT:
                self._windows = {k: w for k, w in self._windows.items() if now < w[0] + self.window}
        reset = math.ceil(start + self.window)
        return Decision(allowed, self.limit, self.limit - count, reset)


class Backoff:
    """Exponential back-off per key (a profile, a runner id) after failed operations,
    honouring a peer's Retry-After, so a persistent fault is retried at a bounded rate.
    Not thread-safe: each user keeps its own, on one thread."""

    def __init__(
        self,
        base: timedelta = timedelta(seconds=5),
        cap: timedelta = timedelta(minutes=5),
    ) -> None:
        self.base = base
        self.cap = cap
        self._state: dict[Hashable, tuple[int, datetime]] = {}

    def ready(self, key: Hashable, now: datetime) -> bool:
        state = self._state.get(key)
        return state is None or now >= state[1]

    def failed(self, key: Hashable, now: datetime, retry_after: float | None = None) -> timedelta:
        failures = self._state.get(key, (0, now))[0] + 1
        delay = min(self.cap, self.base * (1 << min(failures - 1, 16)))
        if retry_after is not None:
            delay = max(delay, timedelta(seconds=retry_after))
        self._state[key] = (failures, now + delay)
        return delay

    def succeeded(self, key: Hashable) -> None:
        self._state.pop(key, None)
