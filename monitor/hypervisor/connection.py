"""The shared libvirt connection: opening it without hanging, keeping it alive, re-opening it
after it is lost, and turning libvirt's errors into `MonitorError`s.

A hung libvirtd must not block the loop forever. libvirt's default event loop runs in one daemon
thread per process (`start_event_loop`), and every connection gets keepalive (`KEEPALIVE_*`):
a call to a daemon that stopped answering fails after 15-20 s as a lost connection. Opening a
connection has no keepalive, so it runs in a helper thread that callers wait on for at most
`open_timeout` seconds.

Every libvirt call of this package runs inside `Connection.calling`, so a libvirt failure
leaves the package as a `MonitorError` (status 503), or a `TransientError` when the
connection itself was lost. Any thread may use a `Connection`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import libvirt

from monitor.errors import MonitorError
from monitor.errors import TransientError
from monitor.hypervisor import EVENT_LOOP_THREAD_NAME

log = logging.getLogger(__name__)

# Errors that mean the connection to libvirtd is gone (measured on libvirt 9.0 after killing
# libvirtd: "Cannot write data: Broken pipe" is SYSTEM_ERROR from RPC, the next call gives
# "client socket is closed" from RPC; after SIGSTOP with keepalive: "connection closed due to
# keepalive timeout", INTERNAL_ERROR from RPC). Other SYSTEM_ERRORs (e.g. a storage file) are not.
_LOST_CODES = {libvirt.VIR_ERR_RPC, libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_INVALID_CONN}
_LOST_DOMAINS = {libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE}

# Keepalive: a ping after KEEPALIVE_INTERVAL s without traffic from libvirtd; the connection is
# closed when KEEPALIVE_COUNT pings in a row go unanswered (measured: 20.0 s after SIGSTOP).
KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 3
# How long a caller waits for libvirt.open(); a slower open keeps going in its thread, and the
# next caller waits for that same open.
OPEN_TIMEOUT = 30.0

_event_loop_lock = threading.Lock()
_event_loop_thread: threading.Thread | None = None


def start_event_loop() -> threading.Thread:
    """Register libvirt's default event implementation and run it in a daemon thread, once
    per process; return that thread. Thread-safe. Must run before the `libvirt.open` of any
    connection that needs keepalive or events: connections opened earlier get neither."""
    global _event_loop_thread
    with _event_loop_lock:
        if _event_loop_thread is None:
            try:
                libvirt.virEventRegisterDefaultImpl()
            except libvirt.libvirtError as e:
                raise MonitorError(f"cannot start the libvirt event loop: {e}", 503) from e
            thread = threading.Thread(
                target=_run_event_loop, name=EVENT_LOOP_THREAD_NAME, daemon=True
            )
            thread.start()
            _event_loop_thread = thread
        return _event_loop_thread


def _run_event_loop() -> None:
    while True:
        try:
            libvirt.virEventRunDefaultImpl()
        except libvirt.libvirtError as e:  # pragma: no cover - libvirt never fails here
            log.warning("libvirt event loop: %s", e)
            time.sleep(1)


class _PendingOpen:
    """A `libvirt.open(uri)` (plus keepalive) running in its own daemon thread: against a hung
    libvirtd it blocks until the daemon answers, and no libvirt timeout covers it."""

    def __init__(self, uri: str | None) -> None:
        self.uri = uri
        self.conn: libvirt.virConnect | None = None
        self.error: Exception | None = None
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._abandoned = False
        threading.Thread(target=self._open, name="libvirt-open", daemon=True).start()

    def wait(self, timeout: float) -> bool:
        """Return whether the open finished (with `conn` or `error`) within `timeout` s."""
        return self._done.wait(timeout)

    def abandon(self) -> None:
        """Nobody wants the connection any more: close it now or when it arrives."""
        with self._lock:
            self._abandoned = True
            conn, self.conn = self.conn, None
        close_quietly(conn)

    def _open(self) -> None:
        conn = None
        try:
            conn = libvirt.open(self.uri)
            try:
                conn.setKeepAlive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
            except libvirt.libvirtError as e:
                # The test driver: "this function is not supported ... virConnectSetKeepAlive".
                log.debug("libvirt at %s: no keepalive: %s", uri_name(self.uri), e)
        except Exception as e:  # noqa: BLE001 - handed to the waiting callers
            self.error = e
        with self._lock:
            if self._abandoned:
                conn, abandoned = None, conn
            else:
                self.conn, abandoned = conn, None
            self._done.set()
        close_quietly(abandoned)


class Connection:
    """A libvirt connection, opened lazily and re-opened after it is lost.

    `uri` None means libvirt's default URI. Thread-safe: the connection is shared by all
    threads (libvirt connections are), and only opening or dropping it is serialised. A call
    that finds no connection waits at most `open_timeout` seconds for one (`TransientError`
    after that).
    """

    def __init__(self, uri: str | None, open_timeout: float = OPEN_TIMEOUT) -> None:
        self.uri = uri
        self.open_timeout = open_timeout
        self._conn: libvirt.virConnect | None = None
        self._opening: _PendingOpen | None = None
        self._lock = threading.Lock()
        self.errors = 0  # libvirt calls that failed (/metrics)
        # libvirt prints every error to stderr unless a handler is registered.
        libvirt.registerErrorHandler(_ignore_libvirt_error, None)

    def get(self) -> libvirt.virConnect:
        """Return the connection, opening one if needed.

        The open runs in a `_PendingOpen` thread shared by every caller that needs it; each
        caller waits at most `open_timeout` s and then gets a `TransientError`, while the open
        goes on for the next caller. The event loop is started first, for keepalive.
        """
        while True:
            with self._lock:
                if self._conn is not None:
                    return self._conn
                if self._opening is None:
                    start_event_loop()
                    self._opening = _PendingOpen(self.uri)
                opening = self._opening
            if not opening.wait(self.open_timeout):
                raise TransientError(
                    f"cannot connect to libvirt at {uri_name(self.uri)}: no answer within "
                    f"{self.open_timeout:g} s (is libvirtd hung?)"
                )
            with self._lock:
                if self._opening is opening:
                    self._opening = None
                    self._conn = opening.conn
                    if self._conn is not None:
                        log.info("connected to libvirt at %s", uri_name(self.uri))
            if opening.error is not None:
                raise TransientError(
                    f"cannot connect to libvirt at {uri_name(self.uri)}: {opening.error}"
                ) from opening.error
            # Otherwise the connection is in self._conn, unless close() or a lost connection
            # took it away meanwhile: then go round and open another.

    def open_another(self, conn: libvirt.virConnect, purpose: str) -> libvirt.virConnect:
        """A new connection to the same libvirt as `conn`, for one long call (`purpose`, e.g.
        "a copy") that must not hold up the other calls on `conn`; or `conn` itself on the
        test driver, which keeps each connection's state apart. The caller closes it (with
        `close_quietly`) unless it is `conn`."""
        with self.calling(conn, "get the libvirt driver's name"):
            if conn.getType() == "TEST":
                return conn
        opening = _PendingOpen(self.uri)
        if not opening.wait(self.open_timeout):
            opening.abandon()
            raise TransientError(
                f"cannot connect to libvirt at {uri_name(self.uri)} for {purpose}: no answer "
                f"within {self.open_timeout:g} s (is libvirtd hung?)"
            )
        if opening.conn is None:
            raise TransientError(
                f"cannot connect to libvirt at {uri_name(self.uri)} for {purpose}: "
                f"{opening.error}"
            ) from opening.error
        return opening.conn

    @contextmanager
    def calling(self, conn: libvirt.virConnect, action: str) -> Iterator[None]:
        """Turn a libvirtError into a MonitorError about `action` (TransientError and a
        reconnect on the next call when the connection is lost)."""
        try:
            yield
        except libvirt.libvirtError as e:
            with self._lock:
                self.errors += 1
            if _is_lost(conn, e):
                self._drop(conn)
                raise TransientError(f"libvirt connection lost: cannot {action}: {e}") from e
            raise MonitorError(f"libvirt: cannot {action}: {e}", status=503) from e

    def close(self) -> None:
        """Close the connection (and give up an open in progress); the next call opens a new
        one."""
        with self._lock:
            conn, self._conn = self._conn, None
            opening, self._opening = self._opening, None
        if opening is not None:
            opening.abandon()
        close_quietly(conn)

    def _drop(self, conn: libvirt.virConnect) -> None:
        """Forget a lost connection, unless another thread already replaced it.

        It is not closed here: another thread may be inside a libvirt call on it, and
        closing frees what that call is using (a segfault, seen while libvirtd was stopped
        under a screenshot pass). The binding closes it when the last thread lets go of it.
        """
        with self._lock:
            if self._conn is conn:
                self._conn = None


def has_code(error: BaseException | None, *codes: int) -> bool:
    """Whether `error` is a libvirtError with one of `codes`."""
    return isinstance(error, libvirt.libvirtError) and error.get_error_code() in codes


def is_no_domain(error: BaseException | None) -> bool:
    return has_code(error, libvirt.VIR_ERR_NO_DOMAIN)


def is_busy_pool(error: BaseException | None) -> bool:
    # "internal error: pool 'x' has asynchronous jobs running." (libvirt 9.0 storage driver)
    return has_code(error, libvirt.VIR_ERR_INTERNAL_ERROR) and "asynchronous jobs" in str(error)


def uri_name(uri: str | None) -> str:
    return uri or "the default URI"


def close_quietly(conn: libvirt.virConnect | None) -> None:
    if conn is None:
        return
    try:
        conn.close()
    except libvirt.libvirtError as e:
        log.debug("closing libvirt connection: %s", e)


def _is_lost(conn: libvirt.virConnect, error: libvirt.libvirtError) -> bool:
    if error.get_error_code() in _LOST_CODES or error.get_error_domain() in _LOST_DOMAINS:
        return True
    try:
        return not conn.isAlive()
    except libvirt.libvirtError:
        return True


def _ignore_libvirt_error(_ctx: object, _error: object) -> None:
    pass
