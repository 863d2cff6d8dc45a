"""`RestGitHub` against a real `GitHubStandIn` over HTTP (no mocks between them)."""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import logging
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
import zipfile
from collections.abc import Iterator
from datetime import UTC
from datetime import datetime
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from openapi_schema_validator import OAS30Validator

from monitor.errors import MonitorError
from monitor.errors import TransientError
from monitor.github import MAX_DOWNLOAD_BYTES
from monitor.github import Artifact
from monitor.github import GitHub
from monitor.github import GitHubRefused
from monitor.github import JitConfig
from monitor.github import RestGitHub
from monitor.policy import Registration
from monitor.standin import GitHubStandIn
from tests.fakes import FakeGitHub
from tests.support.under_pytest import standin_fixtures

TOKEN = "ghp_testtoken0123456789abcdefSECRET"
SCOPE = "/repos/servo/servo"
SPEC = json.loads((Path(__file__).parent / "fixtures" / "github-openapi-subset.json").read_text())
PATHS = SPEC["paths"]


def request_schema(path: str, method: str) -> dict[str, Any]:
    return PATHS[path][method]["requestBody"]["content"]["application/json"]["schema"]


server, standin = standin_fixtures(TOKEN)


@pytest.fixture
def github(standin: GitHubStandIn) -> RestGitHub:
    return RestGitHub(standin.base_url, SCOPE, TOKEN, timeout=2.0)


def counted(standin: GitHubStandIn, status: int | None = None) -> int:
    return sum(1 for r in standin.requests if status is None or r.status == status)


def test_satisfies_protocol(github: RestGitHub):
    client: GitHub = github
    assert client.rate_limit is None
    assert client.api_calls == {}
    # Every member of the Protocol, on the client and on the unit tests' fake.
    assert isinstance(github, GitHub)
    assert isinstance(FakeGitHub(), GitHub)


@pytest.mark.parametrize("scope", ["/repos/servo/servo", "/orgs/servo"])
def test_list_runners_parses_registrations(standin: GitHubStandIn, scope: str):
    other = "/orgs/servo" if scope.startswith("/repos") else "/repos/servo/servo"
    first = standin.add_runner(scope, "ci-runner-a.1@ci0", ["self-hosted", "X64", "a"])
    standin.add_runner(other, "elsewhere.2@ci0")
    standin.set_status(first, "online")
    standin.set_busy(first, True)

    runners = RestGitHub(standin.base_url, scope, TOKEN).list_runners()

    assert runners == [
        Registration(first, "ci-runner-a.1@ci0", "online", True, ("self-hosted", "X64", "a"))
    ]


def test_list_runners_follows_every_page(standin: GitHubStandIn, github: RestGitHub):
    ids = [standin.add_runner(SCOPE, f"ci-runner-x.{n}@ci0") for n in range(250)]

    runners = github.list_runners()

    assert [r.id for r in runners] == ids
    assert [r.path for r in standin.requests] == [f"{SCOPE}/actions/runners"] * 3


def test_list_runners_reuses_pages_on_304(standin: GitHubStandIn, github: RestGitHub):
    for n in range(150):
        standin.add_runner(SCOPE, f"ci-runner-x.{n}@ci0")
    first = github.list_runners()
    assert github.rate_limit is not None
    remaining = github.rate_limit.remaining

    second = github.list_runners()

    assert second == first
    # Both pages came back 304 and did not count against the rate limit.
    assert [r.status for r in standin.requests] == [200, 200, 304, 304]
    assert github.rate_limit.remaining == remaining


def test_list_runners_sees_changes_despite_cache(standin: GitHubStandIn, github: RestGitHub):
    runner_id = standin.add_runner(SCOPE, "ci-runner-x.1@ci0")
    assert github.list_runners()[0].status == "offline"
    standin.set_status(runner_id, "online")

    assert github.list_runners()[0].status == "online"
    assert [r.status for r in standin.requests] == [200, 200]


