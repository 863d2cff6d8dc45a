"""tests/scripts/runner-select.sh, Servo's queue client re-created, on its own: run as bash
with curl and jq against a queue double (a small real HTTP server written here, answering
what each test scripts) and the real GitHub stand-in for the args artifact.

These tests pin the client's behaviour, which the queue's own tests then rely on: what it
sends, which answers it retries (and how long it waits), when it falls back, and the outputs.
The double checks nothing itself: it records and answers."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs
from urllib.parse import urlsplit

import pytest

from monitor.standin import GitHubStandIn
from tests.support.constants import GITHUB_TOKEN
from tests.support.constants import REPO
from tests.support.constants import ROOT
from tests.support.under_pytest import standin_fixtures

SCRIPT = ROOT / "tests" / "scripts" / "runner-select.sh"
RUN_ID = "14000000123"
FALLBACK_LABEL = "ubuntu-22.04"

pytestmark = pytest.mark.skipif(
    shutil.which("curl") is None or shutil.which("jq") is None,
    reason="runner-select.sh needs curl and jq (CI installs them)",
)

server, standin = standin_fixtures(GITHUB_TOKEN)


@dataclass
class Answer:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Seen:
    path: str
    query: dict[str, list[str]]
    body: bytes
    at: float
    # The args file of the run's artifact for this unique id, as the stand-in had it then.
    args: str | None = None


class QueueDouble:
    """`POST /enqueue` and `POST /take/<id>` answered from scripts: `enqueue` once, `takes`
    one after the other (the last one repeats). With `refuse_after_enqueue`, the listener is
    closed before the enqueue is answered, so the take finds the port refusing.

    One thread accepts and answers each connection in turn, so closing the listener from a
    handler races with nothing."""

    def __init__(self, standin: GitHubStandIn) -> None:
        self.standin = standin
        self.enqueue = Answer(200, b"t0kenURLsafe")
        self.takes = [Answer(200, b"1")]
        self.refuse_after_enqueue = False
        self.seen: list[Seen] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="queue-double", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        double = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - BaseHTTPRequestHandler's name
                split = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                seen = Seen(
                    split.path, parse_qs(split.query), self.rfile.read(length), time.monotonic()
                )
                if split.path == "/enqueue":
                    seen.args = double.args_file(seen.query["unique_id"][0])
                    answer = double.enqueue
                    if double.refuse_after_enqueue:
                        double.close()
                else:
                    index = sum(s.path.startswith("/take/") for s in double.seen)
                    answer = double.takes[min(index, len(double.takes) - 1)]
                double.seen.append(seen)
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                self.wfile.write(answer.body)

            def log_message(self, *args: object) -> None:
                pass

        while not self._closed:
            try:
                connection, address = self.listener.accept()
            except OSError:
                return
            with connection:
                Handler(connection, address, None)  # type: ignore[arg-type]

    def args_file(self, unique_id: str) -> str | None:
        """The first file of the run's args artifact for `unique_id`, downloaded as the queue
        does (list, then the redirect to blob storage, which takes no credentials)."""
        api = self.standin.base_url
        listing = urllib.request.Request(
            f"{api}/repos/{REPO}/actions/runs/{RUN_ID}/artifacts?per_page=100"
        )
        listing.add_unredirected_header("Authorization", f"Bearer {GITHUB_TOKEN}")
        with urllib.request.urlopen(listing, timeout=10) as response:
            artifacts = json.loads(response.read())["artifacts"]
        wanted = [a for a in artifacts if a["name"] == f"servo-ci-runners_{unique_id}"]
        if not wanted:
            return None
        download = urllib.request.Request(wanted[0]["archive_download_url"])
        download.add_unredirected_header("Authorization", f"Bearer {GITHUB_TOKEN}")
        with urllib.request.urlopen(download, timeout=10) as response:
            with zipfile.ZipFile(io.BytesIO(response.read())) as archive:
                return archive.read(archive.namelist()[0]).decode()

    @property
    def take_requests(self) -> list[Seen]:
        return [s for s in self.seen if s.path.startswith("/take/")]

    def close(self) -> None:
        self._closed = True
        self.listener.close()


@pytest.fixture
def queue(standin: GitHubStandIn) -> Iterator[QueueDouble]:
    double = QueueDouble(standin)
    yield double
    double.close()


@dataclass
class Run:
    outputs: list[str]
    github_output: list[str]
    stderr: str
    seconds: float

    @property
    def values(self) -> dict[str, str]:
        return dict(line.split("=", 1) for line in self.outputs)


def run_client(
    queue_url: str, standin: GitHubStandIn, tmp_path: Path, *, path: str | None = None, **env: str
) -> Run:
    output_file = tmp_path / "github_output"
    output_file.write_text("")
    environ = {
        "PATH": path or os.environ.get("PATH", "/usr/bin:/bin"),
        "QUEUE_URL": queue_url + "/",
        "QUALIFIED_REPO": REPO,
        "RUN_ID": RUN_ID,
        "SELF_HOSTED_PROFILE": "linux",
        "GITHUB_HOSTED_LABEL": FALLBACK_LABEL,
        "MAX_RETRY_TIME": "10",
        "GITHUB_API_URL": standin.base_url,
        "GITHUB_TOKEN": GITHUB_TOKEN,
        "GITHUB_OUTPUT": str(output_file),
        **env,
    }
    started = time.monotonic()
    result = subprocess.run(
        ["bash", str(SCRIPT)], env=environ, capture_output=True, text=True, timeout=120
    )
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return Run(
        result.stdout.splitlines(), output_file.read_text().splitlines(), result.stderr, seconds
    )


def self_hosted(unique_id: str, count: int = 1, profile: str = "linux") -> list[str]:
    indices = ",".join(str(n) for n in range(1, count + 1))
    return [
        f"unique_id={unique_id}",
        f"selected_runner_label=reserved-for:{unique_id}",
        f"selected_runner_count={count}",
        f"selected_runner_indices=[{indices}]",
        f"runner_type_label=self-hosted-image:{profile}",
        "is_self_hosted=true",
    ]


def fallback(unique_id: str, count: int = 1) -> list[str]:
    indices = ",".join(str(n) for n in range(1, count + 1))
    return [
        f"unique_id={unique_id}",
        f"selected_runner_label={FALLBACK_LABEL}",
        f"selected_runner_count={count}",
        f"selected_runner_indices=[{indices}]",
        "is_self_hosted=false",
    ]


def args_text(unique_id: str, count: int = 1, key: str = "self_hosted_image_name") -> str:
    return (
        f"unique_id={unique_id}\n{key}=linux\nself_hosted_runner_count={count}\n"
        f"qualified_repo={REPO}\nrun_id={RUN_ID}\n"
    )


# -- success ---------------------------------------------------------------------------------


def test_success_uploads_enqueues_takes_outputs_and_deletes_the_artifact(
    queue: QueueDouble, standin: GitHubStandIn, tmp_path: Path
):
    run = run_client(queue.url, standin, tmp_path)

    unique_id = run.values["unique_id"]
    assert uuid.UUID(unique_id).version == 4
    assert run.outputs == self_hosted(unique_id)
    assert run.github_output == run.outputs
    enqueue, take = queue.seen
    assert (enqueue.path, enqueue.body) == ("/enqueue", b"")
    assert enqueue.query == {"unique_id": [unique_id], "qualified_repo": [REPO], "run_id": [RUN_ID]}
    assert enqueue.args == args_text(unique_id)  # the artifact existed while the queue read it
    assert (take.path, take.query, take.body) == (
        f"/take/{unique_id}",
        {"token": ["t0kenURLsafe"]},
        b"",
    )
    assert standin.artifacts() == []  # deleted afterwards, over GitHub's REST API
    deletes = [r for r in standin.requests if r.method == "DELETE"]
    assert [(r.path.rsplit("/", 1)[0], r.status) for r in deletes] == [
        (f"/repos/{REPO}/actions/artifacts", 204)
    ]


def test_two_runners_with_the_self_hosted_profile_key(
    queue: QueueDouble, standin: GitHubStandIn, tmp_path: Path
):
    queue.takes = [Answer(200, b"2", {"Content-Type": "application/json"})]
    run = run_client(
        queue.url,
        standin,
        tmp_path,
        SELF_HOSTED_COUNT="2",
        ARGS_PROFILE_KEY="self_hosted_profile",
        UNIQUE_ID="c0ffee00-0000-4000-8000-000000000002",
    )

    assert run.outputs == self_hosted("c0ffee00-0000-4000-8000-000000000002", count=2)
    assert queue.seen[0].args == args_text(
        "c0ffee00-0000-4000-8000-000000000002", 2, key="self_hosted_profile"
    )


@pytest.mark.parametrize("body", [b"1", b"[1]", b'"yes"', b"{}"])
def test_any_json_but_null_and_false_is_success(
    queue: QueueDouble, standin: GitHubStandIn, tmp_path: Path, body: bytes
):
    queue.takes = [Answer(200, body)]
    run = run_client(queue.url, standin, tmp_path)
    assert run.values["is_self_hosted"] == "true"


@pytest.mark.parametrize("body", [b"null", b"false", b"not json", b"busy1"])
def test_a_falsy_or_unparsable_success_body_falls_back(
    queue: QueueDouble, standin: GitHubStandIn, tmp_path: Path, body: bytes
):
    queue.takes = [Answer(200, body)]
    run = run_client(queue.url, standin, tmp_path)
    assert run.outputs == fallback(run.values["unique_id"])
    assert standin.artifacts() == []


def test_an_empty_success_body_depends_on_jq_s_version(
    queue: QueueDouble, standin: GitHubStandIn, tmp_path: Path
):
    """`jq -e .` on empty input exits 0 in jq 1.6 (Debian 12, Ubuntu 22.04) and 4 in jq 1.7
    (Ubuntu 24.04, where Servo's runner-select runs): a queue must never answer a take 200
    with an empty body, or the same answer means success to one client and failure to
    another."""
    queue.takes = [Answer(200, b"")]
    version = subprocess.run(["jq", "--version"], capture_output=True, text=True).stdout.strip()
    run = run_client(queue.url, standin, tmp_path)
    expected = "true" if version == "jq-1.6" else "false"
    assert run.values["is_self_hosted"] == expected, version


def test_uuidgen_is_used_when_installed(queue: QueueDouble, standin: GitHubStandIn, tmp_path: Path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "uuidgen").write_text("#!/bin/sh\necho 5eed0000-0000-4000-8000-00000000abcd\n")
    (bin_dir / "uuidgen").chmod(0o755)
    path = f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}"

    run = run_client(queue.url, standin, tmp_path, path=path)

    assert run.values["unique_id"] == "5eed0000-0000-4000-8000-00000000abcd"


# -- retries ---------------------------------------------------------------------------------


def test_503_with_empty_body_is_retried_honouring_retry_after(
    queue: QueueDouble, standin: GitHubStandIn, tmp_path: Path
):
    queue.takes = [
        Answer(503, b"", {"Retry-After": "2"}),
        Answer(503),  # no Retry-After: --retry-delay's 1 s
        Answer(200, b"1"),
    ]
    run = run_client(queue.url, standin, tmp_path)

    assert run.outputs == self_hosted(run.values["unique_id"])
    first, second, third = (s.at for s in queue.take_requests)
    # Lower bounds only: curl waits at least this long (a slow machine waits longer).
    assert second - first >= 1.9
    assert third - second >= 0.9


@pytest.mark.parametrize("status", [408, 429, 500, 502, 504])
def test_other_transient_statuses_are_retried(
    queue: QueueDouble, standin: GitHubStandIn, tmp_path: Path, status: int
):
    queue.takes = [Answer(status), Answer(200, b"1")]
    run = run_client(queue.url, standin, tmp_path)
    assert run.values["is_self_hosted"] == "true"
    assert len(queue.take_requests) == 2


def test_a_retried_answer_with_a_body_spoils_the_success(
    queue: QueueDouble, standin: GitHubStandIn, tmp_path: Path
):
    """curl appends each failed attempt's body to the output, so after `busy` then `1` the
    file holds `busy1`, which `jq -e .` rejects: the queue's retried answers must be empty."""
    queue.takes = [Answer(503, b"busy"), Answer(200, b"1")]
    run = run_client(queue.url, standin, tmp_path)

    assert len(queue.take_requests) == 2
    assert run.outputs == fallback(run.values["unique_id"])
    assert "busy1" in run.stderr


@pytest.mark.parametrize("status", [403, 404])
def test_403_and_404_fall_back_at_once(
    queue: QueueDouble, standin: GitHubStandIn, tmp_path: Path, status: int
):
    queue.takes = [Answer(status, b'Not found: UniqueId("x")'), Answer(200, b"1")]
    run = run_client(queue.url, standin, tmp_path)

    assert len(queue.take_requests) == 1
    assert run.outputs == fallback(run.values["unique_id"])
    assert standin.artifacts() == []


def test_refused_connection_on_take_falls_back_at_once(
    queue: QueueDouble, standin: GitHubStandIn, tmp_path: Path
):
    queue.refuse_after_enqueue = True
    run = run_client(queue.url, standin, tmp_path, MAX_RETRY_TIME="30")

    assert [s.path for s in queue.seen] == ["/enqueue"]
    assert run.outputs == fallback(run.values["unique_id"])
    assert "Connection refused" in run.stderr or "Failed to connect" in run.stderr
    assert run.seconds < 20  # not retried for MAX_RETRY_TIME (30 s)
    assert standin.artifacts() == []


def test_retry_time_exhausted_falls_back(
    queue: QueueDouble, standin: GitHubStandIn, tmp_path: Path
):
    queue.takes = [Answer(503)]
    run = run_client(queue.url, standin, tmp_path, MAX_RETRY_TIME="3", GITHUB_HOSTED_COUNT="3")

    assert len(queue.take_requests) >= 2
    assert run.outputs == fallback(run.values["unique_id"], count=3)
    assert standin.artifacts() == []


def test_a_retry_after_beyond_the_retry_time_ends_the_retries(
    queue: QueueDouble, standin: GitHubStandIn, tmp_path: Path
):
    """curl gives up rather than wait past --retry-max-time: a queue's Retry-After must be
    shorter than its clients' retry time (upstream's 5 s is, against 900 s)."""
    queue.takes = [Answer(503, b"", {"Retry-After": "5"})]
    run = run_client(queue.url, standin, tmp_path, MAX_RETRY_TIME="3")

    assert len(queue.take_requests) == 1
    assert run.outputs == fallback(run.values["unique_id"])


# -- enqueue failures and the other fallbacks ------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body"),
    [(500, b"No args artifact found: servo-ci-runners_x"), (422, b'{"error": "bad"}'), (503, b"")],
)
def test_enqueue_error_falls_back_without_retry_or_take(
    queue: QueueDouble, standin: GitHubStandIn, tmp_path: Path, status: int, body: bytes
):
    queue.enqueue = Answer(status, body)
    run = run_client(queue.url, standin, tmp_path)

    assert [s.path for s in queue.seen] == ["/enqueue"]
    assert run.outputs == fallback(run.values["unique_id"])
    assert standin.artifacts() == []
    if body:
        assert body.decode() in run.stderr


