"""`HttpMembers` against real monitors: the monitor's app served by waitress on loopback, over
libvirt's test driver and the GitHub stand-in; upstream's answers where a member is upstream's
monitor; and members that are down, slow or say something else."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator

import bottle
import pytest

from monitor.errors import MonitorError
from monitor.errors import TransientError
from monitor.queue.contracts import Counts
from monitor.queue.members import HttpMembers
from monitor.serving import BackgroundServer
from tests.support.constants import API_TOKEN
from tests.support.constants import GITHUB_TOKEN
from tests.support.constants import REPO
from tests.support.daemons import free_port
from tests.support.under_pytest import standin_fixtures
from tests.support.waiting import wait_until

server, standin = standin_fixtures(GITHUB_TOKEN)
RUN = "41"


@pytest.fixture
def members() -> HttpMembers:
    return HttpMembers(API_TOKEN)


def reserved_for(rig, unique_id: str) -> int:
    return sum(f"reserved-for:{unique_id}" in labels for labels in rig.reserved_labels().values())


def test_counts_take_and_release_on_our_monitor(make_served_rig, members) -> None:
    rig = make_served_rig(3)
    url = rig.http.url + "/"  # a trailing slash as in some configs
    first = members.poll(url)
    assert first.counts == {"linux": Counts(idle=3, healthy=3, target=3)}
    assert first.untaken is not None and len(first.untaken) == 3

    unique_id = str(uuid.uuid4())
    ids = members.take(url, "linux", 2, unique_id, REPO, RUN)
    assert len(ids) == 2 and reserved_for(rig, unique_id) == 2
    assert set(ids) <= first.untaken
    # Once the member renders again, the taken runners are no longer untaken, and its
    # counts no longer count them idle (the two change together: one render).
    after = wait_until(
        lambda: (poll := members.poll(url)).untaken == first.untaken - set(ids) and poll,
        "the take in the member's answer",
        timeout=10,
    )
    assert after.counts["linux"].idle == 1
    # The same unique_id again (a retry after a timeout): the same runners, never more.
    assert members.take(url, "linux", 2, unique_id, REPO, RUN) == ids
    assert reserved_for(rig, unique_id) == 2

    assert members.release(url, unique_id) is True
    assert reserved_for(rig, unique_id) == 0
    # Nothing reserved for it any more: still True (nothing to give back).
    assert members.release(url, unique_id) is True


def test_take_with_no_idle_runner_is_empty(make_served_rig, members) -> None:
    rig = make_served_rig(1)
    assert len(members.take(rig.http.url, "linux", 1, str(uuid.uuid4()), REPO, RUN)) == 1

    assert members.take(rig.http.url, "linux", 1, str(uuid.uuid4()), REPO, RUN) == []


def test_refusals_are_monitor_errors_naming_the_member_and_status(make_served_rig) -> None:
    rig = make_served_rig(1)
    wrong = HttpMembers("not-the-token")

    with pytest.raises(MonitorError) as refused:
        wrong.take(rig.http.url, "linux", 1, str(uuid.uuid4()), REPO, RUN)
    assert type(refused.value) is MonitorError and refused.value.status == 502
    assert f"member {rig.http.url}" in str(refused.value) and "HTTP 403" in str(refused.value)
    assert "wrong monitor API token" in str(refused.value)
    assert "not-the-token" not in str(refused.value) and "not-the-token" not in repr(wrong)

    with pytest.raises(MonitorError, match="HTTP 404: No profile with key: nope"):
        HttpMembers(API_TOKEN).take(rig.http.url, "nope", 1, str(uuid.uuid4()), REPO, RUN)


def test_a_starting_monitor_is_transient_with_its_retry_after(make_served_rig, members) -> None:
    rig = make_served_rig(0, online=False)  # no reconcile pass yet: dashboard.json is 503

    with pytest.raises(TransientError) as caught:
        members.poll(rig.http.url)
    assert caught.value.status == 503 and caught.value.retry_after == 5.0
    assert "HTTP 503" in str(caught.value)


# Members that are not our monitor ----------------------------------------------------------


@pytest.fixture
def upstream() -> Iterator[tuple[str, dict[str, object]]]:
    """A member answering as upstream's monitor (Rocket) does; `answers` sets what
    /dashboard.json says."""
    answers: dict[str, object] = {"dashboard": {"profile_runner_counts": {}}}
    app = bottle.Bottle()

    @app.get("/dashboard.json")
    def dashboard():
        value = answers["dashboard"]
        if isinstance(value, bytes):
            return bottle.HTTPResponse(value, content_type="application/json")
        return value

    @app.post("/profile/<key>/take/<count>")
    def take(key, count):
        return bottle.HTTPResponse(answers.get("take", b"null"), content_type="application/json")

    @app.error(404)
    def not_found(error):
        # Rocket's catcher: `{"error": {"code": …}}` for a client asking for JSON.
        return '{"error": {"code": 404, "reason": "Not Found", "description": "…"}}'

    served = BackgroundServer(app, name="upstream-member")
    yield served.url, answers
    served.close()


def test_an_upstream_member_cannot_release(upstream, members) -> None:
    url, _ = upstream

    assert members.release(url, str(uuid.uuid4())) is False


def test_upstream_counts_are_read(upstream, members) -> None:
    url, answers = upstream
    answers["dashboard"] = {
        "profile_runner_counts": {
            "servo-ubuntu2204": {"idle": 1, "healthy": 3, "target": 3, "busy": 2, "reserved": 0}
        },
        "runners": [],
    }

    assert members.poll(url).counts == {"servo-ubuntu2204": Counts(idle=1, healthy=3, target=3)}


def upstream_runner(runner_id: int, registration: dict | None) -> dict:
    """A `/dashboard.json` runner in upstream's shape (§11.1)."""
    return {
        "id": runner_id,
        "runner": {
            "id": runner_id,
            "guest_name": f"ci-runner-linux.{runner_id}",
            "registration": registration,
        },
        "screenshot_url": f"http://ci0/runner/{runner_id}/screenshot",
    }


