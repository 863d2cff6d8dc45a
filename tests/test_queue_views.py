"""The queue's views (monitor/queue/views.py, pages.py): upstream's dashboard.txt, the JSON,
the Prometheus text and the page, from hand-built snapshots; the routes over real HTTP
(waitress) with a fake engine."""

from __future__ import annotations

import json
import threading
from datetime import timedelta

import pytest
from prometheus_client.parser import text_string_to_metric_families

from monitor.errors import MonitorError
from monitor.queue import views
from monitor.queue.views import WaitTally
from monitor.serving import BackgroundServer
from tests.support.queue_views import MEMBER_A
from tests.support.queue_views import MEMBER_B
from tests.support.queue_views import T0
from tests.support.queue_views import FakeEngine
from tests.support.queue_views import entry
from tests.support.queue_views import member
from tests.support.queue_views import snapshot
from tests.support.queue_views import view_app
from tests.support.served import request

LINUX = "servo-ubuntu2204"
WINDOWS = "servo-windows10"


def busy_snapshot(at: float = 10.0):
    """Two waiting entries (one reserving, split over both members), a stale member, and a
    served, an expired and a failed entry in `recent`."""
    return snapshot(
        entries=[
            entry(
                "aaaa",
                seq=1,
                count=2,
                run_id="11",
                enqueued=1.0,
                polled=9.5,
                state="reserving",
                reserved={MEMBER_B: [7], MEMBER_A: []},
            ),
            entry(
                "bbbb",
                seq=2,
                profile=WINDOWS,
                repo="servo/webrender",
                run_id="22",
                enqueued=2.5,
                polled=8.75,
            ),
        ],  # fmt: skip
        members=[
            member(MEMBER_B, **{LINUX: (1, 3, 3)}),
            member(
                MEMBER_A,
                fresh=False,
                polled=-20.0,
                error="timed out",
                **{WINDOWS: (0, 1, 2), LINUX: (0, 2, 2)},
            ),
        ],  # fmt: skip
        recent=[
            entry(
                "cccc",
                seq=0,
                run_id="9",
                enqueued=-10.0,
                served=-8.8,
                state="served",
                reserved={MEMBER_A: [3]},
            ),
            entry("dddd", seq=-1, enqueued=-60.0, state="expired"),
            entry("eeee", seq=-2, enqueued=-70.0, state="failed"),
        ],  # fmt: skip
        outcomes={"served": 5, "expired": 1, "failed": 1},
        at=at,
    )


# dashboard.txt -------------------------------------------------------------------------------


def test_dashboard_text_is_upstreams_format():
    assert views.dashboard_text(busy_snapshot()) == (
        ">>> queue\n"
        "- aaaa (last request 500ms ago)\n"
        '  QueueEntry { unique_id: UniqueId("aaaa"), qualified_repo: "servo/servo", '
        'run_id: "11", profile_key: "servo-ubuntu2204", runner_count: 2 }\n'
        "- bbbb (last request 1.25s ago)\n"
        '  QueueEntry { unique_id: UniqueId("bbbb"), qualified_repo: "servo/webrender", '
        'run_id: "22", profile_key: "servo-windows10", runner_count: 1 }\n'
        "\n"
        ">>> servers\n"
        "- http://ci1.example:8000 (stale!)\n"
        "    - servo-ubuntu2204\n"
        "      0 idle, 2 healthy, 2 target\n"
        "    - servo-windows10\n"
        "      0 idle, 1 healthy, 2 target\n"
        "- http://ci2.example:8000\n"
        "    - servo-ubuntu2204\n"
        "      1 idle, 3 healthy, 3 target\n"
    )


def test_dashboard_text_of_an_empty_queue():
    assert views.dashboard_text(snapshot()) == ">>> queue\n\n>>> servers\n"


