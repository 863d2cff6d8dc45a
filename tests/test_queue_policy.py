"""Tests for monitor.queue.policy: which waiting entry gets which members' idle runners.

Tables: members are written `"url": {"profile": (idle, healthy, target)}` (a leading `~` on the
url marks a stale member); entries `(unique_id, profile, count, priority)`, enqueued in the
order given (seq 1, 2, ...); the expected plan lists `(unique_id, {url: runners})` in serving
order.
"""

from __future__ import annotations

import pytest

from monitor.queue.contracts import Counts
from monitor.queue.contracts import MemberView
from monitor.queue.contracts import Waiting
from monitor.queue.policy import plan
from monitor.queue.policy import satisfiable
from monitor.queue.policy import serving_order


def members(table: dict[str, dict[str, tuple[int, int, int]]]) -> list[MemberView]:
    return [
        MemberView(
            url=url.lstrip("~"),
            fresh=not url.startswith("~"),
            counts={profile: Counts(*numbers) for profile, numbers in profiles.items()},
        )
        for url, profiles in table.items()
    ]


def entries(*rows: tuple[str, str, int, int]) -> list[Waiting]:
    return [
        Waiting(unique_id=uid, profile=profile, count=count, priority=priority, seq=seq)
        for seq, (uid, profile, count, priority) in enumerate(rows, start=1)
    ]


def planned(result: list[tuple[Waiting, dict[str, int]]]) -> list[tuple[str, dict[str, int]]]:
    return [(entry.unique_id, shares) for entry, shares in result]


