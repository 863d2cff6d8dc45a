"""The HTTP API end to end, over real sockets: `web.make_app` served by waitress on a free port,
a running `Monitor` (its own thread) using `RestGitHub` against the GitHub stand-in and
`LibvirtHypervisor` against a private test-driver node, and clients that are stdlib HTTP or
Servo's own `runner-select-queueless` decision step run as a shell script (spec §3, §10.1, §12).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC
from datetime import datetime
from datetime import timedelta

import pytest

from monitor import loop
from monitor import models
from monitor import registrations
from monitor import web
from monitor.hypervisor import GUEST_TOKEN_OEM_PREFIX
from monitor.standin import GitHubStandIn
from tests.support.constants import API_TOKEN
from tests.support.constants import GITHUB_TOKEN
from tests.support.constants import REPO
from tests.support.constants import ROOT
from tests.support.served import Reply
from tests.support.served import Rig
from tests.support.served import Served
from tests.support.served import args_file
from tests.support.served import bring_online
from tests.support.served import fire_together
from tests.support.served import idle_count
from tests.support.served import one_pass
from tests.support.served import publish_args
from tests.support.served import request
from tests.support.served import take
from tests.support.served import take_path
from tests.support.under_pytest import standin_fixtures
from tests.support.waiting import WAIT
from tests.support.waiting import wait_until

SELECT_SCRIPT = ROOT / "tests" / "scripts" / "runner-select-queueless.sh"
FALLBACK_LABEL = "ubuntu-latest"
BOOT_SCRIPT = "#!/bin/sh\n# e2e boot script\ncurl -fsS http://192.168.100.1:8000/github-jitconfig\n"
NOT_A_GUEST = "10.254.254.254"

server, standin = standin_fixtures(GITHUB_TOKEN)


@pytest.fixture
def make_rig(make_served_rig):
    """The served rig of tests/support/served.py (one per test)."""
    return make_served_rig


# 1. Servo's runner-select-queueless decision step --------------------------------------------


def run_select(rig: Rig, unique_id: str, run_id: str, repo: str = REPO) -> dict[str, str]:
    environ = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "MONITOR_URL": rig.http.url + "/",
        "UNIQUE_ID": unique_id,
        "QUALIFIED_REPO": repo,
        "RUN_ID": run_id,
        "SELF_HOSTED_IMAGE": "linux",
        "GITHUB_HOSTED_LABEL": FALLBACK_LABEL,
    }
    result = subprocess.run(
        ["bash", str(SELECT_SCRIPT)],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    outputs = dict(line.split("=", 1) for line in result.stdout.splitlines())
    outputs["stderr"] = result.stderr
    return outputs


def select(rig: Rig, unique_id: str, run_id: str, repo: str = REPO) -> Reply:
    return request(
        rig.port,
        "POST",
        f"/select-runner?unique_id={unique_id}&qualified_repo={repo}&run_id={run_id}",
    )


needs_curl_and_jq = pytest.mark.skipif(
    shutil.which("curl") is None or shutil.which("jq") is None,
    reason="runner-select-queueless.sh needs curl and jq (CI installs them)",
)

FALLBACK = {
    "selected_runner_label": FALLBACK_LABEL,
    "runner_type_label": FALLBACK_LABEL,
    "is_self_hosted": "false",
}


def _refusal_case(
    case: str, unique_id: str, run_id: str, standin: GitHubStandIn
) -> tuple[str, str]:
    """Publish what `case` needs; return (repo to ask for, expected error message)."""
    now = datetime.now(UTC)
    other = str(uuid.uuid4())
    if case == "wrong prefix":
        repo = "elsewhere/servo"
        publish_args(standin, unique_id, run_id, repo=repo)
        return repo, "Not allowed on this qualified_repo"
    if case == "missing artifact":
        publish_args(standin, other, run_id)  # someone else's, on the same run
        return REPO, f"No args artifact found: servo-ci-runners_{unique_id}"
    if case == "too old":
        publish_args(standin, unique_id, run_id, created_at=now - timedelta(seconds=330))
        return REPO, "Args artifact is too old"
    if case == "wrong unique_id":
        publish_args(standin, unique_id, run_id, content=args_file(other, REPO, run_id))
        return REPO, "Wrong unique_id in artifact"
    if case == "wrong qualified_repo":
        publish_args(standin, unique_id, run_id, content=args_file(unique_id, "test/other", run_id))
        return REPO, "Wrong qualified_repo in artifact"
    if case == "wrong run_id":
        content = args_file(unique_id, REPO, str(int(run_id) + 1))
        publish_args(standin, unique_id, run_id, content=content)
        return REPO, "Wrong run_id in artifact"
    if case == "missing self_hosted_image_name":
        content = args_file(unique_id, REPO, run_id, image=None)
        publish_args(standin, unique_id, run_id, content=content)
        return REPO, "Missing self_hosted_image_name in artifact"
    raise AssertionError(case)


REFUSALS = [
    "wrong prefix",
    "missing artifact",
    "too old",
    "wrong unique_id",
    "wrong qualified_repo",
    "wrong run_id",
    "missing self_hosted_image_name",
]


@needs_curl_and_jq
def test_select_queueless_reserves_a_runner_then_falls_back(make_rig):
    rig = make_rig(1)
    unique_id, run_id = str(uuid.uuid4()), "14000000001"
    # Uploaded 4 minutes ago: still within tokenless_select_artifact_max_age (5 minutes).
    publish_args(
        rig.standin, unique_id, run_id, created_at=datetime.now(UTC) - timedelta(minutes=4)
    )

    outputs = run_select(rig, unique_id, run_id)

    assert outputs["selected_runner_label"] == f"reserved-for:{unique_id}", outputs["stderr"]
    assert outputs["runner_type_label"] == "self-hosted-image:linux"
    assert outputs["is_self_hosted"] == "true"
    reserved = rig.reserved_labels()
    assert list(reserved) == ["ci-runner-linux.0@host"]
    labels = reserved["ci-runner-linux.0@host"]
    assert len(labels) == 3, labels
    assert f"reserved-for:{unique_id}" in labels
    assert f"reserved-by:{REPO}/actions/runs/{run_id}" in labels
    (since,) = [label for label in labels if label.startswith("reserved-since:")]
    assert abs(int(since.partition(":")[2]) - time.time()) < 60

    # The pool's only runner is taken (its replacement never comes online): the next job
    # falls back to GitHub-hosted, and nothing more is reserved.
    second, second_run = str(uuid.uuid4()), "14000000002"
    publish_args(rig.standin, second, second_run)
    assert select(rig, second, second_run).json is None
    third = str(uuid.uuid4())
    publish_args(rig.standin, third, second_run)
    outputs = run_select(rig, third, second_run)
    assert {k: outputs[k] for k in FALLBACK} == FALLBACK
    assert "null" in outputs["stderr"]  # the monitor answered null, not an error
    assert list(rig.reserved_labels()) == ["ci-runner-linux.0@host"]


@needs_curl_and_jq
@pytest.mark.parametrize("case", REFUSALS)
def test_select_queueless_refuses_a_bad_artifact(make_rig, case):
    rig = make_rig(1)  # an idle runner is there: only the refusal makes it fall back
    unique_id, run_id = str(uuid.uuid4()), "14000000100"
    repo, message = _refusal_case(case, unique_id, run_id, rig.standin)

    reply = select(rig, unique_id, run_id, repo)

    assert reply.status == 403, reply
    assert message in reply.json["error"]
    outputs = run_select(rig, unique_id, run_id, repo)
    assert {k: outputs[k] for k in FALLBACK} == FALLBACK
    assert message in outputs["stderr"]  # curl --fail-with-body shows the monitor's reason
    assert rig.reserved_labels() == {}
    assert idle_count(rig.monitor) == 1


def test_select_runner_is_refused_on_a_queue_member(make_rig):
    rig = make_rig(1, extra="queue_member = true\n")
    unique_id, run_id = str(uuid.uuid4()), "14000000200"
    publish_args(rig.standin, unique_id, run_id)

    reply = select(rig, unique_id, run_id)

    assert reply.status == 409, reply
    assert "queue_member" in reply.json["error"]
    assert not any("/artifacts" in r.path for r in rig.standin.requests)  # GitHub not asked
    assert rig.reserved_labels() == {}


def test_select_runner_accepts_an_upper_case_unique_id(make_rig):
    # macOS's `uuidgen` prints upper case; upstream treats unique_id as an opaque string.
    rig = make_rig(1)
    unique_id, run_id = str(uuid.uuid4()).upper(), "14000000300"
    publish_args(rig.standin, unique_id, run_id)

    reply = select(rig, unique_id, run_id)

    assert reply.status == 200, reply
    assert len(reply.json) == 1
    (labels,) = rig.reserved_labels().values()
    assert f"reserved-for:{unique_id}".lower() in [label.lower() for label in labels]


# 2./3. Exactly once ---------------------------------------------------------------------------


def taken_runner(reply: Reply) -> dict | None:
    assert reply.status == 200, reply
    assert reply.content_type == "application/json"
    answer = reply.json
    if answer is None:
        return None
    assert isinstance(answer, list) and len(answer) == 1, answer
    return answer[0]


@contextlib.contextmanager
def refreshing(monitor: loop.Monitor) -> Iterator[None]:
    """Keep fetching GitHub's list (each fetch queues a reconcile), as the scheduler would,
    only much more often."""
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(0.01):
            monitor.registrations.refresh(force=True)

    thread = threading.Thread(target=run, name="e2e-refresher", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(WAIT)


def test_concurrent_takes_never_share_a_runner(make_rig):
    rig = make_rig(5)
    unique_ids = [str(uuid.uuid4()) for _ in range(32)]
    calls = [
        (lambda u=u, n=n: take(rig.port, u, 15000000000 + n)) for n, u in enumerate(unique_ids)
    ]

    with refreshing(rig.monitor):  # the pool is being looked at while it is taken
        replies = fire_together(calls)

    taken = {u: taken_runner(reply) for u, reply in zip(unique_ids, replies, strict=True)}
    winners = {u: entry for u, entry in taken.items() if entry is not None}
    assert len(winners) == 5, taken
    assert len({entry["id"] for entry in winners.values()}) == 5
    assert sum(entry is None for entry in taken.values()) == 27
    # On GitHub: exactly the 5 runners handed out carry a reservation, each for its taker.
    reserved = rig.reserved_labels()
    assert len(reserved) == 5, reserved
    for unique_id, entry in winners.items():
        name = entry["runner"]["registration"]["name"]
        assert name == f"ci-runner-linux.{entry['id']}@host"
        assert [label for label in reserved[name] if label.startswith("reserved-for:")] == [
            f"reserved-for:{unique_id}"
        ]


def test_retried_take_gets_the_same_runners(make_rig):
    rig = make_rig(3)
    unique_id = str(uuid.uuid4())

    # The same unique_id from 8 clients at once: one reservation, the same runner for all.
    replies = fire_together([lambda: take(rig.port, unique_id, 16000000001)] * 8)
    entries = [taken_runner(reply) for reply in replies]
    assert None not in entries, [reply.body for reply in replies]
    ids = {entry["id"] for entry in entries}
    assert len(ids) == 1, [reply.body for reply in replies]
    reserved = rig.reserved_labels()
    assert len(reserved) == 1, reserved
    (runner_id,) = ids

    # Later retries (the reservation is done) still answer with that runner.
    for _ in range(2):
        assert taken_runner(take(rig.port, unique_id, 16000000001))["id"] == runner_id
    assert rig.reserved_labels() == reserved

    # The same unique_id asking for another count is a conflict, and changes nothing.
    reply = take(rig.port, unique_id, 16000000001, count=2)
    assert reply.status == 409, reply
    assert unique_id in reply.json["error"]
    assert rig.reserved_labels() == reserved
    # The other two runners are still there for other jobs; asking for 3 gets those 2.
    other = take(rig.port, str(uuid.uuid4()), 16000000002, count=3)
    assert other.status == 200, other
    assert len(other.json) == 2, other.json
    assert {entry["id"] for entry in other.json} & ids == set()
    assert len(rig.reserved_labels()) == 3


def test_take_that_times_out_is_not_reserved_twice(make_rig):
    # Answers are waited for 1 + 1 (+ 1 per runner) s; GitHub takes 4 s to add the labels.
    rig = make_rig(2, extra="monitor_thread_send_timeout = 1\nmonitor_thread_recv_timeout = 1\n")
    rig.standin.inject_fault(None, count=1, method="POST", path_contains="/labels", delay=4)
    unique_id = str(uuid.uuid4())

    first = take(rig.port, unique_id, 16000000100)

    assert first.status == 503, first
    assert first.json["error"]
    # Meanwhile, another job cannot get the runner being reserved.
    other = take(rig.port, str(uuid.uuid4()), 16000000101, count=2)
    assert other.status == 200, other
    assert len(other.json) == 1, other.json
    # The client retries until the reservation it started is done: it gets that runner.
    retry = wait_until(
        lambda: (reply := take(rig.port, unique_id, 16000000100)).status != 503 and reply,
        "the slow reservation to finish",
    )
    entry = taken_runner(retry)
    assert entry is not None
    assert entry["id"] not in {e["id"] for e in other.json}
    reserved = rig.reserved_labels()
    assert len(reserved) == 2, reserved
    assert f"reserved-for:{unique_id}" in reserved[f"ci-runner-linux.{entry['id']}@host"]


# 4. A reservation failing half-way -----------------------------------------------------------


def test_half_failed_reservation_is_rolled_back(make_rig):
    rig = make_rig(2)
    label_posts = [
        r for r in rig.standin.requests if r.method == "POST" and r.path.endswith("/labels")
    ]
    assert label_posts == []
    # The first label call goes through (a fault with no status), the second gets a 500.
    rig.standin.inject_fault(None, count=1, method="POST", path_contains="/labels")
    rig.standin.inject_fault(500, count=1, method="POST", path_contains="/labels")

    unique_id = str(uuid.uuid4())
    reply = take(rig.port, unique_id, 17000000001, count=2)

    assert reply.status == 502, reply
    assert reply.content_type == "application/json"
    assert "GitHub refused the reservation" in reply.json["error"]
    posts = [r for r in rig.standin.requests if r.method == "POST" and r.path.endswith("/labels")]
    assert sorted(r.status for r in posts) == [200, 500]  # really half-way
    assert rig.reserved_labels() == {}  # rolled back before the answer
    removed = [r for r in rig.standin.requests if r.method == "DELETE" and "/labels/" in r.path]
    # Every chosen runner is cleaned: the one that got its labels (200s), and the one whose
    # call failed, in case GitHub applied it anyway (404s: nothing there).
    assert sorted(r.status for r in removed) == [200, 200, 200, 404, 404, 404]

    # Nothing was reserved for that job, so its retry starts afresh and gets both runners
    # (polled: the monitor thread forgets the failed attempt just after answering it).
    retry = wait_until(
        lambda: (reply := take(rig.port, unique_id, 17000000001, count=2)).status != 502 and reply,
        "the failed take to be forgotten",
        timeout=5,
    )
    assert retry.status == 200, retry
    assert len(retry.json) == 2, retry.json
    reserved = rig.reserved_labels()
    assert len(reserved) == 2
    assert all(f"reserved-for:{unique_id}" in labels for labels in reserved.values())


def test_a_runner_reserved_for_a_cancelled_run_is_reclaimed(make_rig, monkeypatch):
    """Without the check it would stay Reserved for monitor_reserve_timeout + github_busy_lag
    (60 s + 60 s here)."""
    monkeypatch.setattr(registrations, "RUN_CHECK_AFTER", timedelta(0))
    rig = make_rig(2)
    taken = taken_runner(take(rig.port, str(uuid.uuid4()), 18000000101))
    kept = taken_runner(take(rig.port, str(uuid.uuid4()), 18000000102))
    one_pass(rig.monitor)
    time.sleep(1.1)  # reserved-since has whole seconds: held > 0 from here on
    assert rig.monitor.registrations.check_reserved_runs() == [
        f"{REPO}/actions/runs/18000000101",
        f"{REPO}/actions/runs/18000000102",
    ]
    rig.standin.set_run_status(REPO, 18000000101, "completed", "cancelled")
    rig.monitor.registrations.run_checked_at.clear()  # as a minute later
    rig.monitor.registrations.check_reserved_runs()

    def reclaimed() -> bool:
        one_pass(rig.monitor)
        ids = {r.id for r in rig.monitor.observation.runners}
        return taken["id"] not in ids and kept["id"] in ids

    wait_until(reclaimed, "the cancelled run's runner to be destroyed")
    assert models.get_runner(taken["id"]).destroyed_at is not None
    names = {r["name"] for r in rig.standin.runners()}
    assert not any(name.startswith(f"ci-runner-linux.{taken['id']}@") for name in names)
    events = [e.message for e in models.recent_events(runner_id=taken["id"])]
    assert any("ended (cancelled) without using it" in message for message in events), events
    # One call per waiting run per check (two checks), none since the runner went.
    gets = [r for r in rig.standin.requests if "/actions/runs/1800000010" in r.path]
    assert len(gets) == 4, gets
    assert rig.monitor.registrations.check_reserved_runs() == []  # the other run was asked just now


# 5. Guests fetch their JIT config and boot script with their token, or by address -----------


def guest_token_of(rig: Rig, guest_name: str) -> str:
    """The token in a guest's SMBIOS OEM strings, from its domain XML (the test driver's)."""
    domain = rig.hypervisor._connection().lookupByName(guest_name)
    root = ET.fromstring(domain.XMLDesc(0))
    assert root.find("os/smbios").get("mode") == "sysinfo"
    (entry,) = [
        e.text
        for e in root.findall("sysinfo[@type='smbios']/oemStrings/entry")
        if e.text.startswith(GUEST_TOKEN_OEM_PREFIX)
    ]
    return entry.removeprefix(GUEST_TOKEN_OEM_PREFIX)


def test_guests_get_jit_config_once_with_their_own_token(make_rig):
    rig = make_rig(2)
    rig.config.profiles["linux"].config_dir.joinpath("boot-script").write_text(BOOT_SCRIPT)
    runners = rig.monitor.observation.runners
    tokens = {runner.id: guest_token_of(rig, runner.guest_name) for runner in runners}
    assert len(set(tokens.values())) == 2
    database = (rig.config.data_path / models.DB_FILENAME).read_bytes()
    for runner_id, token in tokens.items():
        row = models.get_runner(runner_id)
        # The store keeps only the token's hash.
        assert row.guest_token_sha256 == hashlib.sha256(token.encode()).hexdigest()
        assert token.encode() not in database
        as_guest = {"Authorization": f"Bearer {token}"}
        boot = request(rig.port, "GET", "/boot", as_guest)
        assert boot.status == 200 and boot.body.decode() == BOOT_SCRIPT, boot
        reply = request(rig.port, "GET", "/github-jitconfig", as_guest)
        assert reply.status == 200 and reply.json == row.jit_config, reply
        # Served once: the token is spent for both routes.
        for path in ("/github-jitconfig", "/boot"):
            again = request(rig.port, "GET", path, as_guest)
            assert again.status == 410, again
    # An address (even a guest's, from a trusted proxy) or a made-up token opens nothing.
    address = rig.hypervisor.ipv4_address(runners[0].guest_name)
    for headers, status in (
        ({"X-Real-IP": address}, 401),
        ({"Authorization": "Bearer made-up"}, 403),
        ({"Authorization": "Basic " + next(iter(tokens.values()))}, 401),
    ):
        for path in ("/github-jitconfig", "/boot"):
            reply = request(rig.port, "GET", path, headers)
            assert reply.status == status and "error" in reply.json, reply


def test_guests_get_jit_config_and_boot_script_by_address(make_rig):
    """Upstream's mode, for images that send no token."""
    rig = make_rig(2, extra='trusted_proxies = ["127.0.0.1"]\nguest_auth = "address"\n')
    observation = rig.monitor.observation
    addresses = {}
    for runner in observation.runners:
        address = rig.hypervisor.ipv4_address(runner.guest_name)
        assert address is not None, runner.guest_name
        addresses[runner.id] = address
    assert len(set(addresses.values())) == 2, addresses
    boot_script = rig.config.profiles["linux"].config_dir / "boot-script"
    missing = request(rig.port, "GET", "/boot", {"X-Real-IP": addresses[min(addresses)]})
    assert missing.status == 503, missing
    assert "boot-script" in missing.json["error"]
    boot_script.write_text(BOOT_SCRIPT)

    for runner_id, address in addresses.items():
        as_guest = {"X-Real-IP": address}
        reply = request(rig.port, "GET", "/github-jitconfig", as_guest)
        assert reply.status == 200, reply
        stored = models.get_runner(runner_id).jit_config
        assert stored
        assert reply.json == stored
        mapped = request(rig.port, "GET", "/github-jitconfig", {"X-Real-IP": f"::ffff:{address}"})
        assert mapped.status == 200 and mapped.json == stored, mapped
        boot = request(rig.port, "GET", "/boot", as_guest)
        assert boot.status == 200, boot
        assert boot.content_type == "text/plain; charset=utf-8"
        assert boot.body.decode() == BOOT_SCRIPT

    for path in ("/github-jitconfig", "/boot"):
        reply = request(rig.port, "GET", path, {"X-Real-IP": NOT_A_GUEST})
        assert reply.status == 503, reply
        assert NOT_A_GUEST in reply.json["error"]
        reply = request(rig.port, "GET", path, {"X-Real-IP": "not-an-ip"})
        assert reply.status == 422, reply
        assert "X-Real-IP" in reply.json["error"]

    # Without trusted proxies, X-Real-IP is not believed: the client is 127.0.0.1, no guest.
    untrusting = Served(web.make_app(replace(rig.config, trusted_proxies=()), rig.monitor))
    try:
        some_guest = {"X-Real-IP": next(iter(addresses.values()))}
        for path in ("/github-jitconfig", "/boot"):
            reply = request(untrusting.port, "GET", path, some_guest)
            assert reply.status == 503, reply
            assert "127.0.0.1" in reply.json["error"]
    finally:
        untrusting.close()


