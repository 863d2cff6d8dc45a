"""Tests for monitor.queue.engine: the engine and its dispatcher over a real store (SQLite and
PostgreSQL) and a hand-written fake fleet of members (tests/support/fake_members.py)."""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from collections.abc import Iterator

import pytest

from monitor.errors import MonitorError
from monitor.errors import TransientError
from monitor.queue.engine import SqlQueueEngine
from monitor.queue.engine import open_engine
from tests.support import postgres
from tests.support.clock import Clock
from tests.support.fake_members import FakeMembers
from tests.support.fake_members import Recording
from tests.support.waiting import wait_until

store_url = postgres.store_url_fixture()
postgres_url = postgres.postgres_url_fixture()

M1, M2, M3 = "http://m1", "http://m2", "http://m3"
REPO = "servo/servo"
MakeEngine = Callable[..., SqlQueueEngine]


@pytest.fixture
def fleet() -> FakeMembers:
    return FakeMembers()


@pytest.fixture
def make_engine(fleet: FakeMembers) -> Iterator[MakeEngine]:
    engines: list[SqlQueueEngine] = []

    def make(url: str, *, start: bool = True, members=None, servers=None, **kwargs):
        kwargs.setdefault("repository_priority", {})
        kwargs.setdefault("poll_interval", 0.05)
        engine = open_engine(url, members or fleet, servers or sorted(fleet.hosts), **kwargs)
        engine.dispatcher.take_backoff = 0.3
        engines.append(engine)
        if start:
            engine.start()
        return engine

    yield make
    for engine in engines:
        engine.stop()
        engine.close()


def ready(engine: SqlQueueEngine, *urls: str) -> None:
    """Wait until the store holds a fresh poll of every member in `urls`."""

    def fresh() -> bool:
        views = {view.url: view for view in engine.snapshot().members}
        return all(url in views and views[url].fresh for url in urls)

    wait_until(fresh, f"fresh polls of {urls}")


def enqueue(engine: SqlQueueEngine, uid: str, count: int = 1, profile: str = "p", **kw) -> str:
    return engine.enqueue(
        unique_id=uid,
        profile=profile,
        count=count,
        qualified_repo=kw.pop("repo", REPO),
        run_id="1",
        **kw,
    )


def served(engine: SqlQueueEngine, uid: str, token: str) -> bool:
    return engine.poll(uid, token).served


def test_tokens_are_url_safe_and_only_hashed(store_url, fleet, make_engine):
    fleet.add(M1, "p", target=1)
    engine = make_engine(store_url)
    ready(engine, M1)
    token = enqueue(engine, "u1")
    assert re.fullmatch(r"[A-Za-z0-9_-]{32}", token)
    record = engine.store.get("u1")
    assert record is not None and token not in record.token_sha256
    assert engine.poll("u1", token).served is False
    assert engine.poll("u1", token).retry_after == 1


def test_enqueue_and_poll_errors(store_url, fleet, make_engine):
    fleet.add(M1, "p", target=1)
    fleet.add(M1, "zero", target=0)
    engine = make_engine(store_url, start=False)
    with pytest.raises(MonitorError) as refused:  # no poll yet: nothing is satisfiable
        enqueue(engine, "u0")
    assert refused.value.status == 422 and "not satisfiable" in refused.value.message
    engine.start()
    ready(engine, M1)
    for profile in ("zero", "unknown"):
        with pytest.raises(MonitorError) as refused:
            enqueue(engine, "u0", profile=profile)
        assert refused.value.status == 422 and f'"{profile}"' in refused.value.message
    token = enqueue(engine, "u1")
    with pytest.raises(MonitorError) as duplicate:
        enqueue(engine, "u1")
    assert duplicate.value.status == 409
    with pytest.raises(MonitorError) as unknown:
        engine.poll("nobody", token)
    assert unknown.value.status == 404
    with pytest.raises(MonitorError) as bad:
        engine.poll("u1", token + "x")
    assert bad.value.status == 403
    assert engine.snapshot().outcomes["refused"] == 4


