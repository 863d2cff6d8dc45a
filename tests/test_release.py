"""The release endpoint (`DELETE /reservation/<unique_id>`): the global queue gives back the
runners it reserved for an entry it could not serve. Over real sockets: the monitor's app
served by waitress, `RestGitHub` against the GitHub stand-in, libvirt's test driver."""

from __future__ import annotations

import uuid

import pytest

from monitor import models
from tests.support.constants import API_TOKEN
from tests.support.constants import GITHUB_TOKEN
from tests.support.served import Rig
from tests.support.served import idle_count
from tests.support.served import one_pass
from tests.support.served import request
from tests.support.served import take
from tests.support.under_pytest import standin_fixtures

server, standin = standin_fixtures(GITHUB_TOKEN)
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


def release(rig: Rig, unique_id: str, headers: dict[str, str] | None = None):
    return request(
        rig.port, "DELETE", f"/reservation/{unique_id}", AUTH if headers is None else headers
    )


def reserved_for(rig: Rig, unique_id: str) -> list[str]:
    return sorted(
        name
        for name, labels in rig.reserved_labels().items()
        if f"reserved-for:{unique_id}" in labels
    )


def test_a_release_puts_the_runners_back_to_idle_and_forgets_them(make_served_rig) -> None:
    rig = make_served_rig(3)
    unique_id = str(uuid.uuid4())
    taken = take(rig.port, unique_id, 7, count=2)
    assert taken.status == 200 and len(taken.json) == 2
    ids = sorted(entry["id"] for entry in taken.json)
    assert len(reserved_for(rig, unique_id)) == 2

    reply = release(rig, unique_id)

    assert reply.status == 200, reply.body
    assert reply.json == {"unique_id": unique_id, "released": ids, "kept": []}
    assert rig.reserved_labels() == {}  # every reservation label gone on GitHub
    assert models.get_reservation(unique_id) is None
    one_pass(rig.monitor)
    assert idle_count(rig.monitor) == 3
    kinds = [(e.kind, e.runner_id) for e in models.recent_events(20) if e.kind == "release"]
    assert sorted(runner for _, runner in kinds) == ids
    # Forgotten: the same unique_id takes again (fresh runners, not the remembered answer).
    again = take(rig.port, unique_id, 7, count=2)
    assert again.status == 200 and len(again.json) == 2
    assert len(reserved_for(rig, unique_id)) == 2


def test_an_unknown_unique_id_is_404_and_a_second_release_too(make_served_rig) -> None:
    rig = make_served_rig(1)
    unknown = release(rig, str(uuid.uuid4()))
    assert unknown.status == 404
    assert unknown.json["error"].startswith("No reservation for ")

    unique_id = str(uuid.uuid4())
    assert take(rig.port, unique_id, 7).status == 200
    assert release(rig, unique_id).status == 200
    assert release(rig, unique_id).status == 404


def test_a_started_job_keeps_its_runner(make_served_rig) -> None:
    rig = make_served_rig(2)
    unique_id = str(uuid.uuid4())
    taken = take(rig.port, unique_id, 7, count=2)
    busy, idle = sorted(taken.json, key=lambda entry: entry["id"])
    registration = next(
        r for r in rig.standin.runners() if r["id"] == busy["runner"]["registration"]["id"]
    )
    rig.standin.set_busy(registration["id"], True)
    one_pass(rig.monitor)

    reply = release(rig, unique_id)

    assert reply.json == {"unique_id": unique_id, "released": [idle["id"]], "kept": [busy["id"]]}
    assert reserved_for(rig, unique_id) == [registration["name"]]
    assert models.get_reservation(unique_id).ids == [busy["id"]]


def test_the_labels_on_github_are_enough_after_a_restart(make_served_rig) -> None:
    """No record (the monitor was killed between the labels and the record): the labels say
    what to release."""
    rig = make_served_rig(1)
    unique_id = str(uuid.uuid4())
    assert take(rig.port, unique_id, 7).status == 200
    rig.monitor.call(lambda: rig.monitor.takes._reservations.clear(), 5)

    reply = release(rig, unique_id)

    assert reply.status == 200 and len(reply.json["released"]) == 1
    assert rig.reserved_labels() == {}


def test_github_refusing_keeps_the_runner_reserved_and_answers_502(make_served_rig) -> None:
    rig = make_served_rig(1)
    unique_id = str(uuid.uuid4())
    (entry,) = take(rig.port, unique_id, 7).json
    # The first label removal (reserved-by) fails: reserved-for stays, so it still shows Reserved.
    rig.standin.inject_fault(500, method="DELETE", path_contains="/labels/")

    reply = release(rig, unique_id)

    assert reply.status == 502
    assert "GitHub refused to remove the reservation" in reply.json["error"]
    assert reserved_for(rig, unique_id) == [entry["runner"]["registration"]["name"]]
    # Not taken by another job meanwhile, and released once GitHub answers again.
    assert take(rig.port, str(uuid.uuid4()), 8).json is None
    one_pass(rig.monitor)
    retried = release(rig, unique_id)
    assert retried.status == 200, retried.body
    assert retried.json["released"] == [entry["id"]]
    assert rig.reserved_labels() == {}


@pytest.mark.parametrize(
    ("headers", "target", "status"),
    [
        ({}, "/reservation/5f0c6b4e-8a3d-4c52-9e61-2d7f3a9b1c04", 401),
        (
            {"Authorization": "Bearer wrong"},
            "/reservation/5f0c6b4e-8a3d-4c52-9e61-2d7f3a9b1c04",
            403,
        ),
        (AUTH, "/reservation/not-a-uuid", 422),
        (AUTH, "/reservation/5f0c6b4e-8a3d-4c52-9e61-2d7f3a9b1c0", 422),
    ],
)
def test_refusals(make_served_rig, headers, target, status) -> None:
    rig = make_served_rig(0, online=False)

    reply = request(rig.port, "DELETE", target, headers)

    assert reply.status == status
    assert reply.content_type == "application/json"
    assert "Traceback" not in reply.body.decode()
