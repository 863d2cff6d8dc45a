"""A WSGI app served by waitress from a background thread, and stopped cleanly.

Used where the monitor or its tests run a server beside other work: the GitHub stand-in,
the benchmarks, the end-to-end tests. (`monitor run` serves on the main thread instead.)
"""

from __future__ import annotations

import threading
from typing import Any

import waitress
from waitress import wasyncore

# What every waitress server of the monitor should be given (`monitor run`'s too). Waitress
# stops accepting at 100 open connections by default (the listener and its trigger count), and
# kept-alive ones stay open for two minutes: 200 concurrent clients with kept-alive connections
# (bench/load.py) left half of them waiting in the listen backlog for tens of seconds. poll()
# instead of select(), which fails once a descriptor number reaches 1024.
CONNECTION_LIMIT = 1000
WAITRESS_OPTIONS: dict[str, Any] = {
    "connection_limit": CONNECTION_LIMIT,
    "asyncore_use_poll": True,
}


class BackgroundServer:
    """`app` on `host:port` (0 picks a free port) with `threads` worker threads, and
    `WAITRESS_OPTIONS` unless `options` say otherwise."""

    def __init__(
        self,
        app: Any,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        threads: int = 8,
        name: str = "http",
        **options: Any,
    ) -> None:
        self._map: dict[int, Any] = {}
        self._server = waitress.create_server(
            app,
            map=self._map,
            host=host,
            port=port,
            threads=threads,
            ident=name,
            **{**WAITRESS_OPTIONS, **options},
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

    def close(self) -> None:
        """Close every socket (listener, keep-alive channels, the trigger's pipe) from inside
        the server's own loop, which then returns; the port is free afterwards.

        Not `trigger.pull_trigger(thunk)`: it queues the thunk before writing to the pipe,
        so a loop woken by a worker in between runs the thunk, closes the pipe, and the write
        then fails (EBADF) or lands in whatever reused that descriptor. The loop runs thunks
        under `trigger.lock`, so holding it across both steps closes that gap."""
        trigger = self._server.trigger
        with trigger.lock:
            trigger.thunks.append(lambda: wasyncore.close_all(self._map, ignore_all=True))
            trigger._physical_pull()
        self._thread.join(timeout=5)
        if self._thread.is_alive():  # pragma: no cover - only if the loop is wedged
            self._server.close()
        self._server.task_dispatcher.shutdown(timeout=2)
