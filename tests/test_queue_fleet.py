"""The global queue end to end on a fleet (issue 14, "Must show", first point): three real
`monitor run` processes on one GitHub stand-in, the queue served by the first, and Servo's
`actions/runner-select` re-created in bash (tests/scripts/runner-select.sh) as the client.
Counts 1 and 2 and each profile get self-hosted runners carrying `reserved-for:<uuid>`; an
unknown profile, a missing or stale artifact, a wrong token and an unknown id each end in the
client's GitHub-hosted fallback, and no runner stays reserved for a client that fell back."""

from __future__ import annotations

import shutil
import uuid

import pytest

from tests.support.fleet import FALLBACK_LABEL
from tests.support.fleet import Fleet
from tests.support.waiting import wait_until

pytestmark = pytest.mark.skipif(
    shutil.which("curl") is None or shutil.which("jq") is None,
    reason="runner-select.sh needs curl and jq (CI installs them)",
)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    with Fleet(tmp_path_factory.mktemp("queue-fleet"), queue=True) as running:
        running.wait_idle()
        yield running
    for member in running.members:
        assert member.process is not None and member.process.returncode == 0, member.log()
        assert "Traceback" not in member.log()


def release(fleet: Fleet, runners: list[dict]) -> None:
    """Their jobs run and end; the members replace them and the fleet is Idle again."""
    for runner in runners:
        fleet.set_busy(runner["id"])
        fleet.finish_job(runner["id"])
    fleet.wait_idle()


@pytest.mark.parametrize(("profile", "count"), [("linux", 1), ("linux", 2), ("windows", 1)])
def test_the_client_gets_self_hosted_runners(fleet: Fleet, profile: str, count: int):
    outputs = fleet.run_client(profile, count)

    unique_id = outputs["unique_id"]
    assert {k: v for k, v in outputs.items() if k != "stderr"} == {
        "unique_id": unique_id,
        "selected_runner_label": f"reserved-for:{unique_id}",
        "selected_runner_count": str(count),
        "selected_runner_indices": "[" + ",".join(str(n) for n in range(1, count + 1)) + "]",
        "runner_type_label": f"self-hosted-image:{profile}",
        "is_self_hosted": "true",
    }, outputs["stderr"]
    reserved = fleet.reserved_for(unique_id)
    assert len(reserved) == count
    assert all(f"self-hosted-image:{profile}" in r["labels"] for r in reserved)
    assert all(r["member"] is not None for r in reserved)
    # Nobody else's runner carries this id, and each runner one id only.
    for runner in fleet.reserved():
        assert sum(label.startswith("reserved-for:") for label in runner["labels"]) == 1
    assert fleet.standin.artifacts() == []
    release(fleet, reserved)


REFUSALS = {
    "unknown profile": ("nope", {}),
    "missing artifact": ("linux", {"ARGS_ARTIFACT": "none"}),
    "stale artifact": ("linux", {"ARGS_CREATED_AT": "2024-01-02T03:04:05Z"}),
    "wrong token": ("linux", {"TAKE_TOKEN": "wrong-token"}),
    "unknown id": ("linux", {"TAKE_UNIQUE_ID": "6d2b1b5e-0000-4000-8000-000000000000"}),
}


def test_each_refusal_ends_in_the_fallback_and_strands_no_runner(fleet: Fleet):
    fell_back = []
    for case, (profile, hooks) in REFUSALS.items():
        outputs = fleet.run_client(profile, max_retry_time=10, **hooks)
        assert outputs["is_self_hosted"] == "false", (case, outputs["stderr"])
        assert outputs["selected_runner_label"] == FALLBACK_LABEL, case
        assert outputs["selected_runner_indices"] == "[1]", case
        uuid.UUID(outputs["unique_id"])
        fell_back.append(outputs["unique_id"])
    assert fleet.standin.artifacts() == []

    # A wrong token or id leaves a real entry unpolled: it expires (30 s after its enqueue)
    # and what was reserved for it is given back.
    def none_reserved() -> bool:
        return not any(fleet.reserved_for(unique_id) for unique_id in fell_back)

    wait_until(none_reserved, "runners reserved for clients that fell back to be released", 120)
    fleet.wait_idle()
