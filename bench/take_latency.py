"""Take latency under a slow GitHub: how long `POST /profile/linux/take` takes when every
add-labels call to GitHub takes a round trip of `--delay` seconds.

One process: the GitHub stand-in, libvirt's test driver, a real Monitor (+ scheduler) and
its web app on waitress. `--runners` runners are brought to Idle first; then the stand-in
delays every `POST …/runners/<id>/labels` answer by `--delay`, the round trip of one bare
add-labels call is measured with the monitor's own client (median of a few), and
`--clients` threads with keep-alive connections do `--takes` takes of one runner each.

Pass: p50 <= 1.5 × round trip and p99 <= 3 × round trip, every take answered 200 with its
own runner. Exits 1 otherwise.

    .venv/bin/python -m bench.take_latency [--runners 50 --clients 16 --delay 0.05 --takes 48]
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass

from bench.rig import PROFILE
from bench.rig import SCOPE
from bench.rig import Rig
from bench.rig import quiet_logging
from monitor.main import HTTP_THREADS
from monitor.web import make_app
from tests.support.constants import API_TOKEN
from tests.support.served import Server

P50_LIMIT = 1.5
P99_LIMIT = 3.0
ROUND_TRIP_SAMPLES = 7
HTTP_TIMEOUT = 30.0
# The whole run of takes gives up after this (client threads are daemons: nothing hangs).
RUN_TIMEOUT = 120.0


@dataclass
class TakeResult:
    seconds: float
    status: int
    runner_ids: list[int]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runners", type=int, default=50)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--delay", type=float, default=0.05, help="add-labels round trip (s)")
    parser.add_argument("--takes", type=int, default=48, help="at most --runners")
    parser.add_argument(
        "--web-threads",
        type=int,
        help="monitor's waitress threads (default: what `monitor run` uses)",
    )
    args = parser.parse_args()
    if not 1 <= args.takes <= args.runners:
        parser.error("--takes must be 1 to --runners (each take needs an Idle runner)")
    return args


def measure_round_trip(rig: Rig, delay: float) -> float:
    """Median seconds of one add-labels call with the monitor's own GitHub client, on a
    runner that is not ours (no `@host` suffix), so the monitor never sees it."""
    registration_id = rig.standin.add_runner(SCOPE, "bench-round-trip", status="online")
    samples = []
    for number in range(ROUND_TRIP_SAMPLES):
        started = time.perf_counter()
        rig.github.add_labels(registration_id, [f"bench-{number}"])
        samples.append(time.perf_counter() - started)
    round_trip = statistics.median(samples)
    if round_trip < delay:
        raise SystemExit(f"the stand-in's delay is not applied ({round_trip * 1000:.1f} ms)")
    return round_trip


def measure_concurrent_round_trip(rig: Rig, clients: int) -> float:
    """Median seconds of `clients` add-labels calls made at once, straight to the stand-in:
    what the stand-in itself needs under the load the takes put on it (it is one Python
    process, so concurrent answers queue for its interpreter; GitHub's would not)."""
    registration_id = rig.standin.add_runner(SCOPE, "bench-concurrent", status="online")
    barrier = threading.Barrier(clients)
    samples: list[float] = []

    def call(number: int) -> None:
        barrier.wait()
        started = time.perf_counter()
        rig.github.add_labels(registration_id, [f"concurrent-{number}"])
        samples.append(time.perf_counter() - started)

    threads = [threading.Thread(target=call, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HTTP_TIMEOUT)
    return statistics.median(samples)


def take_once(connection: http.client.HTTPConnection) -> TakeResult:
    query = f"unique_id={uuid.uuid4()}&qualified_repo=test/servo&run_id=1234"
    headers = {"Authorization": f"Bearer {API_TOKEN}", "Content-Length": "0"}
    started = time.perf_counter()
    connection.request("POST", f"/profile/{PROFILE}/take?{query}", headers=headers)
    response = connection.getresponse()
    body = response.read()
    seconds = time.perf_counter() - started
    ids: list[int] = []
    if response.status == 200:
        ids = [entry["id"] for entry in json.loads(body) or []]
    return TakeResult(seconds, response.status, ids)


def run_clients(port: int, clients: int, takes: int) -> list[TakeResult]:
    """`clients` threads, each with one keep-alive connection, share `takes` takes."""
    results: list[TakeResult] = []
    lock = threading.Lock()
    remaining = [takes]
    start = threading.Barrier(clients)

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT)
        connection.request("GET", "/healthz")  # connect and warm up before the clock starts
        connection.getresponse().read()
        start.wait()
        while True:
            with lock:
                if remaining[0] == 0:
                    break
                remaining[0] -= 1
            result = take_once(connection)
            with lock:
                results.append(result)
        connection.close()

    threads = [
        threading.Thread(target=client, name=f"client-{n}", daemon=True) for n in range(clients)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + RUN_TIMEOUT
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    with lock:
        return list(results)


def run_clients_elsewhere(port: int, clients: int, takes: int) -> list[TakeResult]:
    """`run_clients` in a process of its own: workflows' curl runs are not in the monitor's
    process, and client threads here would share (and be charged to) the monitor's GIL.
    (One process for all clients: sixteen would oversubscribe a 2-core machine.)"""
    child = subprocess.run(
        [sys.executable, "-m", "bench.take_latency", "--clients-only"]
        + [str(port), str(clients), str(takes)],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT + 30,
        check=True,
    )
    return [TakeResult(*row) for row in json.loads(child.stdout)]


def clients_only(port: str, clients: str, takes: str) -> int:
    results = run_clients(int(port), int(clients), int(takes))
    print(json.dumps([[r.seconds, r.status, r.runner_ids] for r in results]))
    return 0


def percentiles(seconds: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(seconds, n=100, method="inclusive")
    return {"p50": cuts[49], "p95": cuts[94], "p99": cuts[98], "max": max(seconds)}


def report(results: list[TakeResult], round_trip: float, takes: int) -> bool:
    if len(results) < 2:
        print(f"FAIL: only {len(results)}/{takes} takes answered")
        return False
    failed = [r for r in results if r.status != 200 or len(r.runner_ids) != 1]
    taken = [rid for r in results for rid in r.runner_ids]
    distinct = len(set(taken)) == len(taken)
    stats = percentiles([r.seconds for r in results])
    print(f"round trip (add-labels, median of {ROUND_TRIP_SAMPLES}): {round_trip * 1000:.1f} ms")
    for name, value in stats.items():
        print(f"{name:>4}: {value * 1000:7.1f} ms  = {value / round_trip:4.2f} x round trip")
    print(f"takes: {len(results)}/{takes} answered, {len(failed)} without exactly one runner")
    print(f"runners: {len(taken)} taken, {len(set(taken))} distinct")
    checks = {
        f"p50 <= {P50_LIMIT} x round trip": stats["p50"] <= P50_LIMIT * round_trip,
        f"p99 <= {P99_LIMIT} x round trip": stats["p99"] <= P99_LIMIT * round_trip,
        "every take got its own runner": len(results) == takes and not failed and distinct,
    }
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}: {name}")
    if failed:
        print("statuses of failed takes:", sorted({r.status for r in failed}))
    return all(checks.values())


def main() -> int:
    args = parse_args()
    discarded = quiet_logging()
    with Rig(args.runners) as rig:
        seconds = rig.bring_to_idle()
        print(f"{args.runners} runners Idle after {seconds:.1f} s")
        web_threads = args.web_threads or HTTP_THREADS
        web = Server(make_app(rig.config, rig.monitor), web_threads, "bench-monitor")
        try:
            rig.standin.inject_fault(
                None, count=10**6, method="POST", path_contains="/labels", delay=args.delay
            )
            round_trip = measure_round_trip(rig, args.delay)
            concurrent = measure_concurrent_round_trip(rig, args.clients)
            print(
                f"stand-in alone, {args.clients} add-labels calls at once: median "
                f"{concurrent * 1000:.1f} ms (its own queueing, part of every take below)"
            )
            print(
                f"{args.clients} clients, {args.takes} takes, "
                f"monitor waitress threads {web_threads}"
            )
            discarded.count = 0
            cpu, wall = time.process_time(), time.perf_counter()
            results = run_clients_elsewhere(web.port, args.clients, args.takes)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        finally:
            web.stop()
    print(
        f"whole run of takes: {wall * 1000:.0f} ms, process CPU {cpu * 1000:.0f} ms "
        f"({cpu / args.takes * 1000:.1f} ms a take; the monitor's process only)"
    )
    print(f"GitHub connections opened and discarded (urllib3 pool full): {discarded.count}")
    return 0 if report(results, round_trip, args.takes) else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--clients-only"]:
        sys.exit(clients_only(*sys.argv[2:5]))
    sys.exit(main())
