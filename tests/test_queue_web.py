"""The queue's HTTP edge (monitor/queue/web.py) as `serve_queue` serves it, over real sockets:
a hand-written engine (tests/support/queue_engine.py), the GitHub stand-in for tokenless
enqueues, and Servo's client steps run as curl and jq."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from monitor.errors import MonitorError
from monitor.errors import TransientError
from monitor.github import RestGitHub
from monitor.queue import service
from monitor.web import credentials_for
from tests.support.configs import config_for_test_driver
from tests.support.configs import write_config
from tests.support.constants import API_TOKEN
from tests.support.constants import GITHUB_TOKEN
from tests.support.constants import REPO
from tests.support.constants import ROOT
from tests.support.daemons import Daemon
from tests.support.daemons import clean_env
from tests.support.daemons import free_port
from tests.support.daemons import monitor
from tests.support.daemons import wait_for_json
from tests.support.queue_engine import FakeQueueEngine
from tests.support.served import Reply
from tests.support.served import args_file
from tests.support.served import publish_args
from tests.support.served import request
from tests.support.under_pytest import standin_fixtures

server, standin = standin_fixtures(GITHUB_TOKEN)
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
RUN = "77"


class Queue:
    def __init__(self, root: Path, standin, extra: str = "") -> None:
        self.port = free_port()
        table = f"[queue]\nservers = ['http://127.0.0.1:9']\nlisten_port = {self.port}\n"
        self.config = config_for_test_driver(root, standin.base_url, {"linux": 1}, extra + table)
        self.engine = FakeQueueEngine()
        github = RestGitHub(self.config.github_api_url, self.config.github_api_scope, GITHUB_TOKEN)
        credentials = credentials_for(self.config, ())
        self.service = service.serve_queue(
            self.config, self.engine, github=github, credentials=credentials
        )
        self.url = self.service.urls[0]

    def post(self, path: str, headers: dict[str, str] | None = None) -> Reply:
        return request(self.port, "POST", path, headers)

    def get(self, path: str) -> Reply:
        return request(self.port, "GET", path)


@pytest.fixture
def make_queue(tmp_path: Path, standin) -> Iterator:
    queues: list[Queue] = []

    def make(extra: str = "") -> Queue:
        queue = Queue(tmp_path, standin, extra)
        queues.append(queue)
        return queue

    yield make
    for queue in queues:
        queue.service.close()


@pytest.fixture
def queue(make_queue) -> Queue:
    return make_queue()


def params(unique_id: str, repo: str = REPO, run: str = RUN) -> str:
    return f"unique_id={unique_id}&qualified_repo={repo}&run_id={run}"


def error(reply: Reply, status: int) -> str:
    assert reply.status == status, (reply.status, reply.body)
    assert reply.content_type == "application/json"
    return reply.json["error"]


def assert_empty_retry(reply: Reply, status: int = 503) -> None:
    assert reply.status == status, (reply.status, reply.body)
    assert reply.body == b""
    assert int(reply.headers["retry-after"]) >= 1


def enqueued(queue: Queue, standin, *, content: str | None = None) -> tuple[str, str]:
    unique_id = str(uuid.uuid4())
    publish_args(standin, unique_id, RUN, content=content)
    reply = queue.post(f"/enqueue?{params(unique_id)}")
    assert reply.status == 200, reply.body
    return unique_id, reply.body.decode()


# The service -----------------------------------------------------------------------------


def test_serve_queue_starts_the_engine_and_close_stops_both(make_queue) -> None:
    queue = make_queue()
    assert queue.engine.started and not queue.engine.stopped
    assert queue.get("/healthz").status == 200

    queue.service.close()

    assert queue.engine.stopped
    with pytest.raises(OSError):
        queue.get("/healthz")


# Tokenless enqueue -------------------------------------------------------------------------


def test_tokenless_enqueue_answers_the_token_as_text(queue, standin) -> None:
    unique_id = str(uuid.uuid4())
    publish_args(standin, unique_id, RUN)

    reply = queue.post(f"/enqueue?{params(unique_id)}")

    assert reply.status == 200
    assert reply.content_type == "text/plain; charset=utf-8"
    token = reply.body.decode()
    assert token == queue.engine.tokens[unique_id]  # the whole body, no newline
    assert ("enqueue", (unique_id, "linux", 1, REPO, RUN, None)) in queue.engine.calls
    assert "x-ratelimit-remaining" in reply.headers


def test_the_artifact_may_say_self_hosted_profile_and_a_count(queue, standin) -> None:
    unique_id = str(uuid.uuid4())
    content = (
        f"unique_id={unique_id}\nself_hosted_profile=linux\nself_hosted_runner_count=2\n"
        f"qualified_repo={REPO}\nrun_id={RUN}\n"
    )
    enqueued_id, _ = unique_id, publish_args(standin, unique_id, RUN, content=content)

    assert queue.post(f"/enqueue?{params(enqueued_id)}").status == 200
    assert queue.engine.entries[unique_id].count == 2


@pytest.mark.parametrize(
    ("case", "status", "message"),
    [
        ("no artifact", 403, "No args artifact found"),
        ("other repo", 403, "Not allowed on this qualified_repo"),
        ("count 0", 403, "Bad self_hosted_runner_count in artifact: 0"),
        ("count 33", 403, "Bad self_hosted_runner_count in artifact: 33"),
        ("unknown profile", 422, "Request for profile not satisfiable"),
        ("bad uuid", 422, "unique_id must be a UUID"),
        ("bad run", 422, "run_id must be a number"),
    ],
)
def test_tokenless_refusals(queue, standin, case: str, status: int, message: str) -> None:
    unique_id = str(uuid.uuid4())
    query = params(unique_id)
    lines = args_file(unique_id, REPO, RUN)
    if case == "other repo":
        query = params(unique_id, repo="elsewhere/servo")
    elif case.startswith("count"):
        lines += f"self_hosted_runner_count={case.split()[1]}\n"
    elif case == "unknown profile":
        lines = args_file(unique_id, REPO, RUN, image="macos")
    elif case == "bad uuid":
        query = params("not-a-uuid")
    elif case == "bad run":
        query = params(unique_id, run="12a")
    if case != "no artifact":
        publish_args(standin, unique_id, RUN, content=lines)

    reply = queue.post(f"/enqueue?{query}")

    assert message in error(reply, status)
    assert unique_id not in queue.engine.tokens


def test_the_same_unique_id_twice_is_409(queue, standin) -> None:
    unique_id, _ = enqueued(queue, standin)

    assert "Already in queue" in error(queue.post(f"/enqueue?{params(unique_id)}"), 409)


def test_tokenless_enqueues_are_limited_per_repository(make_queue, standin) -> None:
    queue = make_queue("select_runner_rate_limit = 2\n")
    for _ in range(2):
        enqueued(queue, standin)
    unique_id = str(uuid.uuid4())
    publish_args(standin, unique_id, RUN)

    reply = queue.post(f"/enqueue?{params(unique_id)}")

    assert "too many tokenless enqueues for test/servo" in error(reply, 429)
    assert int(reply.headers["retry-after"]) >= 1
    assert reply.headers["x-ratelimit-remaining"] == "0"


# Authenticated enqueue ---------------------------------------------------------------------


def test_authenticated_enqueue_with_count_and_priority(queue) -> None:
    unique_id = str(uuid.uuid4())

    reply = queue.post(f"/profile/linux/enqueue/3?{params(unique_id)}&priority=-5", AUTH)

    assert reply.status == 200 and reply.body.decode() == queue.engine.tokens[unique_id]
    assert ("enqueue", (unique_id, "linux", 3, REPO, RUN, -5)) in queue.engine.calls
    other = str(uuid.uuid4())
    assert queue.post(f"/profile/linux/enqueue?{params(other)}", AUTH).status == 200
    assert ("enqueue", (other, "linux", 1, REPO, RUN, None)) in queue.engine.calls


@pytest.mark.parametrize(
    ("path", "headers", "status", "message"),
    [
        ("/profile/linux/enqueue?{q}", {}, 401, "Authorization: Bearer"),
        ("/profile/linux/enqueue?{q}", {"Authorization": "Bearer no"}, 403, "wrong"),
        ("/profile/linux/enqueue/0?{q}", AUTH, 422, "count must be 1 to 32"),
        ("/profile/linux/enqueue/x?{q}", AUTH, 422, "count must be a number"),
        ("/profile/linux/enqueue?{q}&priority=high", AUTH, 422, "priority must be an integer"),
        ("/profile/linux/enqueue?{q}&priority=2000000", AUTH, 422, "priority must be an"),
        ("/profile/linux/enqueue?{q}&priority=1&priority=2", AUTH, 422, "may be given once"),
        ("/profile/linux/enqueue?unique_id=x", AUTH, 422, "missing query parameter"),
        ("/profile/" + "k" * 101 + "/enqueue?{q}", AUTH, 422, "longer than 100"),
    ],
)
def test_authenticated_refusals(queue, path, headers, status, message) -> None:
    reply = queue.post(path.format(q=params(str(uuid.uuid4()))), headers)

    assert message in error(reply, status)
    assert not queue.engine.tokens


# Take --------------------------------------------------------------------------------------


def test_take_answers_as_upstream(queue, standin) -> None:
    unique_id, token = enqueued(queue, standin)
    take = f"/take/{unique_id}?token={token}"

    assert_empty_retry(queue.post(take))  # waiting
    queue.engine.free("linux", 1)
    served = queue.post(take)
    assert (served.status, served.content_type, served.body) == (200, "application/json", b"1")
    assert queue.post(take).body == b"1"  # and again, the same

    assert "Bad token" in error(queue.post(f"/take/{unique_id}?token={token}x"), 403)
    assert "Bad token" in error(queue.post(f"/take/{unique_id}?token={'a' * 200}"), 403)
    assert "Not found" in error(queue.post(f"/take/{uuid.uuid4()}?token={token}"), 404)
    assert "unique_id must be a UUID" in error(queue.post(f"/take/x?token={token}"), 422)
    assert "missing query parameter token" in error(queue.post(f"/take/{unique_id}"), 422)


@pytest.mark.parametrize(
    ("failure", "status"),
    [
        (TransientError("store unreachable", retry_after=2.5), 503),
        (MonitorError("store unreachable", 503), 503),
        (MonitorError("slow", 504), 504),
        (MonitorError("busy", 429, {"Retry-After": "7"}), 429),
        (RuntimeError("a bug"), 500),
    ],
)
def test_every_retried_take_answer_has_an_empty_body(queue, standin, failure, status) -> None:
    unique_id, token = enqueued(queue, standin)
    queue.engine.fail_next("poll", failure)

    reply = queue.post(f"/take/{unique_id}?token={token}")

    assert reply.status == status and reply.body == b""
    if status == 429:
        assert reply.headers["retry-after"] == "7"
    if isinstance(failure, TransientError):
        assert reply.headers["retry-after"] == "3"  # whole seconds, rounded up


def test_the_client_gets_its_count_after_retries(queue, standin) -> None:
    """Servo's runner-select steps as curl and jq: enqueue, then take with --retry while the
    engine first has no runner, then fails once, then serves; what curl wrote is only the
    last attempt's body."""
    unique_id = str(uuid.uuid4())
    publish_args(standin, unique_id, RUN)
    curl = ["curl", "-sS", "--fail-with-body", "--connect-timeout", "5", "--max-time", "30"]
    token = subprocess.run(
        [*curl, "-X", "POST", f"{queue.url}/enqueue?{params(unique_id)}"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout

    def later() -> None:
        deadline = time.monotonic() + 30
        while queue.engine.polls.get(unique_id, 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        queue.engine.fail_next("poll", MonitorError("store unreachable", 503))
        queue.engine.free("linux", 1)

    helper = threading.Thread(target=later)
    helper.start()
    retry = ["--retry", "900", "--retry-delay", "1", "--retry-max-time", "900"]
    # To stdout, as `$(curl …)` in the action: every attempt's body is appended there.
    taken = subprocess.run(
        [*curl, *retry, "-X", "POST", f"{queue.url}/take/{unique_id}?token={token}"],
        capture_output=True,
        timeout=120,
    )
    helper.join()

    assert taken.returncode == 0, taken.stderr
    assert taken.stdout == b"1"
    jq = subprocess.run(["jq", "-e", "."], input=taken.stdout, capture_output=True)
    assert jq.returncode == 0
    assert queue.engine.polls[unique_id] >= 3


# Status and the edge -----------------------------------------------------------------------


def test_dashboard_and_healthz(queue, standin) -> None:
    unique_id, _ = enqueued(queue, standin)

    text = queue.get("/dashboard.txt")
    assert text.status == 200 and text.content_type == "text/plain; charset=utf-8"
    assert unique_id in text.body.decode() and ">>> servers" in text.body.decode()
    health = queue.get("/healthz")
    assert health.json == {
        "taken_at": health.json["taken_at"],
        "entries": 1,
        "members": 1,
        "fresh_members": 1,
    }

    queue.engine.fail_next("snapshot", MonitorError("store unreachable", 503))
    down = queue.get("/healthz")
    assert "store unreachable" in error(down, 503)
    assert down.headers["retry-after"] == "5"


def test_the_edge_is_the_monitors(queue) -> None:
    missing = queue.get("/nope")
    assert error(missing, 404) == "Not found"
    assert missing.headers["x-content-type-options"] == "nosniff"
    wrong_method = queue.get(f"/take/{uuid.uuid4()}?token=x")
    assert error(wrong_method, 405) == "Method not allowed"
    assert "POST" in wrong_method.headers["allow"]
    body = request(
        queue.port, "POST", "/enqueue?x", {"Content-Length": "5000", "Content-Type": "text/plain"}
    )
    assert body.status == 413


# `monitor queue` and `monitor run` as processes ----------------------------------------------

# `main.run_queue` / `main.run` in a process of its own with the hand-written engine (the real
# one is monitor/queue/engine.py; `python -m monitor` uses it), reporting whether libvirt's
# binding was ever imported.
_CHILD = """
import os, sys
from pathlib import Path
from monitor import logs, main
from tests.support.queue_engine import FakeQueueEngine
logs.setup_logging(os.environ)
config = main.load_config(Path(sys.argv[2]))
factory = lambda config: FakeQueueEngine()
if sys.argv[1] == "queue":
    code = main.run_queue(config, engine_factory=factory)
else:
    code = main.run(config, engine_factory=factory)
print("libvirt imported:", "libvirt" in sys.modules, flush=True)
sys.exit(code)
"""


def queue_config(root: Path, standin, extra: str = "") -> tuple[Path, int, int]:
    """A config with a [queue] table on free ports: (path, monitor port, queue port)."""

    port, queue_port = free_port(), free_port()
    path = write_config(
        root,
        github_api_url=standin.base_url,
        targets={"linux": 1},
        extra=f"listen_port = {port}\n{extra}[queue]\nservers = ['http://127.0.0.1:{port}']\n"
        f"listen_port = {queue_port}\n",
    )
    return path, port, queue_port


def child(command: str, path: Path) -> subprocess.Popen:

    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, command, str(path)],
        cwd=path.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**clean_env(), "PYTHONPATH": str(ROOT)},
    )


