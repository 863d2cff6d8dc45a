"""tests/support/fleet.py, the global queue's test fleet, on its own: three real `monitor run`
processes (each its own `test:///default` host, data directory, port and suffix) on one
GitHub stand-in come up Idle, refuse tokenless selects as queue members, replace a runner
whose job ended, and leave no process behind."""

from __future__ import annotations

import tomllib
import uuid

import pytest

from tests.support.constants import AUTH
from tests.support.constants import REPO
from tests.support.fleet import Fleet
from tests.support.waiting import wait_until


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    with Fleet(root, queue=True) as running:
        running.wait_idle()
        yield running
    for member in running.members:
        assert member.process is not None and member.process.poll() is not None
        assert member.process.returncode == 0, member.log()
        assert "Traceback" not in member.log()


def test_three_members_come_up_idle_with_distinct_suffixes_ports_and_data(fleet: Fleet):
    suffixes = [m.suffix for m in fleet.members]
    assert suffixes == ["host1", "host2", "host3"]
    assert len({m.port for m in fleet.members}) == 3
    for member in fleet.members:
        config = tomllib.loads(member.config_path.read_text())
        assert config["github_api_suffix"] == member.suffix
        assert config["queue_member"] is True
        assert config["libvirt_uri"] == "test:///default"
        assert (member.root / "data" / "monitor.sqlite3").exists()
        counts = member.counts()
        assert counts is not None
        assert {p: (c["idle"], c["target"]) for p, c in counts.items()} == {
            "linux": (2, 2),
            "windows": (1, 1),
        }
        names = sorted(r["name"] for r in fleet.runners(member.index))
        assert len(names) == 3 and all(n.endswith(f"@{member.suffix}") for n in names), names
    assert len(fleet.runners()) == 9
    assert all(r["member"] is not None for r in fleet.runners())


def test_only_the_first_member_has_the_queue_table(fleet: Fleet):
    first, *others = (tomllib.loads(m.config_path.read_text()) for m in fleet.members)
    assert first["queue"]["servers"] == [m.url for m in fleet.members]
    assert first["queue"]["listen_port"] == fleet.queue_port != 8002
    assert all("queue" not in config for config in others)
    assert fleet.queue_url == f"http://127.0.0.1:{fleet.queue_port}"


def test_tokenless_select_is_refused_on_a_queue_member(fleet: Fleet):
    unique_id, run_id = str(uuid.uuid4()), fleet.new_run_id()
    artifact = fleet.upload_args(unique_id, run_id, "linux")
    query = f"unique_id={unique_id}&qualified_repo={REPO}&run_id={run_id}"
    for member in fleet.members:
        status, body = member.request("POST", f"/select-runner?{query}")
        assert status == 409, body
        assert "queue_member" in body["error"]
    assert fleet.reserved() == []
    fleet.delete_args(artifact)
    assert fleet.standin.artifacts() == []


def test_a_member_takes_with_its_api_token(fleet: Fleet):
    """What the queue will do: an authenticated take at one member reserves its runner, which
    then carries the `reserved-for:` label the harness finds."""
    member = fleet.members[1]
    unique_id = str(uuid.uuid4())
    query = f"unique_id={unique_id}&qualified_repo={REPO}&run_id={fleet.new_run_id()}"
    status, body = member.request("POST", f"/profile/windows/take/1?{query}", headers=AUTH)
    assert status == 200 and isinstance(body, list) and len(body) == 1, body
    (reserved,) = wait_until(lambda: fleet.reserved_for(unique_id), "the reservation label")
    assert reserved["member"] == 1
    assert "self-hosted-image:windows" in reserved["labels"]
    # Let it go: its job runs and ends, and the member makes a new one.
    fleet.set_busy(reserved["id"])
    fleet.finish_job(reserved["id"])
    fleet.wait_idle()
    assert fleet.reserved_for(unique_id) == []


def test_a_runner_freed_is_replaced(fleet: Fleet):
    member = fleet.members[2]
    before = {r["id"] for r in fleet.runners(member.index)}
    (linux_runner, *_) = [
        r for r in fleet.runners(member.index) if "self-hosted-image:linux" in r["labels"]
    ]
    busy = fleet.busy_all("linux")
    assert linux_runner["id"] in busy and len(busy) == 6  # two on each member

    fleet.finish_job(linux_runner["id"])

    def replaced() -> set[int] | None:
        ids = {r["id"] for r in fleet.runners(member.index) if r["status"] == "online"}
        return ids if len(ids) == 3 and linux_runner["id"] not in ids else None

    after = wait_until(replaced, "the freed runner's replacement", timeout=60)
    (new,) = after - before
    assert "self-hosted-image:linux" in next(r for r in fleet.runners() if r["id"] == new)["labels"]
    # The other busy runners' jobs end too: the fleet is back where it started.
    for runner_id in busy:
        if runner_id != linux_runner["id"]:
            fleet.finish_job(runner_id)
    fleet.wait_idle()
    assert fleet.reserved() == []
    assert not {r["id"] for r in fleet.runners()} & set(busy)


def test_the_client_runs_against_the_fleet_and_cleans_up(fleet: Fleet, tmp_path):
    """runner-select.sh with the fleet's environment: whatever the queue answers (before the
    queue is served, the port refuses and the client falls back), the outcome agrees with the
    stand-in's labels, and the args artifact is gone afterwards."""
    enqueued = tmp_path / "enqueued"
    outputs = fleet.run_client("linux", max_retry_time=20, ENQUEUED_FILE=str(enqueued))

    unique_id = outputs["unique_id"]
    assert outputs["selected_runner_count"] == "1"
    reserved = fleet.reserved_for(unique_id)
    if outputs["is_self_hosted"] == "true":
        assert outputs["selected_runner_label"] == f"reserved-for:{unique_id}"
        assert len(reserved) == 1 and enqueued.exists()
        fleet.finish_job(reserved[0]["id"])
        fleet.wait_idle()
    else:
        assert outputs["selected_runner_label"] == "ubuntu-22.04"
        assert reserved == []
    assert fleet.standin.artifacts() == []