def test_dashboard_text_counts_from_enqueue_before_the_first_poll():
    text = views.dashboard_text(snapshot([entry("x", seq=1, enqueued=4.0)], at=10.0))
    assert "- x (last request 6s ago)\n" in text


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (timedelta(seconds=1, microseconds=234567), "1.234567s"),
        (timedelta(seconds=1.5), "1.5s"),
        (timedelta(seconds=2), "2s"),
        (timedelta(seconds=61), "61s"),
        (timedelta(milliseconds=12.5), "12.5ms"),
        (timedelta(microseconds=7), "7µs"),
        (timedelta(microseconds=1001), "1.001ms"),
        (timedelta(0), "0ns"),
        (timedelta(seconds=-3), "0ns"),
    ],
)
def test_rust_duration_debug_format(value, shown):
    assert views.rust_duration(value) == shown


def test_rust_str_escapes_as_rusts_debug():
    assert views.rust_str("a\"b\\c\nd\te\x01f\u200bé'") == (
        '"a\\"b\\\\c\\nd\\te\\u{1}f\\u{200b}é\'"'
    )


# JSON ----------------------------------------------------------------------------------------


def test_snapshot_json():
    data = views.snapshot_json(busy_snapshot())

    assert json.loads(json.dumps(data)) == data  # plain JSON
    assert data["taken_at"] == "2025-03-01T12:00:10+00:00"
    assert [e["unique_id"] for e in data["entries"]] == ["aaaa", "bbbb"]
    first = data["entries"][0]
    assert first == {
        "position": 1,
        "unique_id": "aaaa",
        "profile": LINUX,
        "count": 2,
        "qualified_repo": "servo/servo",
        "run_id": "11",
        "run_url": "https://github.com/servo/servo/actions/runs/11",
        "priority": 0,
        "seq": 1,
        "state": "reserving",
        "enqueued_at": "2025-03-01T12:00:01+00:00",
        "last_poll_at": "2025-03-01T12:00:09.500000+00:00",
        "served_at": None,
        "reserved": {MEMBER_A: [], MEMBER_B: [7]},
        "waiting_seconds": 9.0,
    }
    assert data["entries"][1]["position"] == 2
    assert [m["url"] for m in data["members"]] == [MEMBER_B, MEMBER_A]  # as the engine gave
    stale = data["members"][1]
    assert stale["fresh"] is False and stale["error"] == "timed out"
    assert stale["counts"][WINDOWS] == {"idle": 0, "healthy": 1, "target": 2}
    assert [(r["unique_id"], r["wait_seconds"]) for r in data["recent"]] == [
        ("cccc", 1.2),
        ("dddd", None),
        ("eeee", None),
    ]
    assert data["outcomes"] == {"served": 5, "expired": 1, "refused": 0, "failed": 1}
    assert data["queue_lengths"] == {LINUX: 1, WINDOWS: 1}
    assert "token" not in json.dumps(data)


def test_queue_lengths_keep_profiles_with_nobody_waiting():
    shot = snapshot([entry("x", seq=1, profile="odd")], [member(MEMBER_A, **{LINUX: (1, 1, 1)})])
    assert views.queue_lengths(shot) == {LINUX: 0, "odd": 1}


@pytest.mark.parametrize(
    ("repo", "run_id", "url"),
    [
        ("servo/servo", "123", "https://github.com/servo/servo/actions/runs/123"),
        ("servo/servo", "12a", None),
        ("servo", "1", None),
        ("servo/servo/x", "1", None),
        ('x/"><script>', "1", None),
        ("../x/y", "1", None),
    ],
)
def test_run_url_only_for_safe_shapes(repo, run_id, url):
    assert views.run_url(repo, run_id) == url


