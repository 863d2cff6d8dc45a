"""The global queue on PostgreSQL with real processes (issue 14, "Must show", fourth point): two
`monitor queue` processes sharing one database (Debian's server, tests/postgres.sh) in front
of a fleet of three `monitor run` processes and the GitHub stand-in (tests/support/fleet.py);
50 re-created clients (tests/scripts/runner-select.sh) each enqueueing at one queue process
and polling the other, or the same, at random; the process that dispatches killed with
SIGKILL mid-burst. Then: every client that did not fall back was served exactly once, no
runner was reserved twice, none stays reserved for a client that fell back, and every client
whose entry reached the database and that polled the survivor was served.

And a PostgreSQL outage seen from HTTP: the take answers 503 with an empty body (the client
retries it) while the server is unreachable, and the queue recovers by itself.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from datetime import UTC
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.parse import urlunsplit

import pytest

from tests.support import postgres
from tests.support.configs import write_config
from tests.support.daemons import free_port
from tests.support.fleet import Fleet
from tests.support.fleet import Member
from tests.support.fleet import client_outputs
from tests.support.waiting import wait_until

pytestmark = pytest.mark.skipif(
    shutil.which("curl") is None or shutil.which("jq") is None,
    reason="runner-select.sh needs curl and jq (CI installs them)",
)

CLIENTS = 50
# Linux runners per member: 18 in all for about 60 wanted, so most entries wait in the
# database for runners freed over time (each served client's job runs and ends at once).
TARGET = 6
# The dispatching process is killed once this many clients are served (and entries it took
# in wait, polled at the other): entries are waiting, others being reserved, and clients are
# still starting.
KILL_AFTER_SERVED = 12
START_EVERY = 0.1  # seconds between two clients' starts: the burst lasts 5 s
MAX_RETRY_TIME = 120  # the clients' take retries (Servo's production pin: 3600)
# A monitor's own reserve timeout must not hide a runner the queue left reserved: only the
# queue's release (after the entry's 30 s expiry) may clear a fallen-back client's label.
RESERVE_TIMEOUT = 600


@pytest.fixture
def database() -> Iterator[tuple[str, str]]:
    """A fresh database: (its URL without the password, the password). `[queue]
    database_url` refuses a password in the URL; libpq reads it from PGPASSWORD."""
    postgres.require()
    with postgres.fresh_database() as url:
        parts = urlsplit(url)
        netloc = f"{parts.username}@{parts.hostname}:{parts.port}"
        yield urlunsplit(parts._replace(netloc=netloc)), parts.password or ""


class QueueProcess(Member):
    """`python -m monitor queue --config …` with its own config, port and log, the database
    password in its environment."""

    def __init__(self, name: str, root: Path, fleet: Fleet, database_url: str, password: str):
        super().__init__(-1, root, free_port(), command="queue")
        self.name = name
        self.password = password
        servers = ", ".join(json.dumps(member.url) for member in fleet.members)
        # Every client is of one repository: upstream's 30 tokenless requests a minute per
        # repository and process would refuse most of a 50-job burst.
        extra = (
            f"listen_port = {free_port()}\nselect_runner_rate_limit = 0\n"
            f"[queue]\nservers = [{servers}]\nlisten_port = {self.port}\n"
            f"database_url = {json.dumps(database_url)}\n"
        )
        self.config_path = write_config(
            root, github_api_url=fleet.standin.base_url, targets=fleet.targets, extra=extra
        )

    def start(self, env: Mapping[str, str] | None = None) -> None:
        super().start({"PGPASSWORD": self.password, **(env or {})})

    def health(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=5) as response:
                return json.loads(response.read())
        except (OSError, ValueError):
            return None

    def wait_ready(self, members: int) -> None:
        """Until its /healthz answers with every member fresh (enqueues are accepted)."""

        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"queue {self.name} exited:\n{self.log()}")
            health = self.health()
            return health is not None and health["fresh_members"] == members

        wait_until(ready, f"queue {self.name} to see its {members} members", 60, interval=0.2)

    def idle(self, profile: str, since: datetime) -> int | None:
        """The idle runners of `profile` on its members as the queue saw them; None unless
        it polled every member after `since`."""
        try:
            with urllib.request.urlopen(self.url + "/queue.json", timeout=5) as response:
                members = json.loads(response.read())["members"]
        except (OSError, ValueError):
            return None
        if any(
            not m["polled_at"] or datetime.fromisoformat(m["polled_at"]) <= since for m in members
        ):
            return None
        return sum(m["counts"].get(profile, {}).get("idle", 0) for m in members)

    @property
    def dispatching(self) -> bool:
        """Whether its engine ever took the dispatcher's lease (it logs it)."""
        return "dispatches now" in self.log()


