"""The web edge as an attacker meets it: over real sockets to waitress as `serving` sets it up
(the monitor's app over the in-process rig of tests/support/rigs.py), and the security
headers of every answer.

- A peer holding a thousand idle connections locks nobody else out.
- A request body over its route's limit is refused (413) from the headers, unread.
- "Take a screenshot now" is taken once for any number of callers within a second.
- Pages are never framed nor run foreign script; /cache/servo/ never serves a document.
"""

from __future__ import annotations

import http.client
import resource
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from monitor import bootlog
from monitor import models
from monitor import serving
from monitor import web
from monitor.serving import BackgroundServer
from monitor.web import headers
from tests.support.constants import AUTH
from tests.support.rigs import Rig

HELD = 1000  # idle connections one peer holds
ANSWERED_WITHIN = 2.0  # seconds


@pytest.fixture
def rig(make_rig) -> Rig:
    rig = make_rig()  # linux 2, windows 1; guests authenticate with their own tokens
    rig.converge()
    rig.config.profiles["linux"].config_dir.joinpath("boot-script").write_text("#!/bin/sh\n")
    return rig


@pytest.fixture
def server(rig: Rig) -> Iterator[BackgroundServer]:
    app = web.make_app(rig.config, rig.monitor)
    http_server = BackgroundServer(app, threads=8, name="edge", body_limit=web.body_limit)
    yield http_server
    http_server.close()


def get(
    port: int, path: str, request_headers: dict[str, str] | None = None, timeout=ANSWERED_WITHIN
):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        started = time.perf_counter()
        connection.request("GET", path, headers=request_headers or {})
        response = connection.getresponse()
        body = response.read()
        return response.status, body, time.perf_counter() - started
    finally:
        connection.close()


def guest_token(rig: Rig, runner_id: int) -> str:
    token = rig.hypervisor.guest_tokens[models.get_runner(runner_id).guest_name]
    assert token is not None
    return token


# Connections ---------------------------------------------------------------------------------


def test_a_peer_holding_1000_idle_connections_locks_nobody_out(rig, server):
    soft = serving.raise_open_files_limit(4 * HELD)
    if soft < 2 * HELD + 200:
        pytest.skip(f"the open files limit ({soft}) leaves no room for {HELD} connections")
    held = []
    try:
        for _ in range(HELD):
            held.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
        # The peer's connections are open (and accepted) before anybody else comes.
        time.sleep(0.5)

        status, _, dashboard_seconds = get(server.port, "/dashboard.json")
        assert status == 200
        token = guest_token(rig, 0)
        status, body, boot_seconds = get(server.port, "/boot", {"Authorization": f"Bearer {token}"})
        assert (status, body) == (200, b"#!/bin/sh\n")
        print(
            f"\nwith {HELD} idle connections held: /dashboard.json {dashboard_seconds * 1000:.1f}"
            f" ms, /boot {boot_seconds * 1000:.1f} ms"
        )
        assert dashboard_seconds < ANSWERED_WITHIN and boot_seconds < ANSWERED_WITHIN
    finally:
        for connection in held:
            connection.close()


def test_the_connection_idle_longest_is_closed_first(rig, server):
    serving.raise_open_files_limit(4 * serving.CONNECTION_LIMIT)
    oldest = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    time.sleep(0.05)
    others = [
        socket.create_connection(("127.0.0.1", server.port), timeout=5)
        for _ in range(serving.CONNECTION_LIMIT)
    ]
    try:
        # The 1001st connection closed the one idle longest: its peer reads the end of it.
        assert oldest.recv(1) == b""
        status, _, _ = get(server.port, "/healthz")
        assert status in (200, 503)
    finally:
        oldest.close()
        for connection in others:
            connection.close()


# Request bodies ------------------------------------------------------------------------------