def test_list_runners_when_pool_shrinks(standin: GitHubStandIn, github: RestGitHub):
    ids = [standin.add_runner(SCOPE, f"ci-runner-x.{n}@ci0") for n in range(120)]
    assert len(github.list_runners()) == 120
    for runner_id in ids[:30]:
        standin.finish_job(runner_id)

    assert [r.id for r in github.list_runners()] == ids[30:]


def test_generate_jitconfig(standin: GitHubStandIn, github: RestGitHub):
    jit = github.generate_jitconfig(
        "ci-runner-linux.7@ci0", ["self-hosted", "X64", "servo-ubuntu2204"], work_folder="w"
    )

    assert isinstance(jit, JitConfig)
    assert jit.registration.name == "ci-runner-linux.7@ci0"
    assert jit.registration.status == "offline" and not jit.registration.busy
    assert jit.registration.labels == ("self-hosted", "X64", "servo-ubuntu2204")
    assert jit.encoded_jit_config and jit.encoded_jit_config not in repr(jit)
    assert standin.jit_names == ["ci-runner-linux.7@ci0"]
    method, path, body = standin.request_bodies[-1]
    assert (method, path) == ("POST", f"{SCOPE}/actions/runners/generate-jitconfig")
    assert body == {
        "name": "ci-runner-linux.7@ci0",
        "runner_group_id": 1,
        "labels": ["self-hosted", "X64", "servo-ubuntu2204"],
        "work_folder": "w",
    }
    schema = request_schema("/repos/{owner}/{repo}/actions/runners/generate-jitconfig", "post")
    OAS30Validator(schema).validate(body)


def test_generate_jitconfig_duplicate_name_is_502(standin: GitHubStandIn, github: RestGitHub):
    github.generate_jitconfig("ci-runner-linux.7@ci0", ["self-hosted"])

    with pytest.raises(MonitorError) as raised:
        github.generate_jitconfig("ci-runner-linux.7@ci0", ["self-hosted"])

    assert not isinstance(raised.value, TransientError)
    assert raised.value.status == 502
    assert str(raised.value).startswith(
        f"GitHub POST {SCOPE}/actions/runners/generate-jitconfig: 409 Already exists"
    )


def test_generate_jitconfig_invalid_body_is_502(github: RestGitHub):
    with pytest.raises(MonitorError) as raised:
        github.generate_jitconfig("ci-runner-linux.8@ci0", [])

    assert not isinstance(raised.value, TransientError)
    assert raised.value.status == 502
    assert ": 422 Invalid request" in str(raised.value)


def test_add_labels_reserves(standin: GitHubStandIn, github: RestGitHub):
    jit = github.generate_jitconfig("ci-runner-linux.7@ci0", ["self-hosted", "X64", "linux"])
    reservation = [
        "reserved-for:abc",
        "reserved-since:1700000000",
        "reserved-by:a/b/actions/runs/9",
    ]

    labels = github.add_labels(jit.registration.id, reservation)

    assert labels == ("self-hosted", "X64", "linux", *reservation)
    assert github.list_runners()[0].labels == labels
    method, path, body = standin.request_bodies[-1]
    assert (method, body) == ("POST", {"labels": reservation})
    schema = request_schema("/repos/{owner}/{repo}/actions/runners/{runner_id}/labels", "post")
    OAS30Validator(schema).validate(body)


def test_remove_label_undoes_a_reservation_label(standin: GitHubStandIn, github: RestGitHub):
    jit = github.generate_jitconfig("ci-runner-linux.8@ci0", ["self-hosted", "X64", "linux"])
    github.add_labels(jit.registration.id, ["reserved-for:abc/../x", "reserved-since:1"])

    assert github.remove_label(jit.registration.id, "reserved-for:abc/../x") is True
    assert github.remove_label(jit.registration.id, "reserved-since:1") is True
    assert github.remove_label(jit.registration.id, "reserved-since:1") is False  # gone: 404
    assert github.list_runners()[0].labels == ("self-hosted", "X64", "linux")