def test_fifo_twenty_entries_served_in_order(store_url, fleet, make_engine):
    fleet.add(M1, "p", busy=20)
    engine = make_engine(store_url)
    ready(engine, M1)
    tokens = {f"e{i:02}": enqueue(engine, f"e{i:02}") for i in range(20)}
    order = list(tokens)
    answered: list[str] = []
    for i in range(20):
        fleet.free(M1, "p")

        def one_more(expected: int = i + 1) -> bool:
            for uid in order:
                if uid not in answered and served(engine, uid, tokens[uid]):
                    answered.append(uid)
            return len(answered) == expected

        wait_until(one_more, f"entry {i} served")
    taken = [uid for _, uid, _ in fleet.takes]
    inversions = sum(1 for a in range(20) for b in range(a + 1, 20) if taken[a] > taken[b])
    assert inversions == 0 and taken == order and answered == order
    snapshot = engine.snapshot()
    assert snapshot.outcomes["served"] == 20 and snapshot.entries == []
    waits = [e for e in snapshot.recent if e.state == "served" and e.served_at is not None]
    assert len(waits) == 20 and all(e.served_at >= e.enqueued_at for e in waits)


def test_priority_enqueued_last_is_served_first(store_url, fleet, make_engine):
    fleet.add(M1, "p", busy=3)
    engine = make_engine(store_url, repository_priority={"servo/vip": 5})
    ready(engine, M1)
    tokens = {uid: enqueue(engine, uid) for uid in ("a", "b")}
    tokens["vip"] = enqueue(engine, "vip", repo="servo/vip")
    tokens["low"] = enqueue(engine, "low", priority=-1)
    assert [e.unique_id for e in engine.snapshot().entries] == ["vip", "a", "b", "low"]
    fleet.free(M1, "p")
    wait_until(lambda: served(engine, "vip", tokens["vip"]), "vip served")
    assert not served(engine, "a", tokens["a"])
    assert [uid for _, uid, _ in fleet.takes] == ["vip"]


def test_head_of_line_holds_back_later_entries(store_url, fleet, make_engine):
    fleet.add(M1, "p", busy=3)
    engine = make_engine(store_url)
    ready(engine, M1)
    big, small = enqueue(engine, "big", 2), enqueue(engine, "small", 1)
    fleet.free(M1, "p")
    ready(engine, M1)
    wait_until(lambda: engine.snapshot().members[0].counts["p"].idle == 1, "the idle runner seen")
    assert not served(engine, "small", small) and fleet.takes == []
    fleet.free(M1, "p", 2)
    wait_until(lambda: served(engine, "small", small), "small served after big")
    assert served(engine, "big", big)
    assert [uid for _, uid, _ in fleet.takes] == ["big", "small"]


def test_split_all_or_nothing_with_release_on_partial_failure(store_url, fleet, make_engine):
    fleet.add(M1, "p", idle=1)
    fleet.add(M2, "p", idle=1)
    fleet.failing_takes.add(M2)
    engine = make_engine(store_url)
    ready(engine, M1, M2)
    token = enqueue(engine, "u", 2)
    wait_until(lambda: (M1, "u") in fleet.releases, "the part M1 reserved released")
    wait_until(lambda: fleet.reserved_for("u") == {}, "nothing left reserved")
    wait_until(lambda: engine.store.get("u").entry.state == "waiting", "the entry waiting again")
    assert not served(engine, "u", token)
    assert engine.snapshot().outcomes["failed"] >= 1
    fleet.failing_takes.clear()
    wait_until(lambda: served(engine, "u", token), "served once M2 takes again")
    assert engine.poll("u", token).count == 2
    reserved = fleet.reserved_for("u")
    assert sorted(reserved) == [M1, M2] and all(len(ids) == 1 for ids in reserved.values())
    assert engine.store.get("u").entry.reserved == reserved
    assert engine.store.get("u").entry.seq == 1  # it kept its place