@dataclass
class Client:
    index: int
    count: int
    enqueue_at: str  # queue process names
    take_at: str
    enqueued_file: Path
    process: subprocess.Popen[str] | None = None
    outputs: dict[str, str] = field(default_factory=dict)
    runners: list[int] = field(default_factory=list)  # stand-in runner ids, once served
    started_at: float = 0.0
    ended_at: float = 0.0

    @property
    def served(self) -> bool:
        return self.outputs.get("is_self_hosted") == "true"

    @property
    def enqueued(self) -> bool:
        return self.enqueued_file.exists()

    @property
    def unique_id(self) -> str:
        return self.outputs["unique_id"]

    def describe(self) -> str:
        return (
            f"client {self.index} (count {self.count}, enqueue at {self.enqueue_at}, take at "
            f"{self.take_at}):\n{self.outputs.get('stderr', '')}"
        )


def labels_now(fleet: Fleet) -> dict[int, list[str]]:
    """runner id -> its reserved-for labels, for every runner carrying one; fails at once on a
    runner carrying two."""
    found = {}
    for runner in fleet.reserved():
        labels = [label for label in runner["labels"] if label.startswith("reserved-for:")]
        assert len(labels) == 1, f"runner {runner['id']} reserved twice: {labels}"
        found[runner["id"]] = labels
    return found


def entries(database_url: str, password: str) -> dict[str, dict[str, Any]]:
    """The queue's rows: unique_id -> {state, reserved, answered}."""
    import psycopg2

    connection = psycopg2.connect(database_url, password=password, connect_timeout=3)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT unique_id, state, reserved, answered_at FROM queue_entry")
            rows = cursor.fetchall()
    finally:
        connection.close()
    return {
        row[0]: {"state": row[1], "reserved": json.loads(row[2]), "answered": row[3] is not None}
        for row in rows
    }


def test_two_queue_processes_one_killed_mid_burst(tmp_path: Path, database) -> None:
    database_url, password = database
    began = time.monotonic()
    with Fleet(
        tmp_path / "fleet",
        targets={"linux": TARGET},
        settings={"monitor_reserve_timeout": str(RESERVE_TIMEOUT)},
    ) as fleet:
        queues = {
            name: QueueProcess(name, tmp_path / name, fleet, database_url, password)
            for name in ("a", "b")
        }
        try:
            for queue in queues.values():
                queue.start()
            for queue in queues.values():
                queue.wait_ready(len(fleet.members))
            fleet.wait_idle()
            wait_until(
                lambda: any(q.dispatching for q in queues.values()), "a queue to dispatch", 30
            )
            # Kill the one that dispatches: the other must take over its lease and finish
            # the takes it left in flight.
            (doomed,) = (q for q in queues.values() if q.dispatching)
            (survivor,) = (q for q in queues.values() if q is not doomed)
            ready_at = time.monotonic()
            clients, killed_at = burst(fleet, queues, doomed, tmp_path)
            ended_at = time.monotonic()
            check_clients(clients, doomed.name, survivor.name, killed_at)
            served = [c for c in clients if c.served]
            fell_back = [c for c in clients if not c.served]

            # A fallen-back client's entry expires 30 s after its last poll (and, served
            # meanwhile, 30 s after being served); the queue then releases its runners.
            def none_left() -> bool:
                return not any(fleet.reserved_for(c.unique_id) for c in fell_back)

            wait_until(none_left, "no runner reserved for a client that fell back", 120, 0.5)
            released_at = time.monotonic()
            check_entries(entries(database_url, password), served, fell_back)
            assert survivor.dispatching
            assert survivor.process is not None and survivor.process.poll() is None
            code = survivor.stop()
            assert code == 0, survivor.log()
            assert "Traceback" not in survivor.log()
        finally:
            for queue in queues.values():
                queue.stop()
    print(
        f"\n{len(served)} served, {len(fell_back)} fell back; set-up"
        f" {ready_at - began:.1f} s, burst {ended_at - ready_at:.1f} s (kill at"
        f" {killed_at - ready_at:.1f} s), release {released_at - ended_at:.1f} s, in all"
        f" {time.monotonic() - began:.1f} s"
    )


