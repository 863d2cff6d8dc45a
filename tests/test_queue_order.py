"""The global queue's order and durability on a fleet (issue 14, "Must show": FIFO, priority,
restart), with real processes: three `monitor run` members on one GitHub stand-in, the queue
in the first member's `monitor run` (or, for the restart, in a `monitor queue` process of its
own), and Servo's `actions/runner-select` re-created in bash (tests/scripts/runner-select.sh).

How the order is observed: every linux runner of the fleet is busy (a job runs on it), the
clients wait in a known order, then one runner's job ends at a time: its member replaces it,
the new runner shows Idle, the queue reserves it, and the stand-in shows which client's
`reserved-for:<uuid>` label it got. That runner's job then starts (busy), so exactly one runner
is ever free, and the sequence of labels is the serving order.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import textwrap
import time
import uuid
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.constants import API_TOKEN
from tests.support.constants import REPO
from tests.support.daemons import free_port
from tests.support.fleet import RESERVED_FOR
from tests.support.fleet import Fleet
from tests.support.fleet import Member
from tests.support.fleet import client_outputs
from tests.support.fleet import http_request as fleet_http
from tests.support.waiting import wait_until

pytestmark = pytest.mark.skipif(
    shutil.which("curl") is None or shutil.which("jq") is None,
    reason="runner-select.sh needs curl and jq (CI installs them)",
)

URGENT_REPO = "test/urgent"  # [queue] repository_priority gives it 10
# Long enough for every client to outlast the whole test: a client that gave up would fall
# back (and show as a missing reservation), not pass.
CLIENT_RETRY = 600
# How long a test waits for a client it expects to be served by now (a failure must not wait
# out CLIENT_RETRY).
CLIENT_DEADLINE = 120
FIFO_CLIENTS = 20
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


def inversions(order: list[str], expected: list[str]) -> int:
    """Pairs served in the opposite order of `expected` (0: the same order)."""
    place = {unique_id: i for i, unique_id in enumerate(expected)}
    ranks = [place[unique_id] for unique_id in order]
    return sum(ranks[i] > ranks[j] for i in range(len(ranks)) for j in range(i + 1, len(ranks)))


class Watch:
    """The runners' `reserved-for:` labels as they appear on the stand-in."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.seen: dict[int, str] = {}  # runner id -> the unique_id it is reserved for
        self.new()

    def new(self) -> list[tuple[int, str]]:
        """(runner id, unique_id) of the reservations that appeared since the last call."""
        found = []
        for runner in self.fleet.reserved():
            if runner["id"] in self.seen:
                continue
            labels = [
                x[len(RESERVED_FOR) :] for x in runner["labels"] if x.startswith(RESERVED_FOR)
            ]
            assert len(labels) == 1, f"runner {runner['name']} carries {labels}"
            self.seen[runner["id"]] = labels[0]
            found.append((runner["id"], labels[0]))
        return found


class Busy:
    """The fleet's linux runners that run a job, oldest first: `free_one` ends one job and
    returns who the replacement runner went to (that runner's job then starts)."""

    def __init__(self, fleet: Fleet, runner_ids: list[int]) -> None:
        self.fleet = fleet
        self.ids = deque(runner_ids)
        self.watch = Watch(fleet)
        self.latencies: list[float] = []  # job ended -> the new runner reserved

    def free_one(self) -> str:
        runner_id = self.ids.popleft()
        started = time.monotonic()
        self.fleet.finish_job(runner_id)
        new = wait_until(self.watch.new, f"the runner replacing {runner_id} to be reserved", 60)
        self.latencies.append(time.monotonic() - started)
        assert len(new) == 1, f"one runner was freed, {len(new)} were reserved: {new}"
        reserved_id, unique_id = new[0]
        self.fleet.set_busy(reserved_id)  # the client's job starts on it
        self.ids.append(reserved_id)
        return unique_id

    def report(self, name: str) -> str:
        lat = sorted(self.latencies)
        return (
            f"{name}: {len(lat)} runners freed one at a time; job end -> reserved:"
            f" median {statistics.median(lat):.2f} s, max {lat[-1]:.2f} s"
        )


CHILDREN: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def _reap() -> Iterator[None]:
    """A test that failed leaves no client polling for CLIENT_RETRY seconds."""
    yield
    while CHILDREN:
        process = CHILDREN.pop()
        if process.poll() is None:
            # The whole group: a client's curl, nginx's workers.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        process.communicate()


def start_client(fleet: Fleet, *args: Any, **kwargs: Any) -> subprocess.Popen[str]:
    process = fleet.start_client(*args, **kwargs)
    CHILDREN.append(process)
    return process