# 6. Errors over the wire -----------------------------------------------------------------


def test_take_refusals_are_json_and_reserve_nothing(make_rig):
    rig = make_rig(1)
    good = take_path(str(uuid.uuid4()), 18000000001)
    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    cases = [
        (401, good, {}, "Authorization"),
        (403, good, {"Authorization": "Bearer not-the-token"}, "wrong"),
        # Auth is checked before parameters (upstream's order).
        (401, "/profile/linux/take?unique_id=nope", {}, "Authorization"),
        (422, take_path("not-a-uuid", 18000000001), auth, "unique_id"),
        (422, take_path(str(uuid.uuid4()), "12a"), auth, "run_id"),
        (422, take_path(str(uuid.uuid4()), 18000000001, count=0), auth, "count"),
        (422, take_path(str(uuid.uuid4()), 18000000001, count=33), auth, "count"),
        (422, take_path(str(uuid.uuid4()), 18000000001, count="x"), auth, "count"),
        (422, "/profile/linux/take?qualified_repo=test/servo&run_id=1", auth, "unique_id"),
        (404, good.replace("/linux/", "/nosuch/"), auth, "nosuch"),
    ]
    for status, path, headers, word in cases:
        reply = request(rig.port, "POST", path, headers)
        assert reply.status == status, (path, headers, reply)
        assert word in reply.json["error"], (path, reply.json)
    assert rig.reserved_labels() == {}
    assert taken_runner(take(rig.port, str(uuid.uuid4()), 18000000002)) is not None


def test_requests_before_the_first_observation_are_503(make_rig):
    rig = make_rig(1, online=False)  # no GitHub fetch yet: the monitor has seen nothing
    assert rig.monitor.observation is None
    cases = [
        (
            "POST",
            take_path(str(uuid.uuid4()), 19000000001),
            {"Authorization": f"Bearer {API_TOKEN}"},
        ),
        ("GET", "/dashboard.json", {}),
    ]
    for method, path, headers in cases:
        reply = request(rig.port, method, path, headers)
        assert reply.status == 503, (path, reply)
        assert reply.json["error"], path
        assert int(reply.headers.get("retry-after", "0")) > 0, (path, reply)  # curl --retry
    # Once it has looked, the same take works.
    bring_online(rig, 1)
    assert taken_runner(take(rig.port, str(uuid.uuid4()), 19000000002)) is not None
