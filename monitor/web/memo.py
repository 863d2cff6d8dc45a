"""A page fragment rendered again only when what it shows has changed, with an ETag that is a
hash of its bytes (the same state, the same tag). Used by the dashboard's live fragment and
the queue page's.

Browsers poll every second and usually nothing has changed. Under load the state changes
several times a second, so renders are made one at a time on whichever web thread asks: a
poll that waited for another's render takes it if that began after the poll arrived
(measured by bench/load.py: every web thread rendering at once made /dashboard.json wait
seconds behind them). Any web thread may call `RenderMemo.get`.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from typing import Generic
from typing import TypeVar

State = TypeVar("State")


class RenderMemo(Generic[State]):
    """The last render of a fragment: `same(old, new)` says whether two states show the same
    thing (default `==`)."""

    def __init__(self, same: Callable[[State, State], bool] | None = None) -> None:
        self._same = same or (lambda old, new: old == new)
        # (the state it showed, body, ETag, when it began)
        self._last: tuple[State, str, str, float] | None = None
        self._lock = threading.Lock()

    def get(self, state: Callable[[], State], render: Callable[[State], str]) -> tuple[str, str]:
        """The fragment's body and ETag for `state()`, rendered with `render` if need be."""
        asked = time.monotonic()
        memo = self._last
        if memo is not None and self._same(memo[0], state()):
            return memo[1], memo[2]
        with self._lock:
            memo = self._last
            if memo is not None and memo[3] >= asked:
                return memo[1], memo[2]
            started = time.monotonic()
            current = state()
            if memo is not None and self._same(memo[0], current):
                return memo[1], memo[2]
            body = render(current)
            etag = '"' + hashlib.sha256(body.encode()).hexdigest()[:20] + '"'
            self._last = (current, body, etag, started)
            return body, etag
