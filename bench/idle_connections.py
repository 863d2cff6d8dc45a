"""How long another client waits while one peer holds 1000 idle connections to the monitor.

The monitor's app over libvirt's test driver and the GitHub stand-in (bench/rig.py), served
two ways on 127.0.0.1: as the monitor serves it (`serving.BackgroundServer`: past 1000
connections the one idle longest is closed), and by plain waitress with the monitor's earlier
settings (`connection_limit=1000`: the listener stops accepting). For each, one peer opens
HELD connections and leaves them idle, then another client asks for `/dashboard.json` and a
guest for `/boot` (no token: the answer, 401, is what is timed), each on a new connection, 20
times; a request not answered within 2 s counts as a timeout.

    python -m bench.idle_connections [--held 1000] [--requests 20]
"""

from __future__ import annotations

import argparse
import http.client
import socket
import statistics
import threading
import time
from typing import Any

import waitress

from bench.rig import Rig
from bench.rig import quiet_logging
from monitor import serving
from monitor import web
from monitor.serving import BackgroundServer

TIMEOUT = 2.0


class PlainWaitress(BackgroundServer):
    """What `monitor run` served before: waitress' own server, connection_limit=1000.
    (Not `BackgroundServer.__init__`: only its `close`.)"""

    def __init__(self, app: Any) -> None:
        self._map: dict[int, Any] = {}
        self._server = waitress.create_server(
            app,
            map=self._map,
            host="127.0.0.1",
            port=0,
            threads=16,
            connection_limit=1000,
            asyncore_use_poll=True,
        )
        self.host, self.port = self._server.effective_host, self._server.effective_port
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()


def ask(port: int, path: str) -> float | None:
    """Seconds until the answer to GET `path` on a new connection, or None on a timeout."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    started = time.perf_counter()
    try:
        connection.request("GET", path)
        connection.getresponse().read()
        return time.perf_counter() - started
    except (TimeoutError, OSError):
        return None
    finally:
        connection.close()


def measure(server: BackgroundServer, held: int, requests: int) -> dict[str, list[float | None]]:
    peers = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(held)]
    try:
        time.sleep(0.5)  # all accepted (or waiting in the backlog) before anybody else comes
        results: dict[str, list[float | None]] = {"/dashboard.json": [], "/boot": []}
        for _ in range(requests):
            for path in results:
                results[path].append(ask(server.port, path))
        return results
    finally:
        for peer in peers:
            peer.close()


def report(name: str, results: dict[str, list[float | None]]) -> None:
    for path, times in results.items():
        answered = [t * 1000 for t in times if t is not None]
        timeouts = len(times) - len(answered)
        if answered:
            print(
                f"  {name:9} {path:16} median {statistics.median(answered):6.1f} ms,"
                f" max {max(answered):6.1f} ms, {timeouts}/{len(times)} timed out"
            )
        else:
            print(f"  {name:9} {path:16} {timeouts}/{len(times)} timed out (> {TIMEOUT:g} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--held", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=20)
    args = parser.parse_args()
    quiet_logging()
    serving.raise_open_files_limit(4 * args.held + 1000)
    with Rig(runners=2) as rig:
        rig.bring_to_idle()
        app = web.make_app(rig.config, rig.monitor)
        print(f"one peer holding {args.held} idle connections; {args.requests} requests each:")
        for name, make in (
            ("monitor", lambda: BackgroundServer(app, threads=16, body_limit=web.body_limit)),
            ("waitress", lambda: PlainWaitress(app)),
        ):
            server = make()
            try:
                report(name, measure(server, args.held, args.requests))
            finally:
                server.close()


if __name__ == "__main__":
    main()