def spawn(args: list[str], **kwargs: Any) -> subprocess.Popen[str]:
    process = subprocess.Popen(args, start_new_session=True, **kwargs)
    CHILDREN.append(process)
    return process


def start_in_order(
    fleet: Fleet, tmp: Path, counts: list[int], repo: str = REPO, **hooks: str
) -> list[tuple[str, subprocess.Popen[str]]]:
    """A client of linux for each of `counts` (the runners it asks for), each started once
    the one before it is enqueued (the script's ENQUEUED_FILE hook): their enqueue order is
    the order of the list. Returns each one's unique_id and process."""
    clients = []
    for count in counts:
        marker = tmp / f"enqueued-{uuid.uuid4()}"
        process = start_client(
            fleet,
            "linux",
            count,
            max_retry_time=CLIENT_RETRY,
            QUALIFIED_REPO=repo,
            ENQUEUED_FILE=str(marker),
            **hooks,
        )

        def enqueued(marker: Path = marker, process: subprocess.Popen[str] = process) -> str:
            text = marker.read_text() if marker.exists() else ""
            if not text.endswith("\n") and process.poll() is not None:
                _, stderr = process.communicate()
                raise AssertionError(f"a client ended before it was enqueued:\n{stderr}")
            return text.strip() if text.endswith("\n") else ""

        clients.append((wait_until(enqueued, "a client to be enqueued", 30), process))
    return clients


def assert_served(busy: Busy, clients: list[tuple[str, subprocess.Popen[str]]]) -> None:
    """Every client ended with self-hosted runners, and exactly one runner was reserved for
    it (seen by `busy.watch`: the runner may be gone since, its job done)."""
    reserved = list(busy.watch.seen.values())
    for unique_id, process in clients:
        outputs = client_outputs(process, timeout=CLIENT_DEADLINE)
        assert outputs["is_self_hosted"] == "true", outputs["stderr"]
        assert outputs["unique_id"] == unique_id
        assert reserved.count(unique_id) == 1


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("queue-order")
    with Fleet(
        root,
        queue=True,
        queue_extra=f'repository_priority = {{ "{URGENT_REPO}" = 10 }}\n',
        # 20 enqueues within a minute from one repository: above Servo's bursts, and not what
        # this test is about (the per-repository limit has its own tests).
        # A runner whose job ended is seen gone, and its replacement Idle, within a second.
        settings={"select_runner_rate_limit": "100", "api_cache_timeout": "1"},
    ) as running:
        running.wait_idle()
        running.wait_queue_ready()
        yield running
    for member in running.members:
        assert member.process is not None and member.process.returncode == 0, member.log()
        assert "Traceback" not in member.log()


def queue_alone_all_busy(fleet: Fleet) -> tuple[Member, Busy]:
    """A fleet with `queue="alone"` up (members Idle, the queue answering), then every
    linux runner busy: its queue process and the busy runners."""
    fleet.wait_idle()
    fleet.wait_queue_ready()
    queue = fleet.queue_process
    assert queue is not None
    return queue, busy_everything(fleet)


def busy_everything(fleet: Fleet) -> Busy:
    """Every linux runner of the fleet runs a job; once every member shows none Idle, no
    linux client can be served until a job ends."""
    ids = fleet.busy_all("linux")
    assert len(ids) == len(fleet.members) * fleet.targets["linux"]

    def none_idle() -> bool:
        return all((m.counts() or {}).get("linux", {}).get("idle") == 0 for m in fleet.members)

    wait_until(none_idle, "every member to show its linux runners busy", 30)
    return Busy(fleet, ids)


@pytest.fixture(scope="module")
def busy(fleet: Fleet) -> Busy:
    return busy_everything(fleet)


def test_runners_freed_one_at_a_time_go_to_the_clients_in_enqueue_order(
    fleet: Fleet, busy: Busy, tmp_path: Path
):
    started = time.monotonic()
    clients = start_in_order(fleet, tmp_path, [1] * FIFO_CLIENTS)
    enqueued = [unique_id for unique_id, _ in clients]
    waiting = [e["unique_id"] for e in fleet.queue_state()["entries"]]
    assert waiting == enqueued  # the queue's own view: all waiting, in that order

    served = [busy.free_one() for _ in enqueued]

    assert inversions(served, enqueued) == 0, (served, enqueued)
    assert served == enqueued
    assert_served(busy, clients)
    # The queue's record agrees: served_at in the enqueue order.
    recent = [e for e in fleet.queue_state()["recent"] if e["unique_id"] in set(enqueued)]
    assert all(e["state"] == "served" for e in recent)
    by_served_at = [e["unique_id"] for e in sorted(recent, key=lambda e: e["served_at"])]
    assert by_served_at == enqueued
    print(busy.report("FIFO"), f"; test {time.monotonic() - started:.1f} s")