# Prometheus ----------------------------------------------------------------------------------


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text, parsed by prometheus_client's own parser."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_text():
    shot = busy_snapshot()
    tally = WaitTally(since=T0 - timedelta(hours=1))
    tally.observe(shot)

    got = samples(views.metrics_text(shot, tally))

    assert got[("monitor_queue_length", (("profile", LINUX),))] == 1
    assert got[("monitor_queue_length", (("profile", WINDOWS),))] == 1
    assert got[("monitor_queue_runners_wanted", (("profile", LINUX),))] == 2
    assert got[("monitor_queue_oldest_wait_seconds", (("profile", LINUX),))] == 9.0
    for outcome, count in {"served": 5, "expired": 1, "refused": 0, "failed": 1}.items():
        assert got[("monitor_queue_outcomes_total", (("outcome", outcome),))] == count
    assert got[("monitor_queue_member_fresh", (("member", MEMBER_A),))] == 0
    assert got[("monitor_queue_member_fresh", (("member", MEMBER_B),))] == 1
    both = (("member", MEMBER_A), ("profile", WINDOWS))
    assert got[("monitor_queue_member_idle", both)] == 0
    assert got[("monitor_queue_member_healthy", both)] == 1
    assert got[("monitor_queue_member_target", both)] == 2
    assert got[("monitor_queue_member_polled_timestamp_seconds", (("member", MEMBER_A),))] == (
        T0.timestamp() - 20
    )
    # The one served entry waited 1.2 s: in the 1.5 s bucket and above, not in the 1 s one.
    le = lambda bound: (("le", bound), ("profile", LINUX))  # noqa: E731
    assert got[("monitor_queue_wait_seconds_bucket", le("1.0"))] == 0
    assert got[("monitor_queue_wait_seconds_bucket", le("1.5"))] == 1
    assert got[("monitor_queue_wait_seconds_bucket", le("+Inf"))] == 1
    assert got[("monitor_queue_wait_seconds_count", (("profile", LINUX),))] == 1
    assert got[("monitor_queue_wait_seconds_sum", (("profile", LINUX),))] == pytest.approx(1.2)


def test_metrics_text_of_an_empty_queue_has_the_outcomes_at_zero():
    got = samples(views.metrics_text(snapshot()))
    assert {k: v for k, v in got.items() if k[0] == "monitor_queue_outcomes_total"} == {
        ("monitor_queue_outcomes_total", (("outcome", name),)): 0
        for name in ("served", "expired", "refused", "failed")
    }
    assert not any(name.startswith("monitor_queue_wait") for name, _ in got)


def served_entry(unique_id: str, seq: int, enqueued: float, served: float, **kwargs):
    return entry(unique_id, seq=seq, enqueued=enqueued, served=served, state="served", **kwargs)


def test_wait_tally_counts_each_served_entry_once_and_stays_cumulative():
    tally = WaitTally(since=T0, buckets=(1.0, 10.0))
    first = served_entry("a", 1, enqueued=0.0, served=0.5)
    second = served_entry("b", 2, enqueued=0.0, served=5.0, profile=WINDOWS)
    third = served_entry("c", 3, enqueued=1.0, served=40.0)
    before_start = served_entry("old", 0, enqueued=-9.0, served=-1.0)
    expired = entry("x", seq=4, state="expired", enqueued=0.0)

    tally.observe(snapshot(recent=[first, before_start, expired]))
    tally.observe(snapshot(recent=[second, first, before_start]))  # a seen again: not counted
    tally.observe(snapshot(recent=[third, second]))  # a left the window: still counted

    assert tally.histograms() == {
        LINUX: ([("1.0", 1.0), ("10.0", 1.0), ("+Inf", 2.0)], 39.5),
        WINDOWS: ([("1.0", 0.0), ("10.0", 1.0), ("+Inf", 1.0)], 5.0),
    }


def test_wait_tally_a_reused_unique_id_is_another_entry():
    tally = WaitTally(since=T0, buckets=(1.0,))
    tally.observe(snapshot(recent=[served_entry("a", 1, 0.0, 0.5)]))
    tally.observe(snapshot(recent=[served_entry("a", 9, 3.0, 3.5), served_entry("a", 1, 0.0, 0.5)]))
    assert tally.histograms()[LINUX][0][-1] == ("+Inf", 2.0)


