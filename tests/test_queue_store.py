"""Tests for monitor.queue.store on SQLite and on PostgreSQL (Debian's server, tests/postgres.sh):
entries and their state transitions, members, the dispatcher's lease, and a database that
goes away and comes back."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from monitor.errors import ConfigError
from monitor.errors import MonitorError
from monitor.errors import TransientError
from monitor.queue.contracts import Counts
from monitor.queue.contracts import MemberView
from monitor.queue.store import POOL_CONNECTIONS
from monitor.queue.store import QueueStore
from monitor.queue.store import redact
from tests.support import postgres
from tests.support.clock import Clock

store_url = postgres.store_url_fixture()
postgres_url = postgres.postgres_url_fixture()


@pytest.fixture
def store(store_url):
    store = QueueStore(store_url)
    yield store
    store.close()


def add(store: QueueStore, uid: str, now, *, profile="p", count=1, priority=0):
    return store.add(
        unique_id=uid,
        token_sha256=f"sha-{uid}",
        profile=profile,
        count=count,
        qualified_repo="servo/servo",
        run_id="7",
        priority=priority,
        now=now,
    )


def test_entries_keep_order_and_refuse_duplicates(store):
    clock = Clock()
    seqs = [add(store, f"u{i}", clock()).entry.seq for i in range(5)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 5
    add(store, "vip", clock(), priority=3)
    assert [r.entry.unique_id for r in store.active()] == ["vip", "u0", "u1", "u2", "u3", "u4"]
    with pytest.raises(MonitorError) as duplicate:
        add(store, "u1", clock())
    assert duplicate.value.status == 409
    record = store.get("u1")
    assert record is not None and record.token_sha256 == "sha-u1"
    assert record.entry.state == "waiting" and record.entry.enqueued_at == clock()
    assert store.get("nobody") is None


def test_get_and_touch_read_and_write_what_the_rows_hold(store):
    """`get`, `touch` and `active` run SQL made once (every client poll runs the first two, the
    dispatcher the third twice a second): they must agree with Peewee's own reading of the
    rows in every state, timestamps and JSON included."""
    clock = Clock()
    waiting, reserving, served = (add(store, uid, clock(), count=2) for uid in "wrs")
    store.claim([(reserving.waiting, {"m1": 2}), (served.waiting, {"m1": 1, "m2": 1})])
    clock.advance(1.5)
    assert store.serve("s", 1, {"m1": [4], "m2": [9]}, clock()) is None
    assert store.answer("s", clock())
    clock.advance(0.25)
    store.touch("w", clock())
    for uid in "wrs":
        by_peewee = store._record(store.E.get(store.E.unique_id == uid))
        assert store.get(uid) == by_peewee
    E = store.E
    rows = (
        E.select().where(E.state.in_(["waiting", "reserving"])).order_by(E.priority.desc(), E.seq)
    )
    assert store.active() == [store._record(row) for row in rows]
    assert [record.entry.unique_id for record in store.active()] == ["w", "r"]
    record = store.get("w")
    assert record is not None and record.entry.last_poll_at == clock()
    assert record.entry.state == "waiting" and record.plan == {} and record.answered_at is None
    assert store.get("r").plan == {"m1": 2}
    served_record = store.get("s")
    assert served_record.entry.reserved == {"m1": [4], "m2": [9]}
    assert (
        served_record.entry.served_at
        == served_record.answered_at
        == clock() - timedelta(seconds=0.25)
    )
    assert waiting.entry.last_poll_at != record.entry.last_poll_at
    store.touch("nobody", clock())  # no such row: nothing happens
    assert store.get("nobody") is None


def test_claim_serve_and_attempts(store):
    clock = Clock()
    first, second = add(store, "a", clock(), count=2), add(store, "b", clock())
    claimed = store.claim([(first.waiting, {"m1": 1, "m2": 1}), (second.waiting, {"m1": 1})])
    assert [(c.unique_id, c.attempt, c.plan) for c in claimed] == [
        ("a", 1, {"m1": 1, "m2": 1}),
        ("b", 1, {"m1": 1}),
    ]
    assert store.claim([(first.waiting, {"m1": 2})]) == []  # no longer waiting
    assert [c.unique_id for c in store.reserving()] == ["a", "b"]
    assert store.serve("a", 2, {"m1": [1]}, clock()) == "reserving"  # not this attempt
    assert store.serve("a", 1, {"m1": [1], "m2": [2]}, clock()) is None
    assert store.serve("a", 1, {"m1": [1], "m2": [2]}, clock()) == "served"
    assert store.get("a").entry.reserved == {"m1": [1], "m2": [2]}
    assert store.put_back("b", 1, "m1: timed out", give_up=False, now=clock())
    again = store.get("b")
    assert again.entry.state == "waiting" and again.failures == 1 and again.entry.seq == 2
    assert store.claim([(again.waiting, {"m1": 1})])[0].attempt == 2
    assert not store.put_back("b", 1, "late", give_up=False, now=clock())  # an old attempt
    assert store.put_back("b", 2, "again", give_up=True, now=clock())
    assert store.get("b").entry.state == "failed"


def test_claim_holds_back_the_rest_of_a_profile(store):
    clock = Clock()
    a, b, c = (add(store, uid, clock()) for uid in ("a", "b", "c"))
    other = add(store, "o", clock(), profile="q")
    store.cancel("a", clock())  # e.g. cancelled between the plan and the claim
    plan = [(a.waiting, {"m": 1}), (b.waiting, {"m": 1}), (other.waiting, {"m": 1})]
    assert [claim.unique_id for claim in store.claim(plan)] == ["o"]
    assert store.get("b").entry.state == "waiting" and store.get("c").entry.state == "waiting"


def test_expiry(store):
    clock = Clock()
    add(store, "waiting", clock())
    for uid in ("served", "answered"):
        record = add(store, uid, clock())
        store.claim([(record.waiting, {"m": 1})])
        store.serve(uid, 1, {"m": [1]}, clock())
    assert store.answer("answered", clock())
    assert not store.answer("waiting", clock())
    clock.advance(20)
    store.touch("waiting", clock())
    clock.advance(15)
    assert [r.entry.unique_id for r in store.expire(clock(), 30)] == ["served"]
    clock.advance(20)
    expired = store.expire(clock(), 30)
    assert [r.entry.unique_id for r in expired] == ["waiting"]
    assert store.get("answered").entry.state == "served"  # its client was told: it stays
    assert store.get("served").entry.reserved == {"m": [1]}  # what the engine releases
    assert not store.answer("served", clock())


def test_cancel_and_recent_and_prune(store):
    clock = Clock()
    add(store, "a", clock())
    clock.advance(1)
    add(store, "b", clock())
    assert store.cancel("a", clock()).entry.state == "waiting"  # as it was
    assert store.get("a").entry.state == "cancelled"
    assert store.cancel("nobody", clock()) is None
    clock.advance(1)
    store.cancel("b", clock())
    assert [e.unique_id for e in store.recent()] == ["b", "a"]
    assert store.prune(clock() - timedelta(seconds=0.5)) == 1
    assert [e.unique_id for e in store.recent()] == ["b"]


def test_members_and_freshness(store):
    clock = Clock()
    counts = {"p": Counts(1, 2, 3)}
    store.save_members(
        [
            MemberView("http://m1", True, counts, clock()),
            MemberView("http://m2", False, {}, None, "down"),
        ]
    )
    views = {view.url: view for view in store.members(clock(), 10)}
    assert views["http://m1"].fresh and views["http://m1"].counts == counts
    assert not views["http://m2"].fresh and views["http://m2"].error == "down"
    clock.advance(11)  # nobody polled since: no longer fresh, counts kept
    stale = store.members(clock(), 10)[0]
    assert not stale.fresh and stale.counts == counts
    store.save_members([MemberView("http://m1", True, {"p": Counts(0, 2, 3)}, clock())])
    assert store.members(clock(), 10)[0].counts["p"].idle == 0


def test_lease_is_held_by_one_until_it_expires_or_is_released(store):
    clock = Clock()
    assert store.acquire_lease("a", clock(), 5)
    assert not store.acquire_lease("b", clock(), 5)
    clock.advance(4)
    assert store.acquire_lease("a", clock(), 5)  # renewed
    clock.advance(4)
    assert not store.acquire_lease("b", clock(), 5)
    clock.advance(2)
    assert store.acquire_lease("b", clock(), 5) and store.lease_holder(clock()) == "b"
    assert not store.acquire_lease("a", clock(), 5)
    store.release_lease("b")
    assert store.lease_holder(clock()) is None and store.acquire_lease("a", clock(), 5)


def test_one_lease_among_racing_stores(store_url):
    # Several queue processes starting together: schema creation and the first lease race.
    clock = Clock()
    stores = [QueueStore(store_url) for _ in range(4)]
    results: list[bool] = []

    def contend(store: QueueStore) -> None:
        results.append(store.acquire_lease(f"h{id(store)}", clock(), 5))

    threads = [threading.Thread(target=contend, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False, False, False, True]
    for store in stores:
        store.close()


def test_a_restart_keeps_everything(store_url):
    clock = Clock()
    first = QueueStore(store_url)
    add(first, "a", clock())
    first.close()
    second = QueueStore(store_url)
    assert second.get("a").token_sha256 == "sha-a"
    assert add(second, "b", clock()).entry.seq > second.get("a").entry.seq
    second.close()


def test_default_sqlite_under_data_path(tmp_path: Path):
    store = QueueStore("", data_path=tmp_path / "data")
    assert (tmp_path / "data" / "queue.sqlite3").stat().st_mode & 0o777 == 0o600
    store.close()
    # Three slashes: relative, to data_path; four: absolute.
    QueueStore("sqlite:///q/relative.sqlite3", data_path=tmp_path / "data").close()
    assert (tmp_path / "data" / "q" / "relative.sqlite3").exists()
    QueueStore(f"sqlite:///{tmp_path}/absolute.sqlite3", data_path=tmp_path / "data").close()
    assert (tmp_path / "absolute.sqlite3").exists()


@pytest.mark.parametrize(
    "url", ["mysql://x/y", "sqlite://", "postgresql://u:secret@h:5/", "queue.sqlite3"]
)
def test_bad_urls_are_config_errors(url):
    with pytest.raises(ConfigError) as error:
        QueueStore(url)
    assert "secret" not in error.value.message


def test_redact():
    assert redact("postgresql://u:pw@h:5/db") == "postgresql://u:***@h:5/db"
    assert redact("sqlite:///x") == "sqlite:///x"


def test_a_closed_port_then_a_live_one(postgres_url):
    # Nothing listens: 503 at once, not a hang; the same store works once a server does.
    proxy = postgres.Proxy(postgres_url)
    url = proxy.url
    proxy.cut()
    with pytest.raises(TransientError) as down:
        QueueStore(url)
    assert down.value.status == 503 and "secret" not in down.value.message
    proxy.restore()
    store = QueueStore(url)
    proxy.cut()
    with pytest.raises(TransientError):
        store.get("a")
    with pytest.raises(TransientError):  # still down: the reconnection fails too
        store.get("a")
    proxy.restore()
    assert store.get("a") is None  # reconnected by itself
    store.close()
    proxy.cut()


def test_a_pooled_connection_is_lent_without_a_round_trip(postgres_url):
    """Peewee's pool sends `SELECT 1` on each connection it lends, holding its lock: every
    client poll queued behind one round trip at a time. Ours lends on the connection's local
    state, so one that broke while idle is found on use: that call is a 503 (the client
    retries it), the connection is dropped, and the next call connects anew."""
    proxy = postgres.Proxy(postgres_url)
    store = QueueStore(proxy.url)
    assert store.get("a") is None  # one connection, back in the pool
    proxy.cut()  # it breaks while idle; the server is reachable again at once
    proxy.restore()
    with pytest.raises(TransientError) as broken:
        store.get("a")  # Peewee's check would have seen it broken and connected anew
    assert broken.value.status == 503
    assert store.get("a") is None  # a new connection
    add(store, "b", Clock()())
    assert store.get("b") is not None
    store.close()
    proxy.cut()


def test_postgresql_connections_are_pooled(postgres_url):
    """Dozens of web threads share POOL_CONNECTIONS connections (PostgreSQL has 100 for every
    queue process), and none is held between calls (waitress' threads live on)."""
    import psycopg2

    store = QueueStore(postgres_url)
    database = urlsplit(postgres_url).path.lstrip("/")
    add(store, "u", Clock()())
    threads_n = 40
    start, done, leave = (threading.Barrier(threads_n + 1) for _ in range(3))
    errors: list[BaseException] = []

    def poll() -> None:
        try:
            start.wait()
            for _ in range(20):
                assert store.get("u") is not None
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
        done.wait()
        leave.wait()  # alive, as a web thread between requests

    threads = [threading.Thread(target=poll) for _ in range(threads_n)]
    for thread in threads:
        thread.start()
    start.wait()
    done.wait()
    try:
        connection = psycopg2.connect(postgres.admin_url(), connect_timeout=3)
        try:
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (database,)
                )
                (open_connections,) = cursor.fetchone()
        finally:
            connection.close()
    finally:
        leave.wait()
        for thread in threads:
            thread.join()
    assert errors == []
    assert 1 <= open_connections <= POOL_CONNECTIONS
    store.close()