def stop(process: subprocess.Popen) -> tuple[int, str]:

    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=30)
    return process.returncode, output


def test_monitor_queue_serves_the_queue_alone_without_libvirt(tmp_path: Path, standin) -> None:

    # libvirt_uri names a socket that does not exist: connecting would fail loudly.
    path, port, queue_port = queue_config(tmp_path, standin)
    text = path.read_text().replace('libvirt_uri = "test:///default"', "")
    path.write_text('libvirt_uri = "qemu+unix:///system?socket=/nonexistent"\n' + text)
    process = child("queue", path)
    try:
        health = wait_for_json(f"http://127.0.0.1:{queue_port}/healthz", time.monotonic() + 30)
        assert health["entries"] == 0
        unique_id = str(uuid.uuid4())
        publish_args(standin, unique_id, RUN)
        reply = request(queue_port, "POST", f"/enqueue?{params(unique_id)}")
        assert reply.status == 200 and reply.body
        with pytest.raises(OSError):  # no monitor: nothing on its port
            request(port, "GET", "/healthz")
    finally:
        code, output = stop(process)
    assert code == 0, output
    assert "libvirt imported: False" in output
    assert "Traceback" not in output and "stopped" in output


def test_monitor_run_serves_the_queue_beside_the_monitor(tmp_path: Path, standin) -> None:

    path, port, queue_port = queue_config(tmp_path, standin)
    process = child("run", path)
    try:
        deadline = time.monotonic() + 30
        wait_for_json(f"http://127.0.0.1:{port}/healthz", deadline)
        assert wait_for_json(f"http://127.0.0.1:{queue_port}/healthz", deadline)["members"] == 1
    finally:
        code, output = stop(process)
    assert code == 0, output
    assert "stopping the queue" in output and "Traceback" not in output