def test_add_labels_unknown_runner_is_502(github: RestGitHub):
    with pytest.raises(GitHubRefused) as raised:
        github.add_labels(1, ["reserved-for:x"])
    assert raised.value.status == 502 and ": 404 Not Found" in str(raised.value)
    assert (raised.value.github_status, raised.value.github_message) == (404, "Not Found")


def test_delete_runner(standin: GitHubStandIn, github: RestGitHub):
    runner_id = standin.add_runner(SCOPE, "ci-runner-x.1@ci0")

    assert github.delete_runner(runner_id) is True
    assert standin.runners() == []
    assert github.delete_runner(runner_id) is False


@pytest.mark.parametrize("scope", ["/repos/servo/servo", "/orgs/servo"])
def test_get_runner_asks_github_afresh_about_one_runner(standin: GitHubStandIn, scope: str):
    github = RestGitHub(standin.base_url, scope, TOKEN)
    runner_id = standin.add_runner(scope, "ci-runner-a.1@ci0", ["self-hosted", "X64"])
    standin.set_status(runner_id, "online")
    assert github.get_runner(runner_id) == Registration(
        runner_id, "ci-runner-a.1@ci0", "online", False, ("self-hosted", "X64")
    )
    standin.set_busy(runner_id, True)

    # Asked again at once: GitHub's answer now, not an ETag'd copy of the last one.
    fresh = github.get_runner(runner_id)

    assert fresh is not None and fresh.busy
    spec_path = scope.replace("servo/servo", "{owner}/{repo}").replace("servo", "{org}")
    assert "get" in PATHS[spec_path + "/actions/runners/{runner_id}"]
    assert [(r.method, r.path, r.status) for r in standin.requests] == [
        ("GET", f"{scope}/actions/runners/{runner_id}", 200)
    ] * 2
    standin.finish_job(runner_id)
    assert github.get_runner(runner_id) is None  # gone: 404


def test_get_runner_failures_are_errors_not_answers(standin: GitHubStandIn, github: RestGitHub):
    runner_id = standin.add_runner(SCOPE, "ci-runner-a.1@ci0")
    standin.inject_fault(503, retry_after=4)
    with pytest.raises(TransientError) as raised:
        github.get_runner(runner_id)
    assert raised.value.retry_after == 4.0
    standin.inject_fault(None, body='{"id": 1}')
    with pytest.raises(MonitorError) as malformed:
        github.get_runner(runner_id)
    assert malformed.value.status == 502


def test_list_artifacts_every_page(standin: GitHubStandIn, github: RestGitHub):
    base = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    for n in range(150):
        standin.add_artifact("servo/servo", "42", f"a{n}", {"f": "x"}, base + timedelta(seconds=n))
    standin.add_artifact("servo/servo", "43", "other-run", {"f": "x"})

    artifacts = github.list_artifacts("servo/servo", "42")

    assert len(artifacts) == 150
    assert {a.name for a in artifacts} == {f"a{n}" for n in range(150)}
    assert all(isinstance(a, Artifact) and not a.expired for a in artifacts)
    newest = max(artifacts, key=lambda a: a.created_at)
    assert newest.created_at == base + timedelta(seconds=149)
    assert newest.created_at.tzinfo is not None and newest.created_at.utcoffset() == timedelta(0)
    assert counted(standin) == 2


def test_list_artifacts_by_name_is_one_call(standin: GitHubStandIn, github: RestGitHub):
    for n in range(150):
        standin.add_artifact("servo/servo", "42", f"a{n}", {"f": "x"})
    standin.add_artifact("servo/servo", "42", "a&name=a1", {"f": "x"})

    assert [a.name for a in github.list_artifacts("servo/servo", "42", name="a7")] == ["a7"]
    quoted = github.list_artifacts("servo/servo", "42", name="a&name=a1")
    assert [a.name for a in quoted] == ["a&name=a1"]
    assert github.list_artifacts("servo/servo", "42", name="none") == []
    assert counted(standin) == 3