def test_wait_tally_forgets_old_entries_and_ignores_them_if_they_come_back():
    tally = WaitTally(since=T0, buckets=(1.0,))
    old = served_entry("a", 1, 0.0, 0.5)
    tally.observe(snapshot(recent=[old]))
    hours = WaitTally.FORGET_AFTER.total_seconds() + 10
    tally.observe(snapshot(recent=[served_entry("b", 2, hours, hours + 0.5)]))
    assert len(tally._seen) == 1
    tally.observe(snapshot(recent=[old]))  # a late snapshot
    assert tally.histograms()[LINUX][0][-1] == ("+Inf", 2.0)


def test_wait_tally_from_many_threads_counts_each_entry_once():
    tally = WaitTally(since=T0, buckets=(1.0,))
    shots = [
        snapshot(recent=[served_entry(f"u{i}", i, 0.0, 0.5) for i in range(n, n + 50)])
        for n in range(0, 200, 10)
    ]
    threads = [threading.Thread(target=tally.observe, args=(shot,)) for shot in shots * 3]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert tally.histograms()[LINUX][0][-1] == ("+Inf", 240.0)


# The page's model ----------------------------------------------------------------------------


def test_page_model_rows():
    page = views.page_model(busy_snapshot())

    assert [(e.position, e.unique_id, e.state) for e in page.entries] == [
        (1, "aaaa", "reserving"),
        (2, "bbbb", "waiting"),
    ]
    first = page.entries[0]
    assert first.reserved == 1 and first.reserved_on == ((MEMBER_B, (7,)),)
    assert first.run_url == "https://github.com/servo/servo/actions/runs/11"
    assert [m.url for m in page.members] == [MEMBER_A, MEMBER_B]
    stale, fresh = page.members
    assert not stale.fresh and stale.stale_since == T0 - timedelta(seconds=20)
    assert stale.profiles == ((LINUX, 0, 2, 2), (WINDOWS, 0, 1, 2))
    assert fresh.fresh and fresh.stale_since is None
    assert [(r.unique_id, r.wait, r.members) for r in page.recent] == [
        ("cccc", "1.2 s", (MEMBER_A,)),
        ("dddd", "—", ()),
        ("eeee", "—", ()),
    ]
    assert page.lengths == ((LINUX, 1, 2), (WINDOWS, 1, 1))
    assert page.outcomes == (("served", 5), ("expired", 1), ("refused", 0), ("failed", 1))
    assert not page.no_fresh_member


def test_page_model_does_not_change_with_the_clock_alone():
    # Later snapshot, a fresh member polled again, clients polled again: the same page.
    later = busy_snapshot(at=12.0)
    members = [member(MEMBER_B, polled=11.0, **{LINUX: (1, 3, 3)}), later.members[1]]
    entries = [
        entry("aaaa", seq=1, count=2, run_id="11", enqueued=1.0, polled=11.5, state="reserving",
              reserved={MEMBER_B: [7], MEMBER_A: []}),
        entry("bbbb", seq=2, profile=WINDOWS, repo="servo/webrender", run_id="22", enqueued=2.5,
              polled=11.75),
    ]  # fmt: skip
    moved = snapshot(entries, members, later.recent, later.outcomes, at=12.0)
    assert views.page_model(moved) == views.page_model(busy_snapshot())
    # A client silent for more than 5 s shows, and so does any other change.
    silent = snapshot(entries, members, later.recent, later.outcomes, at=17.0)
    assert views.page_model(silent).entries[0].silent_since == T0 + timedelta(seconds=11.5)
    fewer = snapshot(entries[1:], members, later.recent, later.outcomes, at=12.0)
    assert views.page_model(fewer) != views.page_model(busy_snapshot())


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(None, "—"), (0.84, "0.8 s"), (59.94, "59.9 s"), (245, "4m05s"), (7260, "2h01m")],
)
def test_format_wait(seconds, shown):
    assert views.format_wait(seconds) == shown


# The routes, over real HTTP -----------------------------------------------------------------


@pytest.fixture
def served_views():
    engine = FakeEngine(busy_snapshot())
    app, live = view_app(engine)
    server = BackgroundServer(app, name="queue-views-http")
    yield engine, server.port, live
    server.close()


