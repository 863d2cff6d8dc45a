"""`/dashboard.json` throughput: the monitor's app serving its cached render, against a bare
Bottle app returning the same bytes, in one run.

Both apps run on waitress at 127.0.0.1 with the same thread count (8, as `monitor run`):
(a) `make_app` over a real Monitor whose observation holds `--runners` Idle runners (the
GitHub stand-in and libvirt's test driver behind it, scheduler running as in production);
(b) `bottle.Bottle()` with one route returning those bytes with the same content type. A
client in a separate process (so it does not share the servers' GIL) drives each with
`--connections` keep-alive `http.client` connections for `--duration` seconds after a
`--warmup`, alternating a, b, a, b, … (`--rounds` pairs) to cancel drift.

Pass: requests/s of (a) >= 0.70 × requests/s of (b). Exits 1 otherwise.

    .venv/bin/python -m bench.dashboard_rps [--runners 50 --duration 5 --rounds 2]
"""

from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import sys
import threading
import time

import bottle

from bench.rig import Rig
from bench.rig import quiet_logging
from monitor.main import HTTP_THREADS
from monitor.web import make_app
from tests.support.served import Server

TARGET_RATIO = 0.70
PATH = "/dashboard.json"
JSON = "application/json"
HTTP_TIMEOUT = 10.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runners", type=int, default=50)
    parser.add_argument(
        "--threads", type=int, default=HTTP_THREADS, help="waitress threads, both apps"
    )
    parser.add_argument("--connections", type=int, default=8, help="client keep-alive conns")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds measured per window")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before each window")
    parser.add_argument("--rounds", type=int, default=2, help="a, b pairs")
    parser.add_argument("--client", metavar="PORT", type=int, help=argparse.SUPPRESS)
    return parser.parse_args()


# The client (run in its own process) ---------------------------------------------------


def drive(port: int, connections: int, warmup: float, duration: float) -> dict[str, float]:
    """GET PATH over `connections` keep-alive connections; count the answers that complete
    within [warmup, warmup + duration) from now."""
    begin = time.monotonic() + warmup
    end = begin + duration
    counts = {"requests": 0, "errors": 0, "bytes": 0}
    lock = threading.Lock()

    def loop() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT)
        done = errors = size = 0
        while (now := time.monotonic()) < end:
            connection.request("GET", PATH)
            response = connection.getresponse()
            body = response.read()
            if begin <= time.monotonic() < end and now >= begin:
                done += 1
                size += len(body)
                errors += response.status != 200
        connection.close()
        with lock:
            counts["requests"] += done
            counts["errors"] += errors
            counts["bytes"] += size

    threads = [threading.Thread(target=loop) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(warmup + duration + HTTP_TIMEOUT)
    return {**counts, "seconds": duration}


def run_client(port: int, args: argparse.Namespace) -> dict[str, float]:
    """One measuring window, from a fresh client process."""
    command = [
        sys.executable,
        "-m",
        "bench.dashboard_rps",
        "--client",
        str(port),
        "--connections",
        str(args.connections),
        "--warmup",
        str(args.warmup),
        "--duration",
        str(args.duration),
    ]
    limit = args.warmup + args.duration + 2 * HTTP_TIMEOUT + 30
    done = subprocess.run(command, capture_output=True, text=True, timeout=limit, check=True)
    return json.loads(done.stdout)


# The servers ---------------------------------------------------------------------------


def bare_app(body: bytes) -> bottle.Bottle:
    app = bottle.Bottle()

    @app.get(PATH)
    def dashboard_json() -> bytes:
        bottle.response.content_type = JSON
        return body

    return app


def fetch(port: int) -> tuple[int, str, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT)
    connection.request("GET", PATH)
    response = connection.getresponse()
    answer = (response.status, response.getheader("Content-Type", ""), response.read())
    connection.close()
    return answer


def measure(servers: dict[str, Server], args: argparse.Namespace) -> dict[str, list[dict]]:
    windows: dict[str, list[dict]] = {name: [] for name in servers}
    for round_number in range(1, args.rounds + 1):
        for name, server in servers.items():
            result = run_client(server.port, args)
            windows[name].append(result)
            rate = result["requests"] / result["seconds"]
            print(f"round {round_number} {name}: {rate:8.0f} req/s ({result['errors']} errors)")
    return windows


def report(windows: dict[str, list[dict]]) -> bool:
    rates = {
        name: sum(w["requests"] for w in results) / sum(w["seconds"] for w in results)
        for name, results in windows.items()
    }
    errors = sum(w["errors"] for results in windows.values() for w in results)
    monitor, bare = rates["monitor"], rates["bare"]
    ratio = monitor / bare if bare else 0.0
    print(f"monitor app: {monitor:8.0f} req/s")
    print(f"bare bottle: {bare:8.0f} req/s")
    print(f"ratio:       {ratio:8.2f} (target >= {TARGET_RATIO})")
    ok = ratio >= TARGET_RATIO and errors == 0
    print(f"{'PASS' if ok else 'FAIL'}: monitor >= {TARGET_RATIO} x bare, {errors} errors")
    return ok


def main() -> int:
    args = parse_args()
    if args.client is not None:
        print(json.dumps(drive(args.client, args.connections, args.warmup, args.duration)))
        return 0
    quiet_logging()
    with Rig(args.runners) as rig:
        seconds = rig.bring_to_idle()
        print(f"{args.runners} runners Idle after {seconds:.1f} s")
        rendered = rig.monitor.rendered
        assert rendered is not None
        servers = {
            "monitor": Server(make_app(rig.config, rig.monitor), args.threads, "bench-monitor"),
            "bare": Server(bare_app(rendered.json), args.threads, "bench-bare"),
        }
        try:
            answers = {name: fetch(server.port) for name, server in servers.items()}
            if answers["monitor"] != answers["bare"]:
                raise SystemExit(
                    f"the two apps answer differently: {answers['monitor'][:2]} vs "
                    f"{answers['bare'][:2]}"
                )
            status, content_type, body = answers["bare"]
            print(
                f"{PATH}: {status}, {content_type}, {len(body)} bytes; waitress threads "
                f"{args.threads}, {args.connections} connections, {args.duration:g} s windows"
            )
            windows = measure(servers, args)
        finally:
            for server in servers.values():
                server.stop()
    return 0 if report(windows) else 1


if __name__ == "__main__":
    sys.exit(main())