def test_stale_member_is_skipped_without_stalling_the_others(store_url, fleet, make_engine):
    fleet.add(M1, "p", idle=2)
    fleet.add(M2, "p", idle=1)
    engine = make_engine(store_url)
    ready(engine, M1, M2)
    fleet.down.add(M1)
    fleet.slow[M3] = 5.0  # never answers within the cycle's wait
    wait_until(lambda: not engine.snapshot().members[0].fresh, "M1 marked stale")
    view = engine.snapshot().members[0]
    assert view.counts["p"].idle == 2 and "connection refused" in (view.error or "")
    token = enqueue(engine, "u", 1)
    wait_until(lambda: served(engine, "u", token), "served from M2")
    assert fleet.reserved_for("u").keys() == {M2}
    other = enqueue(engine, "v", 2)
    assert not served(engine, "v", other)
    fleet.down.clear()
    wait_until(lambda: served(engine, "v", other), "served once M1 answers again")


def test_slow_member_does_not_stall_the_others(store_url, fleet, make_engine):
    fleet.add(M1, "p", idle=1)
    fleet.add(M2, "p", idle=1)
    fleet.slow[M1] = 4.0
    engine = make_engine(store_url)
    ready(engine, M2)
    token = enqueue(engine, "u", 1)
    wait_until(lambda: served(engine, "u", token), "served from M2 while M1 is slow", timeout=10)
    assert fleet.reserved_for("u").keys() == {M2}
    assert not {v.url: v for v in engine.snapshot().members}[M1].fresh


def test_expiry_releases_what_was_reserved(store_url, fleet, make_engine):
    clock = Clock()
    fleet.add(M1, "p", idle=1, busy=1)
    engine = make_engine(store_url, clock=clock)
    ready(engine, M1)
    served_token = enqueue(engine, "served")  # reserved, but its client never hears of it
    waiting_token = enqueue(engine, "waiting")
    wait_until(lambda: fleet.reserved_for("served"), "the first entry's runner reserved")
    wait_until(lambda: engine.store.get("served").entry.state == "served", "served")
    clock.advance(31)
    wait_until(lambda: (M1, "served") in fleet.releases, "the served entry's runner released")
    assert fleet.reserved_for("served") == {}
    for uid, token in (("served", served_token), ("waiting", waiting_token)):
        with pytest.raises(MonitorError) as gone:
            engine.poll(uid, token)
        assert gone.value.status == 410 and "expired" in gone.value.message
    assert engine.snapshot().outcomes["expired"] == 2
    assert {e.unique_id: e.state for e in engine.snapshot().recent} == {
        "served": "expired",
        "waiting": "expired",
    }


def test_polls_keep_an_entry_alive(store_url, fleet, make_engine):
    clock = Clock()
    fleet.add(M1, "p", busy=1)
    engine = make_engine(store_url, clock=clock)
    ready(engine, M1)
    token = enqueue(engine, "u")
    for _ in range(4):
        clock.advance(10)
        assert not served(engine, "u", token)
    fleet.free(M1, "p")
    wait_until(lambda: served(engine, "u", token), "served after 40 s of polling")


def test_exactly_once_on_repeated_polls(store_url, fleet, make_engine):
    fleet.add(M1, "p", idle=1)
    fleet.add(M2, "p", idle=2)
    engine = make_engine(store_url)
    ready(engine, M1, M2)
    token = enqueue(engine, "u", 3)
    wait_until(lambda: served(engine, "u", token), "served")
    answers = [engine.poll("u", token) for _ in range(10)]
    assert all(a.served and a.count == 3 for a in answers)
    assert sorted(url for url, uid, _ in fleet.takes if uid == "u") == [M1, M2]
    assert len(fleet.all_reserved()) == 3


def test_cancel_releases(store_url, fleet, make_engine):
    fleet.add(M1, "p", idle=1)
    engine = make_engine(store_url)
    ready(engine, M1)
    token = enqueue(engine, "u")
    wait_until(lambda: served(engine, "u", token), "served")
    engine.cancel("u")
    wait_until(lambda: (M1, "u") in fleet.releases, "released")
    with pytest.raises(MonitorError) as gone:
        engine.poll("u", token)
    assert gone.value.status == 410
    with pytest.raises(MonitorError) as unknown:
        engine.cancel("nobody")
    assert unknown.value.status == 404


