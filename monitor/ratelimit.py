"""How often may we try again: limits on others, and back-off for ourselves. Pure: the caller
passes the time.

`FixedWindowLimiter` limits requests per key (the tokenless `/select-runner`, per repository).
As GitHub's and rerobots' limits: `limit` requests per window of `window` seconds, counted from
the window's start; the answer says how many are left and when the window resets (epoch
seconds), for the `X-RateLimit-*` headers. Anyone can make up keys, so the table keeps a
fixed-size digest of each and at most `max_keys` of them.

`SlidingWindowBudget` spends a shared budget: at most `limit` units in any `window` seconds
(the GitHub calls that unauthenticated requests may cause, across every repository).

`Backoff` spaces our own retries of a failing operation (a profile's creates, a runner's
destroy, GitHub's runner list) exponentially, honouring a peer's Retry-After.
"""

from __future__ import annotations

import collections
import hashlib
import math
import threading
from collections.abc import Hashable
from dataclasses import dataclass
from datetime import datetime
from datetime import timedelta

# Keys kept at most. Anyone can send any repository name under the allowed prefix; past this
# many live windows, the oldest are forgotten (that key starts afresh), so the table's memory
# stays bounded whatever is sent (about 1.5 MB at this size).
MAX_KEYS = 10_000


def key_digest(key: str) -> bytes:
    """A fixed-size stand-in for a caller's key: its memory does not grow with the key."""
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()


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
    """At most `limit` requests per key in each window of `window` seconds. Thread-safe.

    Keys are kept as 16-byte digests, at most `max_keys` of them: windows that have ended are
    dropped as new ones start, and past `max_keys` live windows the oldest are forgotten.
    """

    def __init__(self, limit: int, window: float = 60.0, *, max_keys: int = MAX_KEYS) -> None:
        if limit < 1 or window <= 0 or max_keys < 1:
            raise ValueError("a limit needs at least 1 request in a positive window")
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._lock = threading.Lock()
        # digest -> (window start, requests), in order of window start: a key whose window
        # restarts moves to the end, so ended windows are always at the front.
        self._windows: dict[bytes, tuple[float, int]] = {}

    def __len__(self) -> int:
        return len(self._windows)

    def hit(self, key: str, now: float) -> Decision:
        """Count a request for `key` at `now` (epoch seconds) and say whether it may go on.
        A refused request is not counted: it costs the client nothing more."""
        digest = key_digest(key)
        with self._lock:
            entry = self._windows.get(digest)
            if entry is None or now >= entry[0] + self.window:
                self._windows.pop(digest, None)  # a new window goes to the end
                start, count = now, 0
            else:
                start, count = entry
            allowed = count < self.limit
            if allowed:
                count += 1
            self._windows[digest] = (start, count)
            self._prune(now)
        reset = math.ceil(start + self.window)
        return Decision(allowed, self.limit, self.limit - count, reset)

    def _prune(self, now: float) -> None:
        windows = self._windows
        while windows:
            oldest = next(iter(windows))
            if now < windows[oldest][0] + self.window and len(windows) <= self.max_keys:
                return
            del windows[oldest]


class SlidingWindowBudget:
    """At most `limit` units spent in any `window` seconds, across all callers. Thread-safe.

    Keeps one timestamp per unit spent in the last window (`limit` at most).
    """

    def __init__(self, limit: int, window: float) -> None:
        if limit < 1 or window <= 0:
            raise ValueError("a budget needs at least 1 unit in a positive window")
        self.limit = limit
        self.window = window
        self._lock = threading.Lock()
        self._spent: collections.deque[float] = collections.deque()

    def spent(self, now: float) -> int:
        """Units spent in the window ending at `now`."""
        with self._lock:
            self._expire(now)
            return len(self._spent)

    def take(self, units: int, now: float) -> float | None:
        """Spend `units` at `now` if the budget allows all of them: None. Else spend nothing
        and return the seconds until it will (for Retry-After)."""
        with self._lock:
            self._expire(now)
            over = len(self._spent) + units - self.limit
            if over <= 0:
                self._spent.extend([now] * units)
                return None
            if units > self.limit:
                return self.window
            # The `over`-th oldest unit must leave the window first.
            return max(0.0, self._spent[over - 1] + self.window - now)

    def give_back(self, units: int) -> None:
        """Return units taken but not spent (the newest ones)."""
        with self._lock:
            for _ in range(min(units, len(self._spent))):
                self._spent.pop()

    def _expire(self, now: float) -> None:
        while self._spent and self._spent[0] + self.window <= now:
            self._spent.popleft()


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