def test_monitor_queue_needs_a_queue_table(tmp_path: Path) -> None:

    path = write_config(tmp_path)

    done = monitor("queue", "--config", str(path))

    assert done.returncode == 2
    assert "[queue]: required table is missing" in done.stderr + done.stdout


def test_a_queue_port_in_use_is_reported(tmp_path: Path, standin) -> None:

    path, _, queue_port = queue_config(tmp_path, standin)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", queue_port))
        taken.listen(1)
        process = child("queue", path)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 1, output
    assert f"cannot serve the queue on port {queue_port}" in output


def test_python_m_monitor_queue_with_the_real_engine(tmp_path: Path, standin) -> None:
    """`monitor queue` as deployed: the real engine over SQLite under data_path."""
    pytest.importorskip("monitor.queue.engine", reason="the engine (qcore) is not merged yet")

    path, _, queue_port = queue_config(tmp_path, standin)
    with Daemon("queue", "--config", str(path), cwd=tmp_path) as daemon:
        wait_for_json(f"http://127.0.0.1:{queue_port}/healthz", time.monotonic() + 30)
        reply = request(queue_port, "POST", f"/take/{uuid.uuid4()}?token=x")
        assert reply.status == 404
        code, output = daemon.terminate()
    assert code == 0, output
    assert (tmp_path / "data" / "queue.sqlite3").exists()