CASES = {
    "nothing waiting": (
        {"a": {"p": (3, 3, 3)}},
        [],
        None,
        [],
    ),
    "FIFO: one idle runner goes to the first entry": (
        {"a": {"p": (1, 3, 3)}},
        [("e1", "p", 1, 0), ("e2", "p", 1, 0), ("e3", "p", 1, 0)],
        None,
        [("e1", {"a": 1})],
    ),
    "FIFO: two idle runners go to the first two entries, in order": (
        {"a": {"p": (2, 3, 3)}},
        [("e1", "p", 1, 0), ("e2", "p", 1, 0), ("e3", "p", 1, 0)],
        None,
        [("e1", {"a": 1}), ("e2", {"a": 1})],
    ),
    "no idle runner: nothing planned": (
        {"a": {"p": (0, 3, 3)}},
        [("e1", "p", 1, 0)],
        None,
        [],
    ),
    "priority: a higher priority enqueued last is served first": (
        {"a": {"p": (1, 3, 3)}},
        [("e1", "p", 1, 0), ("e2", "p", 1, 0), ("vip", "p", 1, 5)],
        None,
        [("vip", {"a": 1})],
    ),
    "priority: negative priorities come after the default": (
        {"a": {"p": (2, 3, 3)}},
        [("low", "p", 1, -1), ("e1", "p", 1, 0), ("e2", "p", 1, 0)],
        None,
        [("e1", {"a": 1}), ("e2", {"a": 1})],
    ),
    "head-of-line: an entry for 2 holds back the later entry for 1": (
        {"a": {"p": (1, 3, 3)}},
        [("big", "p", 2, 0), ("small", "p", 1, 0)],
        None,
        [],
    ),
    "head-of-line: held back per profile only, other profiles go on": (
        {"a": {"p": (1, 3, 3), "q": (1, 1, 1)}},
        [("big", "p", 2, 0), ("small", "p", 1, 0), ("other", "q", 1, 0)],
        None,
        [("other", {"a": 1})],
    ),
    "head-of-line: served entries before the blocked one keep their runners": (
        {"a": {"p": (2, 3, 3)}},
        [("e1", "p", 1, 0), ("big", "p", 3, 0), ("e3", "p", 1, 0)],
        None,
        [("e1", {"a": 1})],
    ),
    "split: more than one member has idle, fewest members": (
        {"a": {"p": (1, 3, 3)}, "b": {"p": (2, 3, 3)}, "c": {"p": (1, 3, 3)}},
        [("e1", "p", 3, 0)],
        None,
        [("e1", {"b": 2, "a": 1})],
    ),
    "split: one member that has them all is preferred": (
        {"a": {"p": (2, 3, 3)}, "b": {"p": (3, 3, 3)}},
        [("e1", "p", 3, 0)],
        None,
        [("e1", {"b": 3})],
    ),
    "split: the member with most idle first, ties by url": (
        {"b": {"p": (2, 2, 2)}, "a": {"p": (2, 2, 2)}},
        [("e1", "p", 1, 0), ("e2", "p", 1, 0)],
        None,
        [("e1", {"a": 1}), ("e2", {"b": 1})],
    ),
    "split: all or nothing when the fleet has too few": (
        {"a": {"p": (1, 3, 3)}, "b": {"p": (1, 3, 3)}},
        [("e1", "p", 3, 0)],
        None,
        [],
    ),
    "split: the rest goes on to the next entry": (
        {"a": {"p": (2, 3, 3)}, "b": {"p": (1, 3, 3)}},
        [("e1", "p", 2, 0), ("e2", "p", 1, 0)],
        None,
        [("e1", {"a": 2}), ("e2", {"b": 1})],
    ),
    "stale members are never planned on": (
        {"~a": {"p": (5, 5, 5)}, "b": {"p": (1, 3, 3)}},
        [("e1", "p", 2, 0)],
        None,
        [],
    ),
    "stale member skipped, fresh one used": (
        {"~a": {"p": (5, 5, 5)}, "b": {"p": (1, 3, 3)}},
        [("e1", "p", 1, 0)],
        None,
        [("e1", {"b": 1})],
    ),
    "a member without the profile is not planned on": (
        {"a": {"q": (5, 5, 5)}},
        [("e1", "p", 1, 0)],
        None,
        [],
    ),
    "runners being reserved are not idle": (
        {"a": {"p": (2, 3, 3)}, "b": {"p": (1, 3, 3)}},
        [("e1", "p", 2, 0)],
        {"a": {"p": 2}},
        [],
    ),
    "runners being reserved for another profile do not count": (
        {"a": {"p": (1, 3, 3)}},
        [("e1", "p", 1, 0)],
        {"a": {"q": 1}},
        [("e1", {"a": 1})],
    ),
    "runners reserved beyond idle (stale counts) leave none, never a negative share": (
        {"a": {"p": (1, 3, 3)}, "b": {"p": (1, 3, 3)}},
        [("e1", "p", 1, 0)],
        {"a": {"p": 3}},
        [("e1", {"b": 1})],
    ),
    "an entry for 0 runners is served with no take": (
        {"a": {"p": (0, 3, 3)}},
        [("zero", "p", 0, 0)],
        None,
        [("zero", {})],
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_plan(name):
    table, rows, reserving, expected = CASES[name]
    assert planned(plan(entries(*rows), members(table), reserving)) == expected


def test_plan_never_overtakes_within_a_profile():
    # Whatever is idle, the entries served of one profile are a prefix of its serving order.
    rows = [(f"e{i}", "p", 1 + i % 3, i % 2) for i in range(12)]
    waiting = entries(*rows)
    order = [entry.unique_id for entry in serving_order(waiting)]
    for idle in range(0, 25):
        result = [uid for uid, _ in planned(plan(waiting, members({"a": {"p": (idle, 9, 9)}})))]
        assert result == order[: len(result)], idle


def test_serving_order_is_priority_then_seq():
    waiting = entries(("a", "p", 1, 0), ("b", "p", 1, 2), ("c", "p", 1, 0), ("d", "p", 1, 2))
    assert [entry.unique_id for entry in serving_order(waiting)] == ["b", "d", "a", "c"]


SATISFIABLE = {
    "a fresh member with a target": ({"a": {"p": (0, 0, 1)}}, True),
    "a target of 0 only": ({"a": {"p": (0, 0, 0)}}, False),
    "only a stale member has a target": ({"~a": {"p": (1, 1, 1)}}, False),
    "no member has the profile": ({"a": {"q": (1, 1, 1)}}, False),
    "no members (before the first poll)": ({}, False),
    "one of several": ({"~a": {"p": (1, 1, 1)}, "b": {"p": (0, 0, 2)}}, True),
}


@pytest.mark.parametrize("name", SATISFIABLE)
def test_satisfiable(name):
    table, expected = SATISFIABLE[name]
    assert satisfiable("p", members(table)) is expected
