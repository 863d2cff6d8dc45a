"""The fixed-window limit of the tokenless select (monitor/ratelimit.py): pure, given times."""

from __future__ import annotations

import pytest

from monitor import ratelimit
from monitor.ratelimit import FixedWindowLimiter

T0 = 1_795_000_000.25


def test_allows_up_to_the_limit_then_refuses_until_the_window_ends():
    limiter = FixedWindowLimiter(3, window=60)
    decisions = [limiter.hit("servo/servo", T0 + i) for i in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions] == [2, 1, 0, 0]
    assert {d.reset for d in decisions} == {1_795_000_061}  # the window's end, rounded up
    assert decisions[3].retry_after(T0 + 3) == 58
    assert decisions[0].headers() == {
        "X-RateLimit-Limit": "3",
        "X-RateLimit-Remaining": "2",
        "X-RateLimit-Reset": "1795000061",
    }
    # A new window starts with the first request after the old one ended.
    later = limiter.hit("servo/servo", T0 + 60)
    assert (later.allowed, later.remaining, later.reset) == (True, 2, 1_795_000_121)


def test_refused_requests_are_not_counted_and_keys_are_separate():
    limiter = FixedWindowLimiter(1, window=10)
    assert limiter.hit("a/a", T0).allowed
    for i in range(5):
        assert not limiter.hit("a/a", T0 + i).allowed
    assert limiter.hit("b/b", T0).allowed
    assert limiter.hit("a/a", T0 + 10).allowed  # not pushed back by the refused ones


def test_ended_windows_are_dropped_when_there_are_many_keys(monkeypatch):
    monkeypatch.setattr(ratelimit, "PRUNE_AT", 3)
    limiter = FixedWindowLimiter(1, window=10)
    for key in ("a", "b", "c"):
        limiter.hit(key, T0)
    limiter.hit("d", T0 + 20)  # the others' windows have ended
    assert set(limiter._windows) == {"d"}


@pytest.mark.parametrize(("limit", "window"), [(0, 60), (1, 0)])
def test_a_limit_needs_a_request_and_a_window(limit, window):
    with pytest.raises(ValueError):
        FixedWindowLimiter(limit, window)
