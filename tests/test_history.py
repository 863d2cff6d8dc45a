"""Reservation history: every take (runners given, `null`, failures) with when it was asked,
how long its job waited and how long the runner then ran; `GET /reservations` with pagination
and sorting; the dashboard's table. The monitor thread runs for real with the fakes of
tests/fakes.py."""

from __future__ import annotations

import time
import uuid

import pytest

from monitor import models
from monitor.errors import MonitorError
from tests.support.constants import AUTH
from tests.support.rigs import assert_error
from tests.support.rigs import idle_rig


@pytest.fixture
def rig(make_rig):
    return idle_rig(make_rig, linux=2, windows=1)


def history(rig, query: str = "", rows: int = 1) -> dict:
    """`/reservations`, once it has `rows` rows (takes are written to it off the request)."""
    deadline = time.monotonic() + 10
    while (body := rig.client.get(f"/reservations{query}").json)["total"] < rows:
        assert time.monotonic() < deadline, body
        time.sleep(0.01)
    return body


def registration_of(rig, runner_id: int):
    return next(r for r in rig.github.runners.values() if f".{runner_id}@" in r.name)


def test_a_take_is_followed_from_the_ask_to_the_end_of_its_job(rig):
    unique_id = str(uuid.uuid4())
    (entry,) = rig.client.post(rig.take_url(unique_id=unique_id, run="41"), headers=AUTH).json
    rig.client.post(rig.take_url(unique_id=unique_id, run="41"), headers=AUTH)  # a retry
    (row,) = history(rig)["reservations"]
    assert (row["unique_id"], row["runner_id"], row["outcome"]) == (
        unique_id,
        entry["id"],
        "reserved",
    )
    assert (row["qualified_repo"], row["run_id"], row["profile"]) == ("test/servo", "41", "linux")
    assert row["started_at"] is None and row["waited_seconds"] is None

    rig.clock.advance(12)  # GitHub's queue: the job starts 12 s after the take
    rig.github.set(registration_of(rig, entry["id"]).id, busy=True)
    rig.converge(1)
    rig.clock.advance(300)  # the job runs 5 minutes, then its runner is gone
    rig.github.runners.pop(registration_of(rig, entry["id"]).id)
    rig.converge(2)
    (row,) = rig.client.get("/reservations").json["reservations"]
    assert 12 <= row["waited_seconds"] <= 13
    assert row["ran_seconds"] == 300
    page = rig.client.get("/dashboard.html").text
    assert "test/servo #41" in page and "5m00s" in page


def test_null_answers_and_failures_are_history_too(rig):
    for _ in range(2):
        rig.client.post(rig.take_url(profile="windows"), headers=AUTH)
    rig.github.fail_next("add_labels", MonitorError("GitHub said no", 502))
    rig.client.post(rig.take_url(), headers=AUTH, status=502)
    rows = history(rig, "?sort=asked_at&order=asc", rows=3)["reservations"]
    assert [(r["profile"], r["outcome"]) for r in rows] == [
        ("windows", "reserved"),
        ("windows", "null"),
        ("linux", "failed"),
    ]
    assert rows[1]["runner_id"] is None


def test_pages_sorting_filters_and_links(rig, store):
    base = rig.clock()
    for n in range(7):
        at = base.replace(minute=n)
        models.record_take(
            f"u{n}",
            "linux" if n % 2 else "windows",
            "test/servo",
            str(n),
            [100 + n],
            "reserved",
            at,
            at,
        )
        models.record_job_started([100 + n], at.replace(second=n * 5))
    first = rig.client.get("/reservations?per_page=3&sort=waited&order=desc")
    body = first.json
    assert body["total"] == 7 and body["page"] == 1 and body["per_page"] == 3
    assert [r["unique_id"] for r in body["reservations"]] == ["u6", "u5", "u4"]
    assert 'rel="next"' in first.headers["Link"] and "page=2" in first.headers["Link"]
    last = rig.client.get("/reservations?per_page=3&sort=waited&order=desc&page=3").json
    assert [r["unique_id"] for r in last["reservations"]] == ["u0"]
    linux = rig.client.get("/reservations?profile=linux&sort=asked_at&order=asc").json
    assert [r["unique_id"] for r in linux["reservations"]] == ["u1", "u3", "u5"]
    none = rig.client.get("/reservations?qualified_repo=other/repo").json
    assert none == {"total": 0, "page": 1, "per_page": 30, "reservations": []}


@pytest.mark.parametrize(
    "query",
    ["page=0", "per_page=101", "per_page=x", "sort=secret", "order=sideways", "page=1&page=2"],
)
def test_bad_history_queries_are_422(rig, query):
    assert_error(rig.client.get(f"/reservations?{query}", status=422), 422)