def burst(
    fleet: Fleet, queues: dict[str, QueueProcess], doomed: QueueProcess, tmp_path: Path
) -> tuple[list[Client], float]:
    """Start the clients one every START_EVERY s, run the job of each served client as soon as
    it ends (its runners deregister, the members make new ones), and kill `doomed` once
    KILL_AFTER_SERVED are served. Returns the clients, all ended, and the time of the kill."""
    rng = random.Random(14)
    names = sorted(queues)
    clients = [
        Client(
            index=i,
            count=2 if i % 5 == 0 else 1,
            enqueue_at=rng.choice(names),
            take_at=rng.choice(names),
            enqueued_file=tmp_path / f"enqueued-{i}",
        )
        for i in range(CLIENTS)
    ]
    killed_at = 0.0
    waiting = list(clients)
    running: list[Client] = []
    next_start = time.monotonic()
    deadline = time.monotonic() + MAX_RETRY_TIME + 60
    while waiting or running:
        assert time.monotonic() < deadline, "the clients did not end"
        if waiting and time.monotonic() >= next_start:
            client = waiting.pop(0)
            client.process = fleet.start_client(
                "linux",
                client.count,
                max_retry_time=MAX_RETRY_TIME,
                QUEUE_URL=queues[client.enqueue_at].url,
                TAKE_QUEUE_URL=queues[client.take_at].url,
                ENQUEUED_FILE=str(client.enqueued_file),
            )
            client.started_at = time.monotonic()
            running.append(client)
            next_start += START_EVERY
        labels_now(fleet)
        for client in [c for c in running if c.process and c.process.poll() is not None]:
            running.remove(client)
            assert client.process is not None
            client.outputs = client_outputs(client.process)
            client.ended_at = time.monotonic()
            if client.served:
                reserved = fleet.reserved_for(client.unique_id)
                assert len(reserved) == client.count, client.describe()
                client.runners = [runner["id"] for runner in reserved]
                for runner_id in client.runners:  # its job runs and ends
                    fleet.set_busy(runner_id)
                    fleet.finish_job(runner_id)
        if not killed_at and ready_to_kill(clients, doomed.name):
            doomed.kill()
            killed_at = time.monotonic()
        time.sleep(0.05)
    assert killed_at, "the burst ended before the kill"
    return clients, killed_at


def ready_to_kill(clients: list[Client], doomed: str) -> bool:
    """KILL_AFTER_SERVED clients served, and entries that the doomed process took in wait
    for runners while their clients poll the other one (the survivor must serve them)."""
    handed_over = [
        c
        for c in clients
        if c.enqueue_at == doomed != c.take_at and c.enqueued and not c.outputs and c.process
    ]
    return sum(c.served for c in clients) >= KILL_AFTER_SERVED and len(handed_over) >= 2


def check_clients(clients: list[Client], doomed: str, survivor: str, killed_at: float) -> None:
    served = [c for c in clients if c.served]
    # No runner reserved twice: the served clients' runners are all different.
    runners = [runner for c in served for runner in c.runners]
    assert len(runners) == len(set(runners)), "a runner was given to two clients"
    # Every client whose entry reached the database and that polls the survivor is served,
    # wherever it enqueued (the killed process's entries live on in PostgreSQL).
    for client in clients:
        if client.take_at == survivor and client.enqueued:
            assert client.served, client.describe()
        if client.enqueue_at == client.take_at == survivor:
            assert client.enqueued and client.served, client.describe()
    # The kill mattered: clients polling the killed process fell back (a refused connection
    # is not retried), and the survivor served entries the killed one had taken in.
    assert any(not c.served and c.take_at == doomed for c in clients)
    assert any(
        c.served and c.enqueue_at == doomed and c.take_at == survivor and c.ended_at > killed_at
        for c in clients
    )