def registration(busy: bool = False, *labels: str) -> dict:
    names = ["self-hosted", "self-hosted-image:linux", *labels]
    return {"busy": busy, "id": 900, "labels": [{"name": n} for n in names], "status": "online"}


def test_untaken_runners_are_the_listed_ones_nobody_has(upstream, members) -> None:
    url, answers = upstream
    counts = {"linux": {"idle": 1, "healthy": 4, "target": 4}}
    answers["dashboard"] = {
        "profile_runner_counts": counts,
        "runners": [
            upstream_runner(1, registration()),
            upstream_runner(2, registration(True)),
            upstream_runner(3, registration(False, "reserved-for:abc", "reserved-by:x/y/1")),
            upstream_runner(4, None),
            {"id": 5, "runner": "not an object"},
            upstream_runner(6, registration() | {"labels": "not a list"}),
            upstream_runner(7, registration()),
        ],
    }
    assert members.poll(url).untaken == {1, 7}

    answers["dashboard"] = {"profile_runner_counts": counts}  # no runners listed
    assert members.poll(url).untaken is None


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"Monitor thread is still starting", "not JSON"),
        (b"[]", "no profile_runner_counts object"),
        (b'{"profile_runner_counts": []}', "no profile_runner_counts object"),
        (b'{"profile_runner_counts": {"a": 1}}', "profile_runner_counts.a is not an object"),
        (b'{"profile_runner_counts": {"a": {"idle": 1, "healthy": 1}}}', "a.target is not"),
        (b'{"profile_runner_counts": {"a": {"idle": -1, "healthy": 1, "target": 1}}}', "a.idle"),
        (b'{"profile_runner_counts": {"a": {"idle": true, "healthy": 1, "target": 1}}}', "a.idle"),
        (b'{"profile_runner_counts": {"a": {"idle": 1.0, "healthy": 1, "target": 1}}}', "a.idle"),
    ],
)
def test_malformed_counts(upstream, members, body: bytes, reason: str) -> None:
    url, answers = upstream
    answers["dashboard"] = body

    with pytest.raises(MonitorError) as caught:
        members.poll(url)
    assert type(caught.value) is MonitorError and caught.value.status == 502
    assert reason in str(caught.value)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"null", []),
        (b'[{"id": 4, "runner": {}}, {"id": 9, "runner": {}}]', [4, 9]),
        (b"[]", []),
        (b'{"id": 4}', "neither null nor an array"),
        (b'[{"id": "4"}]', "a runner without an integer id"),
        (b"[1]", "a runner without an integer id"),
        (b"<html>", "not JSON"),
    ],
)
def test_take_answers(upstream, members, body: bytes, expected) -> None:
    url, answers = upstream
    answers["take"] = body
    take = lambda: members.take(url, "linux", 2, str(uuid.uuid4()), REPO, RUN)  # noqa: E731

    if isinstance(expected, list):
        assert take() == expected
    else:
        with pytest.raises(MonitorError, match=expected):
            take()


def test_a_member_that_is_down_is_transient(members) -> None:
    url = f"http://127.0.0.1:{free_port()}"

    for call in (
        lambda: members.poll(url),
        lambda: members.take(url, "linux", 1, str(uuid.uuid4()), REPO, RUN),
        lambda: members.release(url, str(uuid.uuid4())),
    ):
        with pytest.raises(TransientError, match=f"member {url}: .*(NewConnectionError|Max)"):
            call()


def test_a_silent_member_times_out_as_transient() -> None:
    """Accepts connections and never answers: the poll gives up after its timeout, not never."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        started = time.monotonic()
        with pytest.raises(TransientError, match="Timeout"):
            HttpMembers(API_TOKEN).poll(url)
        assert time.monotonic() - started < 10  # generous: it gives up at all
        with pytest.raises(TransientError, match="Timeout"):
            HttpMembers(API_TOKEN, take_timeout=0.5).take(url, "l", 1, str(uuid.uuid4()), REPO, RUN)
    finally:
        stop.set()
        thread.join()
        for connection in held:
            connection.close()
        listener.close()
