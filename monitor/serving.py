"""The monitor's waitress servers: `create_server` (what `monitor run` serves on its main
thread) and `BackgroundServer`, the same served from a background thread and stopped cleanly
(the GitHub stand-in, the benchmarks, the end-to-end tests).

Both guard the edge the same way: past `CONNECTION_LIMIT` open connections the one idle
longest is closed to make room for a new one, and a request whose body is over what
`body_limit(method, path)` allows is answered 413 from its headers, before any of the body
is read.
"""

from __future__ import annotations

import logging
import resource
import threading
import time
from collections.abc import Callable
from typing import Any

from waitress import wasyncore
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.server import MultiSocketServer
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask
from waitress.task import ThreadedTaskDispatcher
from waitress.utilities import RequestEntityTooLarge

log = logging.getLogger(__name__)

# At most this many client connections are open; past it the one idle longest is closed.
# Waitress itself stops accepting at `connection_limit` open sockets (the listeners and the
# trigger count), so one peer holding that many idle kept-alive connections locked out
# everybody else for as long as `channel_timeout` (two minutes). Closing the idle longest
# instead keeps the listener accepting: a flood of idle connections costs its own oldest
# ones, never a request that is being answered. 1000: 200 clients of bench/load.py with
# kept-alive connections each fit several times over.
CONNECTION_LIMIT = 1000
# How long `BackgroundServer.close` waits for the requests under way, and then for their
# answers to be sent (a take waiting on GitHub can take longer: it is cut off).
CLOSE_GRACE_SECONDS = 2.0
# Waitress' own limit sits above ours (room for the listeners and the trigger), so it never
# stops the listener while we evict.
WAITRESS_CONNECTION_LIMIT = CONNECTION_LIMIT + 64
# Open files the process needs at least: every connection is a descriptor, plus the
# store, libvirt's socket, logs, screenshots being written. systemd's default soft limit
# is 1024.
OPEN_FILES_WANTED = 4096
# What every waitress server of the monitor is given. poll() instead of select(), which
# fails once a descriptor number reaches 1024.
WAITRESS_OPTIONS: dict[str, Any] = {
    "connection_limit": WAITRESS_CONNECTION_LIMIT,
    "asyncore_use_poll": True,
}

BodyLimit = Callable[[str, str], int]


def create_server(
    app: Any,
    *,
    body_limit: BodyLimit | None = None,
    map: dict[int, Any] | None = None,  # noqa: A002 - waitress' name for the socket map
    **options: Any,
) -> Any:
    """A waitress server of `app` with `WAITRESS_OPTIONS` (unless `options` say otherwise)
    on every address in `options["listen"]` (or `host`/`port`): a `TcpWSGIServer`, or a
    `MultiSocketServer` for several. With `body_limit`, a request whose body is longer than
    `body_limit(method, path)` bytes is refused with 413 before its body is read."""
    raise_open_files_limit()
    adjustments = Adjustments(**{**WAITRESS_OPTIONS, **options})
    socket_map: dict[int, Any] = {} if map is None else map
    dispatcher = ThreadedTaskDispatcher()
    dispatcher.set_thread_count(adjustments.threads)
    channel = _channel_class(body_limit)
    servers = [
        EdgeServer(
            app,
            socket_map,
            dispatcher=dispatcher,
            adj=adjustments,
            sockinfo=sockinfo,
            channel_class=channel,
        )
        for sockinfo in adjustments.listen
    ]
    if len(servers) == 1:
        return servers[0]
    listening = [(server.effective_host, server.effective_port) for server in servers]
    return MultiSocketServer(socket_map, adjustments, listening, dispatcher, servers[0].log_info)