def test_workflow_run_status(standin: GitHubStandIn, github: RestGitHub):
    assert github.workflow_run_status("servo/servo", "42") == ("in_progress", None)
    standin.set_run_status("servo/servo", 42, "completed", "cancelled")
    assert github.workflow_run_status("servo/servo", "42") == ("completed", "cancelled")
    with pytest.raises(MonitorError):
        github.workflow_run_status("servo/../x", "42")
    with pytest.raises(MonitorError):
        github.workflow_run_status("servo/servo", "42/../../x")


@pytest.mark.parametrize(
    ("qualified_repo", "run_id"),
    [("servo", "1"), ("servo/../../user", "1"), ("servo/..", "1"), ("a/b/c", "1"), ("a/b", "1x")],
)
def test_list_artifacts_rejects_unsafe_input(
    standin: GitHubStandIn, github: RestGitHub, qualified_repo: str, run_id: str
):
    with pytest.raises(MonitorError):
        github.list_artifacts(qualified_repo, run_id)
    assert standin.requests == []


def test_download_artifact_follows_redirect_without_leaking_token(
    standin: GitHubStandIn, github: RestGitHub
):
    args = "unique_id=u\nqualified_repo=servo/servo\nrun_id=42\n"
    standin.add_artifact("servo/servo", "42", "servo-ci-runners_u", {"args": args, "x": "y"})
    (artifact,) = github.list_artifacts("servo/servo", "42")

    data = github.download_artifact(artifact.archive_download_url)

    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        first = archive.infolist()[0]
        assert first.filename == "args"
        assert archive.read(first).decode() == args
    assert [r.status for r in standin.requests][-2:] == [302, 200]
    # The blob host is another host name: the client must not have sent the token there.
    assert standin.blob_requests_with_authorization == []


def test_download_expired_artifact_is_502(standin: GitHubStandIn, github: RestGitHub):
    standin.add_artifact("servo/servo", "42", "old", {"args": ""}, expired=True)
    (artifact,) = github.list_artifacts("servo/servo", "42")
    assert artifact.expired

    with pytest.raises(MonitorError) as raised:
        github.download_artifact(artifact.archive_download_url)
    assert raised.value.status == 502 and ": 410 " in str(raised.value)


def test_rate_limit_tracks_headers(github: RestGitHub):
    assert github.rate_limit is None
    github.list_runners()
    first = github.rate_limit
    github.delete_runner(12345)

    assert first is not None and github.rate_limit is not None
    assert (first.limit, first.remaining, first.used, first.resource) == (5000, 4999, 1, "core")
    assert github.rate_limit.remaining == 4998 and github.rate_limit.used == 2
    assert first.reset_at > datetime.now(UTC)


@pytest.mark.parametrize(
    ("fault", "retry_after"),
    [
        ({"status": 500}, None),
        ({"status": 502, "retry_after": 3}, 3.0),
        ({"status": 503}, None),
        ({"status": 429, "retry_after": 7}, 7.0),
        ({"status": 403, "retry_after": 11}, 11.0),
    ],
)
def test_server_and_rate_limit_errors_are_transient(
    standin: GitHubStandIn, github: RestGitHub, fault: dict[str, Any], retry_after: float | None
):
    standin.inject_fault(**fault)

    with pytest.raises(TransientError) as raised:
        github.list_runners()

    assert raised.value.retry_after == retry_after
    assert f": {fault['status']} " in str(raised.value)
    assert github.list_runners() == []  # the fault was one-shot


def test_rate_limit_403_without_retry_after_waits_until_reset(
    standin: GitHubStandIn, github: RestGitHub
):
    standin.inject_fault(403)

    with pytest.raises(TransientError) as raised:
        github.list_runners()

    assert github.rate_limit is not None and github.rate_limit.remaining == 0
    expected = (github.rate_limit.reset_at - datetime.now(UTC)).total_seconds()
    assert raised.value.retry_after is not None
    assert abs(raised.value.retry_after - expected) < 5