def test_restart_keeps_entries_and_tokens(store_url, fleet, make_engine):
    fleet.add(M1, "p", busy=3)
    first = make_engine(store_url)
    ready(first, M1)
    tokens = {uid: enqueue(first, uid) for uid in ("a", "b", "c")}
    first.stop()
    first.close()
    second = make_engine(store_url)
    for uid, token in tokens.items():
        assert engine_poll_waits(second, uid, token)
    with pytest.raises(MonitorError) as bad:
        second.poll("a", tokens["b"])
    assert bad.value.status == 403
    fleet.free(M1, "p", 3)
    for uid, token in tokens.items():
        wait_until(lambda uid=uid, token=token: served(second, uid, token), f"{uid} served")
    assert [uid for _, uid, _ in fleet.takes] == ["a", "b", "c"]


def engine_poll_waits(engine: SqlQueueEngine, uid: str, token: str) -> bool:
    answer = engine.poll(uid, token)
    return not answer.served and answer.retry_after == 1


def test_a_new_dispatcher_finishes_takes_left_in_flight(store_url, fleet, make_engine):
    # A dispatcher that died between claiming an entry and recording its takes: the next one
    # forwards the same plan with the same unique_id and gets the same runners.
    fleet.add(M1, "p", idle=2)
    first = make_engine(store_url)
    ready(first, M1)
    first.stop()
    token = enqueue(first, "u", 2)
    record = first.store.get("u")
    assert record is not None
    first.store.claim([(record.waiting, {M1: 2})])
    fleet.take(M1, "p", 2, "u", REPO, "1")  # the dead dispatcher's take went through
    second = make_engine(store_url)
    wait_until(lambda: served(second, "u", token), "served by the next dispatcher")
    assert len(fleet.takes) == 1 and len(fleet.all_reserved()) == 2


def test_counts_lagging_takes_are_no_failure(store_url, fleet, make_engine):
    """A member whose counts say a runner is idle that its take cannot get (its counts are
    of its last look, seconds old): the entry waits in its place instead of failing after
    MAX_FAILURES takes within a second, and the member is not asked again at once."""
    fleet.add(M1, "p", busy=1)
    fleet.lagging[(M1, "p")] = 1
    engine = make_engine(store_url)
    ready(engine, M1)
    token = enqueue(engine, "u")
    wait_until(lambda: len(fleet.take_calls) >= 1, "a take on the lagging counts")
    # Far longer than MAX_FAILURES dispatcher cycles (50 ms each): it still waits, and the
    # member was asked about once per backoff (0.3 s), not every cycle.
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        assert not served(engine, "u", token)
        time.sleep(0.05)
    assert len(fleet.take_calls) <= 7, fleet.take_calls
    record = engine.store.get("u")
    assert record is not None and record.entry.state in ("waiting", "reserving")
    assert record.failures == 0
    fleet.lagging.clear()
    fleet.free(M1, "p")
    wait_until(lambda: served(engine, "u", token), "served once a runner is idle")
    assert fleet.reserved_for("u") == {M1: [1]}
    assert engine.snapshot().outcomes["failed"] == 0


def served_first(engine: SqlQueueEngine, tokens: dict[str, str]) -> list[str]:
    """The entries of `tokens` served so far (waits for at least one)."""
    return wait_until(
        lambda: [uid for uid, token in tokens.items() if served(engine, uid, token)],
        f"one of {sorted(tokens)} served",
    )