def send_headers(port: int, head: str) -> tuple[int, dict[str, str], bytes]:
    """Send a request's head and nothing of its body; return the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWERED_WITHIN) as connection:
        connection.sendall(head.encode("latin-1"))
        response = http.client.HTTPResponse(connection)
        response.begin()
        answer = {name.lower(): value for name, value in response.getheaders()}
        return response.status, answer, response.read()


@pytest.mark.parametrize(
    ("method", "path", "length"),
    [
        ("POST", "/profile/linux/take?unique_id=x&qualified_repo=test/servo&run_id=1", 2**30),
        ("POST", "/select-runner", web.MAX_BODY + 1),
        ("POST", "/boot-log", bootlog.MAX_BYTES + 1),
        ("GET", "/dashboard.json", 1),
        ("DELETE", "/policy/override", 10),
    ],
)
def test_a_body_over_the_route_s_limit_is_refused_unread(server, method, path, length):
    status, answer, body = send_headers(
        server.port,
        f"{method} {path} HTTP/1.1\r\nHost: monitor\r\nContent-Length: {length}\r\n\r\n",
    )
    assert status == 413
    assert answer["content-type"].startswith("text/plain")
    assert answer["x-content-type-options"] == "nosniff"
    limit = web.body_limit(method, path.partition("?")[0])
    assert f"takes a body of at most {limit} bytes".encode() in body


def test_a_chunked_body_is_cut_off_at_the_limit(server):
    chunk = b"x" * 65536
    with socket.create_connection(("127.0.0.1", server.port), timeout=ANSWERED_WITHIN) as sock:
        sock.sendall(
            b"POST /select-runner HTTP/1.1\r\nHost: m\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        # Past the limit, and no last chunk: only a server counting as it reads answers.
        for _ in range(web.MAX_BODY // len(chunk) + 2):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert response.status == 413
        assert b"at most 1048576 bytes" in response.read()


def test_bodies_within_the_limits_still_reach_their_routes(rig, server):
    token = guest_token(rig, 0)
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        connection.request(
            "POST", "/boot-log", body=b"booting\n", headers={"Authorization": f"Bearer {token}"}
        )
        response = connection.getresponse()
        assert (response.status, response.read()) == (200, b'{"bytes": 8}')
        connection.request("DELETE", "/policy/override", headers=AUTH)
        assert connection.getresponse().status in (200, 404)
    finally:
        connection.close()


def test_body_limits_per_route():
    assert web.body_limit("POST", "/boot-log") == bootlog.MAX_BYTES
    assert web.body_limit("POST", "/profile/linux/take") == web.MAX_BODY
    for method in ("GET", "HEAD", "DELETE", "OPTIONS"):
        assert web.body_limit(method, "/dashboard.json") == 0


# Screenshots ---------------------------------------------------------------------------------


def test_sixteen_callers_at_once_get_one_capture(rig, server):
    captures = lambda: sum(call[0] == "screenshot_raw" for call in rig.hypervisor.calls)  # noqa: E731
    before = captures()
    barrier = threading.Barrier(16)
    answers: list[tuple[int, bytes, float]] = []

    def ask() -> None:
        barrier.wait(timeout=5)
        answers.append(get(server.port, "/runner/0/screenshot/now", timeout=10))

    threads = [threading.Thread(target=ask) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(15)
    assert [status for status, _, _ in answers] == [200] * 16
    assert len({body for _, body, _ in answers}) == 1
    assert captures() - before == 1
    # A picture older than a second is taken again.
    time.sleep(rig.monitor.guests.recent_captures.max_age + 0.1)
    assert get(server.port, "/runner/0/screenshot/now")[0] == 200
    assert captures() - before == 2


def test_recent_captures_take_one_runner_at_a_time_and_keep_no_failure():
    from monitor.screenshots import RecentCaptures

    now = [100.0]
    recent = RecentCaptures(max_age=1.0, clock=lambda: now[0])
    taken: list[int] = []
    assert recent.get(1, lambda: taken.append(1) or b"one") == b"one"
    assert recent.get(1, lambda: taken.append(1) or b"again") == b"one"
    assert recent.get(2, lambda: taken.append(2) or b"two") == b"two"  # its own runner
    now[0] += 1.0
    assert recent.get(1, lambda: taken.append(1) or b"new") == b"new"
    assert taken == [1, 2, 1]

    def broken() -> bytes:
        raise RuntimeError("libvirt said no")

    now[0] += 5
    with pytest.raises(RuntimeError):
        recent.get(3, broken)
    assert recent.get(3, lambda: b"fine") == b"fine"


# Security headers ----------------------------------------------------------------------------


def test_every_answer_says_nosniff_and_pages_are_never_framed(rig):
    for path, status in (
        ("/", 200),
        ("/dashboard.html", 200),
        ("/dashboard.json", 200),
        ("/static/style.css", 200),
        ("/nowhere", 404),
        ("/runner/abc/screenshot.png", 422),
    ):
        response = rig.client.get(path, status="*")
        assert response.status_int == status, path
        assert response.headers["X-Content-Type-Options"] == "nosniff", path
        if response.content_type == "text/html":
            policy = response.headers["Content-Security-Policy"]
            assert "frame-ancestors 'none'" in policy and "script-src 'self'" in policy, path
    page = rig.client.get("/", headers={"Accept": "text/html"})
    assert "'unsafe-inline'" not in page.headers["Content-Security-Policy"]


@pytest.fixture
def repo_rig(make_rig, tmp_path) -> Rig:
    repo = tmp_path / "servo-cache"
    (repo / "docs").mkdir(parents=True)
    (repo / "docs" / "evil.html").write_text("<script>alert(document.cookie)</script>")
    (repo / "docs" / "evil.svg").write_text(
        '<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'
    )
    (repo / "docs" / "evil.xml").write_text('<?xml version="1.0"?><html/>')
    (repo / "docs" / "notes.txt").write_text("plain\n")
    (repo / "objects").mkdir()
    (repo / "objects" / "pack").write_bytes(b"PACK\x00\x00")
    return make_rig(extra=f'main_repo_path = "{repo}"\n')


@pytest.mark.parametrize("name", ["docs/evil.html", "docs/evil.svg", "docs/evil.xml"])
def test_cache_servo_never_serves_a_document(repo_rig, name):
    response = repo_rig.client.get(f"/cache/servo/{name}")
    assert response.content_type == "text/plain"
    assert response.headers["Content-Disposition"] == "attachment"
    assert response.headers["Content-Security-Policy"] == "sandbox"
    assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_cache_servo_keeps_other_files_as_they_are_but_sandboxed(repo_rig):
    text = repo_rig.client.get("/cache/servo/docs/notes.txt")
    assert text.content_type == "text/plain" and "Content-Disposition" not in text.headers
    pack = repo_rig.client.get("/cache/servo/objects/pack")
    assert pack.body == b"PACK\x00\x00"
    assert pack.headers["Content-Security-Policy"] == "sandbox"
    missing = repo_rig.client.get(
        "/cache/servo/nope.html", headers={"Accept": "text/html"}, status=404
    )
    assert missing.content_type == "text/html"  # our own error page, sandboxed all the same
    assert missing.headers["Content-Security-Policy"] == "sandbox"


def test_renders_as_document():
    for content_type in (
        "text/html; charset=UTF-8",
        "image/svg+xml",
        "application/xhtml+xml",
        "text/xml",
        "application/xml",
        "text/xsl",
    ):
        assert headers.renders_as_document(content_type), content_type
    for content_type in ("text/plain", "application/octet-stream", "image/png", "text/css"):
        assert not headers.renders_as_document(content_type), content_type


def test_the_open_files_limit_is_raised_never_lowered():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert serving.raise_open_files_limit(16) == soft
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (soft, hard)


@pytest.mark.parametrize("size", [100, 300_000])  # within one write; many, past send_bytes
def test_a_request_under_way_at_close_gets_its_whole_answer(caplog, size):
    """`close` (SIGTERM, a restart) lets a request being answered finish and go out, as
    waitress' own shutdown does, instead of closing its connection under it."""
    started = threading.Event()

    def slow(environ, start_response):
        started.set()
        time.sleep(0.5)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"x" * size]

    http_server = BackgroundServer(slow, threads=2, name="closing")
    connection = http.client.HTTPConnection(http_server.host, http_server.port, timeout=10)
    answer: dict[str, object] = {}

    def ask() -> None:
        try:
            connection.request("GET", "/")
            reply = connection.getresponse()
            answer["reply"] = (reply.status, len(reply.read()))
        except (OSError, http.client.HTTPException) as error:
            answer["reply"] = error

    asker = threading.Thread(target=ask)
    asker.start()
    assert started.wait(10)
    http_server.close()
    asker.join(10)
    connection.close()
    assert answer["reply"] == (200, size)
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    with socket.socket() as probe:  # and the port is free afterwards (as waitress binds)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((http_server.host, int(http_server.port)))
