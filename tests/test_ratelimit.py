"""The tokenless select's limits (monitor/ratelimit.py): the per-repository fixed window and
the shared GitHub-call budget. Pure, given times."""

from __future__ import annotations

import tracemalloc

import pytest

from monitor.ratelimit import FixedWindowLimiter
from monitor.ratelimit import SlidingWindowBudget

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


def test_ended_windows_are_dropped_as_new_ones_start():
    limiter = FixedWindowLimiter(1, window=10)
    for key in ("a/a", "b/b", "c/c"):
        limiter.hit(key, T0)
    limiter.hit("a/a", T0 + 5)  # still in its window: kept in place
    limiter.hit("d/d", T0 + 20)  # every other window has ended
    assert len(limiter) == 1


def test_a_restarted_window_is_kept_past_older_ended_ones():
    limiter = FixedWindowLimiter(1, window=10)
    limiter.hit("a/a", T0)
    limiter.hit("b/b", T0 + 5)
    limiter.hit("a/a", T0 + 12)  # a's new window starts after b's
    assert not limiter.hit("a/a", T0 + 16).allowed  # b's ended window dropped, a's kept
    assert len(limiter) == 1


def test_the_table_keeps_at_most_max_keys_forgetting_the_oldest():
    limiter = FixedWindowLimiter(1, window=60, max_keys=3)
    for n in range(10):
        assert limiter.hit(f"servo/made-up-{n}", T0 + n).allowed
    assert len(limiter) == 3
    assert not limiter.hit("servo/made-up-9", T0 + 10).allowed  # the newest are remembered
    assert limiter.hit("servo/made-up-0", T0 + 10).allowed  # the oldest were forgotten


def test_keys_cost_the_same_memory_however_long():
    limiter = FixedWindowLimiter(1, window=60)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(100):
            limiter.hit(f"{n}/" + "x" * 256 * 1024, T0)  # each key 256 KiB
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(limiter) == 100
    assert grown < 100 * 1024, grown  # about a hundred bytes a key, not 25 MiB


def test_a_budget_is_spent_across_callers_and_frees_as_the_window_slides():
    budget = SlidingWindowBudget(5, window=3600)
    assert budget.take(2, T0) is None
    assert budget.take(2, T0 + 100) is None
    assert budget.take(2, T0 + 200) == 3400  # one unit short until T0's two leave the window
    assert budget.spent(T0 + 200) == 4  # a refusal spends nothing
    assert budget.take(1, T0 + 200) is None
    assert budget.take(1, T0 + 300) == 3300
    assert budget.take(1, T0 + 3600) is None  # T0's units have left the window
    assert budget.spent(T0 + 3600) == 4


def test_a_budget_takes_back_what_was_not_spent():
    budget = SlidingWindowBudget(2, window=60)
    assert budget.take(2, T0) is None
    budget.give_back(1)
    assert budget.take(1, T0 + 1) is None
    assert budget.take(1, T0 + 2) == 58
    assert budget.take(3, T0 + 2) == 60  # never enough


@pytest.mark.parametrize(("limit", "window"), [(0, 60), (1, 0)])
def test_a_limit_needs_a_request_and_a_window(limit, window):
    with pytest.raises(ValueError):
        FixedWindowLimiter(limit, window)