def test_a_take_not_yet_in_a_members_counts_is_not_planned_on(store_url, fleet, make_engine):
    """A member answers a take before it renders again: for a moment its counts still show
    the runners it gave away. Planned on, that phantom runner would send the next entry to
    a take that comes back short while a later entry takes the real runner elsewhere."""
    fleet.add(M1, "p", idle=1)
    fleet.add(M2, "p", busy=1)
    fleet.rendering_late.add(M1)
    engine = make_engine(store_url)
    engine.dispatcher.take_backoff = 0.0  # a short take is no reason to skip M1 either
    ready(engine, M1, M2)
    first = enqueue(engine, "e1")
    wait_until(lambda: served(engine, "e1", first), "e1 served from M1")
    tokens = {uid: enqueue(engine, uid) for uid in ("e2", "e3")}
    time.sleep(0.3)  # cycles that see M1's render from before the take
    fleet.free(M2, "p")
    assert served_first(engine, tokens) == ["e2"]
    fleet.render(M1)
    time.sleep(0.3)
    assert not served(engine, "e3", tokens["e3"])
    fleet.free(M1, "p")
    wait_until(lambda: served(engine, "e3", tokens["e3"]), "e3 served")
    assert [(url, uid) for url, uid, _ in fleet.takes] == [(M1, "e1"), (M2, "e2"), (M1, "e3")]
    assert len(fleet.take_calls) == 3, fleet.take_calls


def test_a_restarted_dispatcher_knows_the_takes_a_member_has_not_shown(
    store_url, fleet, make_engine
):
    """What one dispatcher reserved just before it died is not idle to the next one while
    the member's counts are from before: the same order as without the restart."""
    fleet.add(M1, "p", idle=1)
    fleet.add(M2, "p", busy=1)
    fleet.rendering_late.add(M1)
    first = make_engine(store_url)
    ready(first, M1, M2)
    token = enqueue(first, "e1")
    wait_until(lambda: served(first, "e1", token), "e1 served from M1")
    tokens = {uid: enqueue(first, uid) for uid in ("e2", "e3")}
    first.stop()
    fleet.free(M2, "p")
    second = make_engine(store_url)
    second.dispatcher.take_backoff = 0.0
    assert served_first(second, tokens) == ["e2"]
    assert [(url, uid) for url, uid, _ in fleet.takes] == [(M1, "e1"), (M2, "e2")]


def test_released_runners_count_as_idle_again(store_url, fleet, make_engine):
    fleet.add(M1, "p", idle=1)
    fleet.rendering_late.add(M1)
    engine = make_engine(store_url)
    ready(engine, M1)
    token = enqueue(engine, "e1")
    wait_until(lambda: served(engine, "e1", token), "e1 served")
    engine.cancel("e1")  # its runner is released: idle again, whatever M1 rendered
    second = enqueue(engine, "e2")
    wait_until(lambda: served(engine, "e2", second), "e2 served from the released runner")
    assert [(url, uid) for url, uid, _ in fleet.takes] == [(M1, "e1"), (M1, "e2")]


def test_a_member_listing_no_runners_is_taken_at_its_word(store_url, fleet, make_engine):
    """Without a runners list there is no telling which render a poll shows: a poll begun
    after the take counts (a short take then only makes the entry wait again)."""
    fleet.add(M1, "p", idle=1)
    fleet.rendering_late.add(M1)
    fleet.unlisted.add(M1)
    engine = make_engine(store_url)
    engine.dispatcher.take_backoff = 0.0
    ready(engine, M1)
    token = enqueue(engine, "e1")
    wait_until(lambda: served(engine, "e1", token), "e1 served")
    second = enqueue(engine, "e2")
    wait_until(lambda: len(fleet.take_calls) >= 3, "takes of M1's runner it no longer has")
    assert not served(engine, "e2", second)
    record = engine.store.get("e2")
    assert record is not None and record.failures == 0


def test_store_unreachable_answers_503_and_recovers(postgres_url, fleet, make_engine):
    proxy = postgres.Proxy(postgres_url)
    fleet.add(M1, "p", busy=1)
    engine = make_engine(proxy.url)
    ready(engine, M1)
    token = enqueue(engine, "u")
    proxy.cut()
    with pytest.raises(TransientError) as down:
        engine.poll("u", token)
    assert down.value.status == 503 and "unreachable" in down.value.message
    with pytest.raises(TransientError):
        enqueue(engine, "v")
    proxy.restore()
    assert engine_poll_waits(engine, "u", token)
    fleet.free(M1, "p")
    wait_until(lambda: served(engine, "u", token), "served after the store came back")
    proxy.cut()