def test_no_queue_listening_falls_back(queue: QueueDouble, standin: GitHubStandIn, tmp_path: Path):
    queue.close()
    run = run_client(queue.url, standin, tmp_path)
    assert run.outputs == fallback(run.values["unique_id"])
    assert standin.artifacts() == []


@pytest.mark.parametrize(
    "disabled", [{"FORCE_GITHUB_HOSTED": "true"}, {"NO_SELF_HOSTED_RUNNERS": "1"}]
)
def test_disabled_falls_back_before_uploading_or_asking(
    queue: QueueDouble, standin: GitHubStandIn, tmp_path: Path, disabled: dict[str, str]
):
    run = run_client(queue.url, standin, tmp_path, GITHUB_HOSTED_COUNT="2", **disabled)
    assert run.outputs == fallback(run.values["unique_id"], count=2)
    assert queue.seen == [] and standin.requests == []


def test_hooks_reach_the_queue_s_refusals(
    queue: QueueDouble, standin: GitHubStandIn, tmp_path: Path
):
    """The test hooks: no artifact, a stale one, another id or token for the take, and the
    file that says the client is enqueued."""
    enqueued = tmp_path / "enqueued"
    run = run_client(
        queue.url,
        standin,
        tmp_path,
        ARGS_ARTIFACT="none",
        TAKE_UNIQUE_ID="unknown",
        TAKE_TOKEN="wrong",
        ENQUEUED_FILE=str(enqueued),
    )
    unique_id = run.values["unique_id"]
    enqueue, take = queue.seen
    assert enqueue.args is None
    assert (take.path, take.query) == ("/take/unknown", {"token": ["wrong"]})
    assert enqueued.read_text() == f"{unique_id}\n"

    stale = "2024-01-02T03:04:05Z"
    captured: list[list[dict]] = []
    queue.enqueue = Answer(500, b"Args artifact is too old")
    original = queue.args_file

    def args_and_artifacts(unique_id: str) -> str | None:
        captured.append(standin.artifacts())
        return original(unique_id)

    queue.args_file = args_and_artifacts  # type: ignore[method-assign]
    run = run_client(queue.url, standin, tmp_path, ARGS_CREATED_AT=stale)
    ((artifact,),) = captured
    assert artifact["created_at"] == stale
    assert run.outputs == fallback(run.values["unique_id"])


def test_missing_inputs_fail_the_step(standin: GitHubStandIn, tmp_path: Path):
    result = subprocess.run(
        ["bash", str(SCRIPT)],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "QUEUE_URL is required" in result.stderr