def test_exhausted_rate_limit_is_transient():
    standin = GitHubStandIn(token=TOKEN, rate_limit=2)
    github = RestGitHub(standin.start(), SCOPE, TOKEN)
    try:
        github.delete_runner(1)
        github.delete_runner(1)
        with pytest.raises(TransientError) as raised:
            github.delete_runner(1)
    finally:
        standin.stop()
    assert "rate limit exceeded" in str(raised.value)
    assert raised.value.retry_after is not None and raised.value.retry_after > 3000


def test_slow_answer_times_out(standin: GitHubStandIn):
    github = RestGitHub(standin.base_url, SCOPE, TOKEN, timeout=0.2)
    standin.inject_fault(None, delay=2.0)

    started = time.monotonic()
    with pytest.raises(TransientError) as raised:
        github.list_runners()

    assert time.monotonic() - started < 1.5
    assert "Timeout" in str(raised.value)


def test_connection_refused_is_transient():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    github = RestGitHub(f"http://127.0.0.1:{port}", SCOPE, TOKEN, timeout=1)

    with pytest.raises(TransientError):
        github.list_runners()


@pytest.mark.parametrize(
    ("token", "message"),
    [("wrong-token", "Bad credentials"), ("", "Requires authentication")],
)
def test_auth_failure_is_502(standin: GitHubStandIn, token: str, message: str):
    github = RestGitHub(standin.base_url, SCOPE, token)

    with pytest.raises(MonitorError) as raised:
        github.list_runners()

    assert not isinstance(raised.value, TransientError)
    assert raised.value.status == 502
    assert str(raised.value) == f"GitHub GET {SCOPE}/actions/runners: 401 {message}"
    # GitHub's own status and words, for the preflight check that names the fix.
    assert isinstance(raised.value, GitHubRefused)
    assert (raised.value.github_status, raised.value.github_message) == (401, message)


@pytest.mark.parametrize(
    "fault",
    [{"status": 500}, {"status": 429, "retry_after": 1}, {"status": 403}, {"status": 422}],
)
def test_token_and_jit_config_never_in_errors_or_logs(
    standin: GitHubStandIn,
    github: RestGitHub,
    caplog: pytest.LogCaptureFixture,
    fault: dict[str, Any],
):
    caplog.set_level(logging.DEBUG)
    jit = github.generate_jitconfig("ci-runner-x.1@ci0", ["self-hosted"])
    standin.inject_fault(**fault, count=10)
    errors = []
    for call in (
        github.list_runners,
        lambda: github.generate_jitconfig("ci-runner-x.2@ci0", ["self-hosted"]),
        lambda: github.add_labels(jit.registration.id, ["a"]),
        lambda: github.delete_runner(jit.registration.id),
    ):
        with pytest.raises(MonitorError) as raised:
            call()
        errors.append(str(raised.value))

    text = "\n".join(errors) + caplog.text
    assert len(errors) == 4
    assert TOKEN not in text
    assert jit.encoded_jit_config not in text
    assert TOKEN not in repr(github)


def test_echoed_token_is_redacted(standin: GitHubStandIn):
    # Whatever text ends up in a message (here the path), the token is redacted from it.
    github = RestGitHub(standin.base_url, "/repos/servo/" + TOKEN, TOKEN)
    standin.inject_fault(500)

    with pytest.raises(TransientError) as raised:
        github.list_runners()
    assert TOKEN not in str(raised.value) and "[REDACTED]" in str(raised.value)