def test_two_engines_on_one_database(postgres_url, fleet, make_engine):
    fleet.add(M1, "p", busy=30)
    fleet.add(M2, "p", busy=30)
    views = {"a": Recording(fleet), "b": Recording(fleet)}
    engines = {
        name: make_engine(postgres_url, members=views[name], servers=[M1, M2], lease_seconds=1.0)
        for name in views
    }
    wait_until(lambda: sum(e.leading for e in engines.values()) == 1, "one leader")
    leader = next(name for name, e in engines.items() if e.leading)
    follower = "b" if leader == "a" else "a"
    ready(engines[follower], M1, M2)
    views[follower].calls.clear()
    rng = random.Random(14)
    tokens: dict[str, str] = {}
    for i in range(20):
        uid = f"u{i:02}"
        tokens[uid] = enqueue(engines[rng.choice("ab")], uid, rng.choice([1, 2]))
    answered: dict[str, int] = {}

    def poll_all() -> bool:
        for uid, token in tokens.items():
            if uid not in answered:
                answer = engines[rng.choice("ab")].poll(uid, token)
                if answer.served:
                    answered[uid] = answer.count
        return len(answered) == len(tokens)

    for url in (M1, M2):
        fleet.free(url, "p", 8)
    wait_until(lambda: len(answered) >= 8 or poll_all(), "the first half served")
    assert views[follower].calls == [] and engines[leader].leading
    # The leader dies without a word: the other takes over once its lease runs out.
    engines[leader].stop(release_lease=False)
    for url in (M1, M2):
        fleet.free(url, "p", 15)
    wait_until(poll_all, "every entry served", timeout=60)
    assert engines[follower].leading and "take" in views[follower].calls
    for uid, count in answered.items():
        assert sum(len(ids) for ids in fleet.reserved_for(uid).values()) == count, uid
    reserved = fleet.all_reserved()
    assert len(reserved) == len(set(reserved)) == sum(answered.values())
    per_uid = [uid for _, uid, _ in fleet.takes]
    assert all(per_uid.count(uid) == len(fleet.reserved_for(uid)) for uid in tokens), (
        "a unique_id reserved twice on one member"
    )


def test_a_failed_release_is_tried_again(store_url, fleet, make_engine):
    clock = Clock()
    fleet.add(M1, "p", idle=1)
    engine = make_engine(store_url, clock=clock)
    ready(engine, M1)
    enqueue(engine, "u")  # served, but its client never hears of it: expires, is released
    wait_until(lambda: engine.store.get("u").entry.state == "served", "served")
    fleet.down.add(M1)
    clock.advance(31)
    wait_until(lambda: (M1, "u") in engine.dispatcher.failed_releases, "a failed release")
    assert fleet.reserved_for("u")
    fleet.down.discard(M1)
    clock.advance(3)  # past the first retry's 2 s
    wait_until(lambda: not fleet.reserved_for("u"), "the runner released on a retry")
    assert (M1, "u") in fleet.releases and not engine.dispatcher.failed_releases


def test_entries_outlive_an_outage_of_the_store_longer_than_the_expiry(
    postgres_url, fleet, make_engine
):
    # While the store is unreachable a client's polls cannot be recorded: when it is back,
    # the entry's old last poll must not expire it.
    clock = Clock()
    proxy = postgres.Proxy(postgres_url)
    fleet.add(M1, "p", busy=1)
    engine = make_engine(proxy.url, clock=clock)
    ready(engine, M1)
    token = enqueue(engine, "u")
    proxy.cut()
    wait_until(lambda: not engine.dispatcher.leading, "the dispatcher paused")
    clock.advance(40)
    with pytest.raises(TransientError):
        engine.poll("u", token)
    proxy.restore()
    wait_until(lambda: engine.dispatcher.leading, "the dispatcher leading again")
    time.sleep(0.5)  # cycles (every 0.05 s) that would expire it
    assert engine_poll_waits(engine, "u", token)
    fleet.free(M1, "p")
    wait_until(lambda: served(engine, "u", token), "served after the outage")
    proxy.cut()