def raise_open_files_limit(wanted: int = OPEN_FILES_WANTED) -> int:
    """Raise this process' soft limit of open files to `wanted` (or the hard limit, if
    lower); never lower it. Returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as error:  # pragma: no cover - a sandbox may refuse
            log.warning("cannot raise the open files limit to %d: %s", target, error)
            return soft
        return target
    return soft


class EdgeServer(TcpWSGIServer):
    """Waitress' TCP server that closes the connection idle longest once more than
    `CONNECTION_LIMIT` are open (on every listener of its socket map together). Runs on the
    server's own loop thread, as all of waitress' socket bookkeeping does."""

    def __init__(self, *args: Any, channel_class: type[HTTPChannel], **kwargs: Any) -> None:
        self.channel_class = channel_class
        super().__init__(*args, **kwargs)

    def handle_accept(self) -> None:
        super().handle_accept()
        channels = [c for c in self._map.values() if isinstance(c, HTTPChannel)]
        if len(channels) <= CONNECTION_LIMIT:
            return
        # A channel with requests is being answered (or has answers queued): never cut it.
        idle = [c for c in channels if not c.requests and not c.will_close]
        if idle:
            oldest = min(idle, key=lambda c: c.last_activity)
            log.debug("over %d connections: closing the one idle longest", CONNECTION_LIMIT)
            oldest.handle_close()


class _ErrorTask(ErrorTask):
    """Waitress' own answers to a request it refuses (400, 413, 431: plain text), with
    `nosniff` as every answer of the app."""

    def execute(self) -> None:
        self.response_headers.append(("X-Content-Type-Options", "nosniff"))
        super().execute()


class EdgeChannel(HTTPChannel):
    error_task_class = _ErrorTask


def _channel_class(body_limit: BodyLimit | None) -> type[HTTPChannel]:
    if body_limit is None:
        return EdgeChannel
    limit_for: BodyLimit = body_limit

    class LimitedParser(HTTPRequestParser):
        """Waitress' request parser that refuses a body over `body_limit(method, path)`
        once the headers are in: from Content-Length at once, and for a chunked body as
        soon as what arrived passes the limit."""

        limit: int | None = None

        def received(self, data: bytes) -> int:
            consumed: int = super().received(data)
            if not self.headers_finished:
                return consumed
            # Waitress' own limit (1 GiB) may have refused it already: say ours instead.
            if self.error is not None and not isinstance(self.error, RequestEntityTooLarge):
                return consumed
            if self.limit is None:
                self.limit = limit_for(self.command, self.path)
                if self.content_length > self.limit:
                    self._refuse()
            elif self.error is None and self.body_bytes_received > self.limit:
                self._refuse()
            return consumed

        def _refuse(self) -> None:
            assert self.limit is not None
            self.error = RequestEntityTooLarge(
                f"{self.command} {self.path} takes a body of at most {self.limit} bytes"
            )
            self.completed = True
            self.expect_continue = False  # no "100 Continue" for a body we refuse

    return type("LimitedChannel", (EdgeChannel,), {"parser_class": LimitedParser})


class BackgroundServer:
    """`app` on `host:port` (0 picks a free port) with `threads` worker threads, made by
    `create_server` (so with its `body_limit`, if given)."""

    def __init__(
        self,
        app: Any,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        threads: int = 8,
        name: str = "http",
        body_limit: BodyLimit | None = None,
        **options: Any,
    ) -> None:
        self._map: dict[int, Any] = {}
        self._server = create_server(
            app,
            body_limit=body_limit,
            map=self._map,
            host=host,
            port=port,
            threads=threads,
            ident=name,
            **options,
        )
        if not hasattr(self._server, "effective_port"):
            self._server.close()
            raise ValueError(f"listen on one address (an IP, not {host!r})")
        self.host = self._server.effective_host
        self.port = self._server.effective_port
        self._thread = threading.Thread(
            target=self._server.run, name=f"{name}:{self.port}", daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        host = "::1" if host == "::" else host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def close(self, grace: float = CLOSE_GRACE_SECONDS) -> None:
        """Stop accepting, let the requests under way finish and their answers go out (for
        up to `grace` seconds each: waitress' own shutdown order), then close every socket
        (listener, keep-alive channels, the trigger's pipe) from inside the server's own
        loop, which then returns; the port is free afterwards.

        Not `trigger.pull_trigger(thunk)` for the last step: it queues the thunk before
        writing to the pipe, so a loop woken by a worker in between runs the thunk, closes
        the pipe, and the write then fails (EBADF) or lands in whatever reused that
        descriptor. The loop runs thunks under `trigger.lock`, so holding it across both
        steps closes that gap."""
        self._server.accepting = False  # the loop no longer polls the listener
        self._server.task_dispatcher.shutdown(timeout=grace)
        self._flush(grace)
        trigger = self._server.trigger
        with trigger.lock:
            trigger.thunks.append(lambda: wasyncore.close_all(self._map, ignore_all=True))
            trigger._physical_pull()
        self._thread.join(timeout=5)
        if self._thread.is_alive():  # pragma: no cover - only if the loop is wedged
            self._server.close()

    def _flush(self, within: float) -> None:
        """Wait (at most `within` s) until the loop has sent what finished requests wrote."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline and self._thread.is_alive():
            channels = [c for c in list(self._map.values()) if isinstance(c, HTTPChannel)]
            if not any(c.total_outbufs_len and c.connected for c in channels):
                return
            self._server.pull_trigger()  # the loop then looks at what is writable
            time.sleep(0.01)