def test_concurrent_calls_from_threads(standin: GitHubStandIn, github: RestGitHub):
    for n in range(130):
        standin.add_runner(SCOPE, f"ci-runner-x.{n}@ci0")
    results: list[int] = []
    failures: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(5):
                results.append(len(github.list_runners()))
        except BaseException as e:  # noqa: BLE001 - reported below
            failures.append(e)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert failures == []
    assert results == [130] * 30


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[dict[str, str]] = []

    def do_GET(self) -> None:
        _Recorder.seen.append(dict(self.headers))
        body = b'{"total_count": 0, "runners": []}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_sends_github_headers():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert RestGitHub(base, SCOPE, TOKEN).list_runners() == []
    finally:
        server.shutdown()
        server.server_close()
    headers = {k.lower(): v for k, v in _Recorder.seen[-1].items()}
    assert headers["authorization"] == f"Bearer {TOKEN}"
    assert headers["accept"] == "application/vnd.github+json"
    assert headers["x-github-api-version"] == "2022-11-28"
    assert headers["user-agent"].startswith("servo-ci-monitor/")


# -- artifact downloads: where from, and how much --------------------------------------------


def test_download_refuses_an_archive_over_the_limit(standin: GitHubStandIn, github: RestGitHub):
    big = os.urandom(MAX_DOWNLOAD_BYTES + 1000)  # incompressible: the zip is bigger still
    standin.add_artifact("servo/servo", "42", "big", {"args": big})
    (artifact,) = github.list_artifacts("servo/servo", "42")

    with pytest.raises(MonitorError) as raised:
        github.download_artifact(artifact.archive_download_url)

    assert type(raised.value) is MonitorError and raised.value.status == 502
    assert str(raised.value) == (
        f"GitHub GET /_blob/{artifact.id}: artifact larger than {MAX_DOWNLOAD_BYTES} bytes"
    )
    # The connection was dropped, not reused with unread bytes: the next call still works.
    standin.add_artifact("servo/servo", "43", "small", {"args": "a=1\n"})
    (small,) = github.list_artifacts("servo/servo", "43")
    assert zipfile.ZipFile(io.BytesIO(github.download_artifact(small.archive_download_url)))


class _Redirector(http.server.BaseHTTPRequestHandler):
    """Answers every GET with a 302 to `location`; records the paths asked for."""

    location = ""
    seen: list[str] = []

    def do_GET(self) -> None:
        type(self).seen.append(self.path)
        self.send_response(302)
        self.send_header("Location", type(self).location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def _serving(handler: type, context: ssl.SSLContext | None = None) -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def tls_context(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ssl.SSLContext:
    """A server context with a self-signed certificate for 127.0.0.1 that clients trust
    (through SSL_CERT_FILE, which OpenSSL's default verify paths read)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],  # fmt: skip
        check=True,
        capture_output=True,
    )
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_download_refuses_a_redirect_from_https_to_plain_http(tls_context: ssl.SSLContext):
    class Plain(_Redirector):
        seen: list[str] = []

    class Secure(_Redirector):
        seen: list[str] = []

    with _serving(Plain) as plain_port, _serving(Secure, tls_context) as tls_port:
        Secure.location = f"http://127.0.0.1:{plain_port}/_blob/1?sig=SIGNATURE"
        api = f"https://127.0.0.1:{tls_port}"
        github = RestGitHub(api, SCOPE, TOKEN, timeout=5.0)

        with pytest.raises(MonitorError) as raised:
            github.download_artifact(f"{api}/repos/servo/servo/actions/artifacts/1/zip")

    assert type(raised.value) is MonitorError and raised.value.status == 502
    message = str(raised.value)
    assert message == (
        "GitHub GET /repos/servo/servo/actions/artifacts/1/zip: refused to download from "
        "'http://127.0.0.1' (only https)"
    )
    assert Secure.seen == ["/repos/servo/servo/actions/artifacts/1/zip"]  # TLS worked
    assert Plain.seen == []  # never asked


def test_download_from_an_https_api_refuses_a_plain_http_url_before_asking():
    github = RestGitHub("https://127.0.0.1:9", SCOPE, TOKEN, timeout=1.0)
    with pytest.raises(MonitorError) as raised:
        github.download_artifact("http://127.0.0.1:9/zip")
    assert type(raised.value) is MonitorError and raised.value.status == 502
    assert "refused to download from" in str(raised.value)
    assert github.api_calls == {}
