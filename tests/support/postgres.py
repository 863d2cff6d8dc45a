"""The real PostgreSQL the queue's tests share (started by tests/postgres.sh): a fresh database
per test, dropped afterwards, and a TCP proxy in front of it that a test can cut to make the
server unreachable without stopping it for everyone else."""

from __future__ import annotations

import os
import secrets
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit
from urllib.parse import urlunsplit

# tests/postgres.sh creates this role (CREATEDB) and database; MONITOR_TEST_POSTGRES_URL
# points the tests at another server.
DEFAULT_URL = "postgresql://monitor_test:monitor_test@127.0.0.1:5432/monitor_test"
HINT = "run `bash tests/postgres.sh` as root"


def admin_url() -> str:
    return os.environ.get("MONITOR_TEST_POSTGRES_URL", DEFAULT_URL)


def unavailable() -> str | None:
    """Why PostgreSQL cannot be used for tests, or None when it can."""
    try:
        import psycopg2
    except ImportError as error:  # pragma: no cover - psycopg2-binary is a dependency
        return f"psycopg2 is not installed ({error})"
    try:
        psycopg2.connect(admin_url(), connect_timeout=3).close()
    except psycopg2.Error as error:
        return f"PostgreSQL at {_redacted(admin_url())} is not available ({str(error).strip()})"
    return None


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}:{parts.port}"))


def _admin(sql: str) -> None:
    import psycopg2

    connection = psycopg2.connect(admin_url(), connect_timeout=3)
    connection.autocommit = True  # CREATE/DROP DATABASE cannot run in a transaction
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql)
    finally:
        connection.close()


@contextmanager
def fresh_database() -> Iterator[str]:
    """The URL of a new, empty database; dropped (its connections too) afterwards."""
    name = f"monitor_test_{secrets.token_hex(6)}"
    _admin(f"CREATE DATABASE {name}")
    try:
        yield urlunsplit(urlsplit(admin_url())._replace(path=f"/{name}"))
    finally:
        _admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    auth = f"{parts.username}:{parts.password}@" if parts.username else ""
    return urlunsplit(parts._replace(netloc=f"{auth}{parts.hostname}:{port}"))


class Proxy:
    """A TCP forwarder on a loopback port to the server of `url`. `cut()` closes the listening
    socket and every connection (the server looks gone: connection refused); `restore()`
    listens again on the same port."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self.url_in = url
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.port = 0
        self.restore()

    @property
    def url(self) -> str:
        return with_port(self.url_in, self.port)

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, []
            listener, self._listener = self._listener, None
        if listener is not None:
            # close() alone leaves a socket that a thread blocks in accept() on listening.
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=3)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def store_url_fixture():  # noqa: ANN201 - a pytest fixture, made here so benchmarks need no pytest
    """A fixture `store_url`, parametrized over SQLite (a file under tmp_path) and PostgreSQL (a
    fresh database). Without PostgreSQL its cases skip, saying how to start it, or fail under
    MONITOR_REQUIRE_POSTGRES=1 (CI, where a missing server is a broken set-up)."""
    import pytest

    @pytest.fixture(params=["sqlite", "postgresql"])
    def store_url(request, tmp_path) -> Iterator[str]:
        if request.param == "sqlite":
            yield f"sqlite:///{tmp_path / 'queue.sqlite3'}"
            return
        require()
        with fresh_database() as url:
            yield url

    return store_url


def postgres_url_fixture():  # noqa: ANN201 - see store_url_fixture
    """A fixture `postgres_url`: a fresh PostgreSQL database (skips or fails as above)."""
    import pytest

    @pytest.fixture
    def postgres_url() -> Iterator[str]:
        require()
        with fresh_database() as url:
            yield url

    return postgres_url


def require() -> None:
    """Skip the calling test without PostgreSQL, or fail it under MONITOR_REQUIRE_POSTGRES=1."""
    import pytest

    reason = unavailable()
    if reason is not None:
        message = f"{reason}; {HINT}"
        if os.environ.get("MONITOR_REQUIRE_POSTGRES") == "1":
            pytest.fail(message)
        pytest.skip(message)