def check_entries(
    rows: dict[str, dict[str, Any]], served: list[Client], fell_back: list[Client]
) -> None:
    """The queue's own record agrees: each served client's entry is served and answered, with
    `count` runners none of which another served entry has; no fallen-back client's entry is
    served and answered (it expired, or never was)."""
    seen: dict[tuple[str, int], str] = {}
    for client in served:
        row = rows[client.unique_id]
        assert row["state"] == "served" and row["answered"], (row, client.describe())
        ids = [(url, runner) for url, runners in row["reserved"].items() for runner in runners]
        assert len(ids) == client.count, row
        for key in ids:
            assert key not in seen, f"runner {key} in the entries of {seen.get(key)} and of it"
            seen[key] = client.unique_id
    for client in fell_back:
        row = rows.get(client.unique_id)
        if row is not None:
            assert row["state"] != "served", (row, client.describe())


def test_postgresql_unreachable_is_a_503_with_an_empty_body_then_recovers(
    tmp_path: Path, database
) -> None:
    database_url, password = database
    proxy = postgres.Proxy(database_url)

    def netloc(port: int) -> str:
        return f"{urlsplit(database_url).username}@127.0.0.1:{port}"

    with Fleet(tmp_path / "fleet", members=1, targets={"linux": 1}) as fleet:
        through_proxy = urlunsplit(urlsplit(database_url)._replace(netloc=netloc(proxy.port)))
        queue = QueueProcess("a", tmp_path / "a", fleet, through_proxy, password)
        try:
            queue.start()
            queue.wait_ready(1)
            fleet.wait_idle()
            (busy,) = fleet.busy_all()
            # The member, then the queue, see it busy before anyone enqueues (else the queue
            # may have it reserved: a runner that a job keeps busy never had it).
            member = fleet.members[0]
            wait_until(lambda: member.counts()["linux"]["idle"] == 0, "the member to see it", 30)
            seen = datetime.now(UTC)
            wait_until(lambda: queue.idle("linux", since=seen) == 0, "the queue to see it", 30)
            # A client waits for a runner, polling once a second.
            enqueued = tmp_path / "enqueued"
            client = fleet.start_client(
                "linux", QUEUE_URL=queue.url, MAX_RETRY_TIME="120", ENQUEUED_FILE=str(enqueued)
            )
            wait_until(enqueued.exists, "the client to enqueue", 30)
            # And an entry of our own behind it, to look at the take's answers.
            unique_id = str(uuid.uuid4())
            run_id = fleet.new_run_id()
            fleet.upload_args(unique_id, run_id, "linux")
            status, _, token = post(
                queue.url,
                f"/enqueue?unique_id={unique_id}&qualified_repo=test/servo&run_id={run_id}",
            )
            assert status == 200, token
            take = f"/take/{unique_id}?token={token}"
            assert answer(queue.url, take) == (503, "")

            proxy.cut()
            status, headers, body = post(queue.url, take)
            assert (status, body) == (503, ""), body
            assert int(headers["Retry-After"]) >= 1
            status, _, body = post(queue.url, "/healthz", method="GET")
            assert status == 503 and "unreachable" in json.loads(body)["error"]
            time.sleep(3)  # longer than the lease and a few dispatcher cycles
            assert client.poll() is None, "the client gave up during the outage"

            proxy.restore()
            wait_until(lambda: queue.health() is not None, "the queue to answer again", 30)
            assert answer(queue.url, take) == (503, "")  # still waiting, not forgotten
            fleet.set_busy(busy)
            fleet.finish_job(busy)  # a runner frees: the client first in line gets it
            outputs = client_outputs(client, timeout=150)
            assert outputs["is_self_hosted"] == "true", outputs["stderr"]
            assert len(fleet.reserved_for(outputs["unique_id"])) == 1
            code = queue.stop()
            assert code == 0, queue.log()
            assert "Traceback" not in queue.log()
            assert "reachable again" in queue.log()
        finally:
            queue.stop()
            proxy.cut()


def answer(base: str, path: str) -> tuple[int, str]:
    status, _, body = post(base, path)
    return status, body


def post(base: str, path: str, method: str = "POST") -> tuple[int, dict[str, str], str]:
    request = urllib.request.Request(base + path, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read().decode()