def test_a_higher_priority_entry_enqueued_last_is_served_first(
    fleet: Fleet, busy: Busy, tmp_path: Path
):
    started = time.monotonic()
    busy.latencies.clear()
    plain = start_in_order(fleet, tmp_path, [1, 1])
    # The authenticated enqueue's own priority (5), between the plain ones (0) and the
    # repository the config ranks 10; its client polls the take as runner-select.sh does.
    chosen = str(uuid.uuid4())
    query = f"unique_id={chosen}&qualified_repo={REPO}&run_id={fleet.new_run_id()}&priority=5"
    status, token = fleet.queue_request("POST", f"/profile/linux/enqueue?{query}", AUTH)
    assert status == 200, token
    take = spawn(
        ["curl", "-sS", "--fail-with-body", "--retry", str(CLIENT_RETRY), "--retry-delay", "1"]
        + ["--retry-max-time", str(CLIENT_RETRY), "--max-time", "30", "-X", "POST"]
        + [f"{fleet.queue_url}/take/{chosen}?token={token}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    urgent = start_in_order(fleet, tmp_path, [1], repo=URGENT_REPO)
    entries = fleet.queue_state()["entries"]
    assert [(e["unique_id"], e["priority"]) for e in entries] == [
        (urgent[0][0], 10),
        (chosen, 5),
        (plain[0][0], 0),
        (plain[1][0], 0),
    ]

    served = [busy.free_one() for _ in range(4)]

    assert served == [urgent[0][0], chosen, plain[0][0], plain[1][0]]
    stdout, stderr = take.communicate(timeout=CLIENT_DEADLINE)
    assert (take.returncode, stdout) == (0, "1"), stderr
    assert list(busy.watch.seen.values()).count(chosen) == 1
    assert_served(busy, plain + urgent)
    print(busy.report("priority"), f"; test {time.monotonic() - started:.1f} s")


# Restart ------------------------------------------------------------------------------------
#
# Servo's client takes with `curl --retry`, which retries timeouts and 408/429/5xx but not a
# refused connection: a client polling while the queue process is down falls back to a
# GitHub-hosted runner at once (behind nginx the outage is a 502 instead, retried, but its
# HTML body ends up in the client's output and fails the final `jq`). So the realistic case in
# which a restart must lose nothing is the one that every client survives: the queue is
# killed and restarted between the clients' enqueues and their first take (the script's
# TAKE_WHEN_FILE hook holds them there), within the 30 s after which an unpolled entry expires.
RESTART_COUNTS = [1, 2, 1, 1, 2, 1]


def test_a_queue_killed_and_restarted_loses_no_entry_and_serves_each_client_once(
    tmp_path: Path,
):
    started = time.monotonic()
    with Fleet(
        tmp_path / "fleet",
        queue="alone",
        targets={"linux": 3},  # 9 busy runners: enough for every entry's without reuse
        settings={"api_cache_timeout": "1"},
    ) as fleet:
        queue, busy = queue_alone_all_busy(fleet)
        go = tmp_path / "go"
        in_order = start_in_order(fleet, tmp_path, RESTART_COUNTS, TAKE_WHEN_FILE=str(go))
        clients = [(u, n, p) for (u, p), n in zip(in_order, RESTART_COUNTS, strict=True)]
        enqueued_at = time.monotonic()
        ids = [unique_id for unique_id, _, _ in clients]
        assert [e["unique_id"] for e in fleet.queue_state()["entries"]] == ids

        def reserved(n: int) -> bool:
            """`n` runners reserved so far (Watch fails on a runner with two labels)."""
            busy.watch.new()
            return len(busy.watch.seen) == n

        # Three runners free: the first two entries (1 + 2 runners) are served, not yet
        # answered (their clients have not polled), when the queue is killed.
        for _ in range(3):
            fleet.finish_job(busy.ids.popleft())

        wait_until(lambda: reserved(3), "the first two entries' runners to be reserved")
        assert sorted(busy.watch.seen.values()) == sorted([ids[0], ids[1], ids[1]])
        # The labels are on GitHub before the members' takes answer the queue, which records
        # the entries served then.
        wait_until(
            lambda: (
                {e["unique_id"]: e["state"] for e in fleet.queue_state()["recent"]}
                == {ids[0]: "served", ids[1]: "served"}
            ),
            "the queue to record both served",
        )
        assert [e["unique_id"] for e in fleet.queue_state()["entries"]] == ids[2:]
        killed_at = time.monotonic()
        assert queue.kill() == -9

        # While it is down two runners free up; they wait Idle for the queue.
        for _ in range(2):
            fleet.finish_job(busy.ids.popleft())
        queue.start()
        fleet.wait_queue_ready()
        outage = time.monotonic() - killed_at
        restarted_after = time.monotonic() - enqueued_at
        go.touch()  # the clients' first take, on the restarted queue, with their tokens

        wait_until(lambda: reserved(5), "the two runners Idle at the restart to be reserved")
        # The next two in order (both in one dispatcher cycle: which runner each got, and
        # which take ended first, is not an order).
        assert sorted(list(busy.watch.seen.values())[3:]) == sorted([ids[2], ids[3]])
        for _ in range(3):  # the last two entries' runners
            fleet.finish_job(busy.ids.popleft())

        outcomes = [client_outputs(p, timeout=CLIENT_DEADLINE) for _, _, p in clients]
        assert reserved(sum(RESTART_COUNTS))
        for (unique_id, count, _), outputs in zip(clients, outcomes, strict=True):
            assert outputs["is_self_hosted"] == "true", outputs["stderr"]
            assert outputs["selected_runner_count"] == str(count)
            # Exactly `count` runners carry its label (no runner has two: Watch checks).
            assert len(fleet.reserved_for(unique_id)) == count, unique_id
        assert len(fleet.reserved()) == sum(RESTART_COUNTS)
        assert sorted(busy.watch.seen.values()) == sorted(
            unique_id for unique_id, count, _ in clients for _ in range(count)
        )
        recent = fleet.queue_state()["recent"]
        assert sorted(e["unique_id"] for e in recent) == sorted(ids)
        assert all(e["state"] == "served" for e in recent)
        log = queue.log()
    assert "Traceback" not in log
    print(
        f"restart: the queue down for {outage:.1f} s (kill to answering again with every member"
        f" fresh), serving again {restarted_after:.1f} s after the last enqueue;"
        f" test {time.monotonic() - started:.1f} s"
    )


def test_a_queue_killed_while_its_take_is_in_flight_finishes_it_after_the_restart(
    tmp_path: Path,
):
    """The queue dies after forwarding a take and before learning its result (the entry is
    `reserving`; upstream's queue had already deleted its entry then, stranding the runner).
    The restarted queue forwards the same take again, with the same unique_id: the member
    answers with the runners it reserved (or is reserving) for it, never more."""
    started = time.monotonic()
    with Fleet(tmp_path / "fleet", queue="alone", settings={"api_cache_timeout": "1"}) as fleet:
        queue, busy = queue_alone_all_busy(fleet)
        go = tmp_path / "go"
        [(unique_id, process)] = start_in_order(fleet, tmp_path, [2], TAKE_WHEN_FILE=str(go))
        # GitHub is slow to label the runners: the members' takes stay under way for 4 s.
        fleet.standin.inject_fault(None, count=2, method="POST", path_contains="/labels", delay=4)
        for _ in range(2):
            fleet.finish_job(busy.ids.popleft())

        def reserving() -> bool:
            entries = fleet.queue_state()["entries"]
            return [(e["unique_id"], e["state"]) for e in entries] == [(unique_id, "reserving")]

        wait_until(reserving, "the queue to forward the entry's takes", 30, interval=0.02)
        assert busy.watch.new() == []  # not labelled yet
        killed_at = time.monotonic()
        assert queue.kill() == -9
        queue.start()
        fleet.wait_queue_ready()
        outage = time.monotonic() - killed_at
        go.touch()

        outputs = client_outputs(process, timeout=CLIENT_DEADLINE)
        assert outputs["is_self_hosted"] == "true", outputs["stderr"]
        busy.watch.new()
        assert list(busy.watch.seen.values()) == [unique_id, unique_id]
        assert len(fleet.reserved_for(unique_id)) == 2
        assert len(fleet.reserved()) == 2
        [entry] = [e for e in fleet.queue_state()["recent"] if e["unique_id"] == unique_id]
        assert entry["state"] == "served"
        # (the members' own runner ids, not GitHub's)
        assert sum(len(ids) for ids in entry["reserved"].values()) == 2
        log = queue.log()
    assert f"resuming the takes of {unique_id}" in log
    assert "Traceback" not in log
    print(
        f"take in flight: the queue down for {outage:.1f} s;"
        f" test {time.monotonic() - started:.1f} s"
    )


# Behind nginx, as in production (`https://ci0.servo.org/queue`): while the queue is down,
# nginx answers the clients' polls itself. Its own 502 page has a body, which curl --retry
# appends to the client's output: the final `jq -e .` then fails after a success, and the
# client falls back while its runners stay reserved. An `error_page` that turns nginx's 502
# and 504 into an empty 503 with Retry-After makes an outage one more retried poll.
NGINX_QUEUE_LOCATION = """
    location /queue/ {
        proxy_pass http://127.0.0.1:%(queue_port)d/;
        error_page 502 504 =503 @queue_down;
    }
    location @queue_down {
        add_header Retry-After 1 always;
        return 200 "";  # the status is error_page's 503; the body stays empty
    }
"""


def start_nginx(root: Path, queue_port: int) -> tuple[subprocess.Popen[str], str]:
    """nginx in the foreground on a free port, proxying `/queue/` to the queue; returns the
    process and the queue's URL through it."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = root / "nginx.conf"
    config.write_text(
        textwrap.dedent(
            f"""
            daemon off;
            pid {root}/nginx.pid;
            error_log {root}/error.log;
            events {{}}
            http {{
                access_log off;
                client_body_temp_path {root}/body;
                proxy_temp_path {root}/proxy;
                server {{
                    listen 127.0.0.1:{port};
            """
        )
        + NGINX_QUEUE_LOCATION % {"queue_port": queue_port}
        + "        }\n}\n"
    )
    with open(root / "stderr.log", "w") as output:  # a file: nginx's workers inherit it
        process = spawn(
            ["nginx", "-p", str(root), "-c", str(config)],
            stdout=output,
            stderr=subprocess.STDOUT,
            text=True,
        )
    url = f"http://127.0.0.1:{port}/queue"

    def answers() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"nginx exited: {(root / 'stderr.log').read_text()}")
        try:
            return fleet_http("GET", url + "/healthz")[0] == 200
        except OSError:
            return False

    wait_until(answers, "nginx to proxy the queue", 30)
    return process, url


@pytest.mark.skipif(
    shutil.which("nginx") is None, reason="needs nginx (apt-get install nginx-light)"
)
def test_behind_nginx_clients_polling_through_a_queue_restart_are_all_served(tmp_path: Path):
    """The realistic case: the clients poll (through nginx) all along, the queue is killed
    and down for a few seconds, then restarted on its store."""
    started = time.monotonic()
    with Fleet(
        tmp_path / "fleet",
        queue="alone",
        targets={"linux": 3},
        settings={"api_cache_timeout": "1"},
    ) as fleet:
        queue, busy = queue_alone_all_busy(fleet)
        assert fleet.queue_port is not None
        nginx, url = start_nginx(tmp_path / "nginx", fleet.queue_port)
        in_order = start_in_order(fleet, tmp_path, RESTART_COUNTS, QUEUE_URL=url)
        clients = [(u, n, p) for (u, p), n in zip(in_order, RESTART_COUNTS, strict=True)]

        def reserved(n: int) -> bool:
            busy.watch.new()
            return len(busy.watch.seen) == n

        for _ in range(3):  # the first two entries (1 + 2 runners) are served and answered
            fleet.finish_job(busy.ids.popleft())
        wait_until(lambda: reserved(3), "the first two entries' runners to be reserved")
        for _, _, process in clients[:2]:
            assert client_outputs(process, CLIENT_DEADLINE)["is_self_hosted"] == "true"

        assert queue.kill() == -9
        for _ in range(2):  # freed while it is down
            fleet.finish_job(busy.ids.popleft())
        time.sleep(3)  # three polls of every waiting client meet nginx's empty 503
        assert all(process.poll() is None for _, _, process in clients[2:])
        queue.start()
        wait_until(lambda: reserved(5), "the two runners Idle at the restart to be reserved")
        for _ in range(3):
            fleet.finish_job(busy.ids.popleft())

        outcomes = [client_outputs(p, timeout=CLIENT_DEADLINE) for _, _, p in clients]
        assert reserved(sum(RESTART_COUNTS))
        for (unique_id, count, _), outputs in zip(clients, outcomes, strict=True):
            assert outputs["is_self_hosted"] == "true", outputs["stderr"]
            assert len(fleet.reserved_for(unique_id)) == count, unique_id
        assert sorted(busy.watch.seen.values()) == sorted(
            unique_id for unique_id, count, _ in clients for _ in range(count)
        )
        nginx.terminate()  # its master stops its workers
        nginx.wait()
        log = queue.log()
    assert "Traceback" not in log
    print(f"behind nginx: test {time.monotonic() - started:.1f} s")