def test_page_lists_entries_in_serving_order(served_views):
    engine, port, _ = served_views

    reply = request(port, "GET", "/")

    assert reply.status == 200
    assert reply.content_type.lower() == "text/html; charset=utf-8"
    assert "script-src 'self'" in reply.headers["content-security-policy"]
    body = reply.body.decode()
    assert body.index('data-unique-id="aaaa"') < body.index('data-unique-id="bbbb"')
    assert 'href="https://github.com/servo/webrender/actions/runs/22"' in body
    # Relative URLs only: behind nginx the page lives at /queue/.
    assert 'src="static/queue.js"' in body and 'href="static/queue.css"' in body
    assert "<style" not in body and "style=" not in body and "<script>" not in body
    assert "! stale" in body and "timed out" in body


def test_fragment_has_an_etag_and_changes_with_the_queue(served_views):
    engine, port, _ = served_views
    first = request(port, "GET", "/queue.html")
    assert first.status == 200 and first.headers["cache-control"] == "no-cache"
    etag = first.headers["etag"]

    unchanged = request(port, "GET", "/queue.html", {"If-None-Match": etag})
    assert unchanged.status == 304 and unchanged.body == b""
    engine.current = busy_snapshot(at=11.0)  # only the time moved
    assert request(port, "GET", "/queue.html", {"If-None-Match": etag}).status == 304

    engine.current = snapshot(busy_snapshot().entries[1:], busy_snapshot().members)
    changed = request(port, "GET", "/queue.html", {"If-None-Match": etag})
    assert changed.status == 200 and changed.headers["etag"] != etag
    assert b'data-unique-id="aaaa"' not in changed.body
    assert b'data-unique-id="bbbb"' in changed.body


def test_queue_json_and_metrics_routes(served_views):
    engine, port, live = served_views

    data = request(port, "GET", "/queue.json").json
    assert data == views.snapshot_json(engine.current)

    metrics = request(port, "GET", "/metrics")
    assert metrics.status == 200
    assert metrics.content_type == "text/plain; version=0.0.4; charset=utf-8"
    got = samples(metrics.body.decode())
    assert got[("monitor_queue_length", (("profile", LINUX),))] == 1
    # The served entry of the snapshot was served before the tally began: not counted.
    assert not any(name.startswith("monitor_queue_wait") for name, _ in got)
    served = served_entry("new", 5, enqueued=0.0, served=2.0)
    served = served.__class__(**{**served.__dict__, "served_at": live.tally.since})
    engine.current = snapshot(recent=[served])
    got = samples(request(port, "GET", "/metrics").body.decode())
    assert got[("monitor_queue_wait_seconds_count", (("profile", LINUX),))] == 1


def test_page_files_are_served(served_views):
    _, port, _ = served_views
    for name, kind in (("queue.js", "javascript"), ("queue.css", "css"), ("style.css", "css")):
        reply = request(port, "GET", f"/static/{name}")
        assert reply.status == 200 and kind in reply.content_type, name
    assert request(port, "GET", "/static/../monitor.toml").status == 404


def test_a_store_outage_is_a_503_with_a_message(served_views):
    engine, port, _ = served_views
    engine.failure = MonitorError("the queue's store is unreachable", 503)

    for path in ("/queue.html", "/queue.json", "/metrics"):
        reply = request(port, "GET", path)
        assert reply.status == 503, path
        assert reply.json == {"error": "the queue's store is unreachable"}
        assert reply.headers["retry-after"] == "5"
    page = request(port, "GET", "/", {"Accept": "text/html"})
    assert page.status == 503 and b"the queue&#039;s store is unreachable" in page.body


def test_hostile_values_are_escaped(served_views):
    engine, port, _ = served_views
    hostile = "<script>alert(1)</script>"
    engine.current = snapshot(
        [entry(hostile, seq=1, repo='x/"><img src=x onerror=alert(2)>', run_id="1")],
        [member(f"http://{hostile}", **{hostile: (1, 1, 1)})],
    )
    body = request(port, "GET", "/").body.decode()
    assert hostile not in body and "<img src=x" not in body
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body
