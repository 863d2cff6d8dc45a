"""Load: many concurrent clients mixing takes, dashboard polls and screenshot fetches.

One process (this one) holds the monitor as `monitor run` builds it: libvirt's test driver, a
real Monitor with its scheduler, and `make_app` on waitress with `monitor run`'s thread count
(`serving.BackgroundServer`, so with `serving.WAITRESS_OPTIONS`: waitress' default limit of
100 open connections would leave half of 200 kept-alive clients unserved). The GitHub
stand-in runs in a process of its own (`bench/rig.py`), and so do the clients and the "jobs":
nothing but the monitor shares the monitor's interpreter.

1. `--runners` runners are brought to Idle, and the scheduler's screenshot job is waited for
   until every runner has a screenshot (the test driver's screen, a PNG).
2. A jobs process plays GitHub's side of a reservation: every `JOBS_POLL_SECONDS` it lists the
   stand-in's runners, starts a job (busy) on each runner that carries a `reserved-for:` label,
   and `--job-seconds` later ends it (the ephemeral registration goes), so the monitor destroys
   the runner and creates a new one; the stand-in's agent brings that one online. It also
   records every `reserved-for:` label it sees, for the double-reservation check.
3. `--clients` client threads, spread over `--processes` processes, each with one kept-alive
   urllib3 connection, run for `--seconds` without pause (or with `--think` seconds between
   requests), each request drawn by weight from `--mix`:
   - `take`: `POST /profile/linux/take?unique_id=<uuid4>&qualified_repo=test/servo&run_id=<n>`
     with the API token; 200 with one runner, or 200 `null` when none is idle (counted);
   - `json`: `GET /dashboard.json`;
   - `html`: `GET /dashboard.html` with `If-None-Match` (the page's poll; 304 when unchanged);
   - `thumbnail`: a `/runner/<id>/thumbnail.png?v=<version>` URL from the client's last
     `/dashboard.html`, as the page loads it; `screenshot`: that runner's `screenshot.png`.
     A 404 is expected only for a runner destroyed since that page was rendered: the client
     then asks `/dashboard.json` (recorded as a `json` request) and counts the 404 as an error
     if the runner is still there.

Pass (exit 0; 1 otherwise): no error (a 5xx, a connection error or time-out, any status not
listed above, a take answer that is neither `null` nor one runner), no request slower than
`--limit` seconds (1), and no runner reserved twice: each runner id answered by at most one
take; each registration seen with at most one `reserved-for:` label, each `unique_id` on at
most one registration, and every take's runner seen carrying that take's label at the
stand-in; each runner in at most one of the monitor's stored reservations.

Also reported: how often the dashboard fragment was rendered (a counter around
`dashboard.overview`) against how many distinct pages the clients were sent, and the CPU time
of the monitor's process, the clients' and the jobs'. `--dump FILE` keeps every request and a
half-second timeline of the monitor (runners, Idle ones, requests waiting for a waitress
thread, screenshots encoded) for a closer look.

    .venv/bin/python -m bench.load          # --clients 200 --seconds 60 --runners 100
    .venv/bin/python -m bench.load --think 1  # paced: each client pauses 0-2 s between requests
    .venv/bin/python -m bench.load --clients 40 --seconds 10 --json   # results as JSON
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import random
import re
import statistics
import sys
import threading
import time
import uuid
from collections import Counter
from collections import defaultdict
from collections.abc import Callable
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import urllib3

from bench.rig import PROFILE
from bench.rig import Rig
from bench.rig import quiet_logging
from monitor import dashboard
from monitor import models
from monitor.main import HTTP_THREADS
from monitor.serving import BackgroundServer
from monitor.web import make_app
from tests.support.constants import API_TOKEN

KINDS = ("take", "json", "html", "thumbnail", "screenshot")
DEFAULT_MIX = "take=25,json=25,html=25,thumbnail=15,screenshot=10"
# A replaced runner's simulated agent comes online this long after its JIT config was made.
AGENT_ONLINE_AFTER = 0.5
JOBS_POLL_SECONDS = 0.25
HTTP_CONNECT_TIMEOUT = 10.0
HTTP_READ_TIMEOUT = 30.0
# Statuses that are not errors, by kind (a screenshot's 404 is judged by a second look).
EXPECTED = {
    "take": {200},
    "json": {200},
    "html": {200, 304},
    "thumbnail": {200, 404},
    "screenshot": {200, 404},
}
THUMBNAIL_URL = re.compile(r'src="(/runner/(\d+)/thumbnail\.png\?v=[^"]+)"')
CONNECTION_ERROR = -1
SAMPLE_ERRORS = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--runners", type=int, default=100)
    parser.add_argument(
        "--processes", type=int, default=4, help="client processes (the clients spread evenly)"
    )
    parser.add_argument("--mix", default=DEFAULT_MIX, help="weights, default %(default)s")
    parser.add_argument(
        "--think", type=float, default=0.0, help="mean pause between a client's requests (s)"
    )
    parser.add_argument(
        "--job-seconds", type=float, default=5.0, help="how long a reserved runner's job runs"
    )
    parser.add_argument("--limit", type=float, default=1.0, help="slowest request allowed (s)")
    parser.add_argument(
        "--web-threads", type=int, help="monitor's waitress threads (default: `monitor run`'s)"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--dump",
        type=Path,
        help="write every request (kind, status, seconds, start) and a 0.5 s timeline of the "
        "monitor (runners, idle, waitress queue, screenshots) to this JSON file",
    )
    args = parser.parse_args(argv)
    try:
        args.weights = parse_mix(args.mix)
    except ValueError as error:
        parser.error(str(error))
    if args.clients < 1 or args.processes < 1 or args.seconds <= 0 or args.runners < 1:
        parser.error("--clients, --processes, --seconds and --runners must be positive")
    args.processes = min(args.processes, args.clients)
    return args


def parse_mix(text: str) -> dict[str, float]:
    weights: dict[str, float] = {}
    for part in text.split(","):
        kind, _, weight = part.partition("=")
        if kind.strip() not in KINDS:
            raise ValueError(f"--mix: unknown kind {kind!r} (kinds: {', '.join(KINDS)})")
        weights[kind.strip()] = float(weight)
    if sum(weights.values()) <= 0:
        raise ValueError("--mix: no weight")
    return weights


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# The clients (in processes of their own) ------------------------------------------------


class Client:
    """One client thread: one kept-alive connection, its own page state (ETag, thumbnails)."""

    def __init__(self, number: int, port: int, weights: dict[str, float], think: float) -> None:
        self.number = number
        self.pool = urllib3.HTTPConnectionPool(
            "127.0.0.1",
            port,
            maxsize=1,
            block=True,
            retries=False,
            timeout=urllib3.Timeout(connect=HTTP_CONNECT_TIMEOUT, read=HTTP_READ_TIMEOUT),
        )
        self.kinds = list(weights)
        self.weights = [weights[kind] for kind in self.kinds]
        self.think = think
        self.random = random.Random(number)
        self.etag: str | None = None
        self.pages: set[str] = set()  # the ETags of the pages this client was sent
        self.thumbnails: list[tuple[int, str]] = []  # (runner id, thumbnail URL)
        self.run_ids = iter(range(number * 1_000_000, (number + 1) * 1_000_000))
        # (kind, status, seconds, started at [s since the run's start])
        self.records: list[tuple[str, int, float, float]] = []
        self.takes: list[tuple[str, list[int], list[str]]] = []  # (unique_id, ids, reg names)
        self.null_takes = 0
        self.expected_404: Counter[str] = Counter()
        self.errors: list[str] = []
        self.origin = 0.0

    def request(
        self, kind: str, method: str, url: str, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes, Any]:
        started = time.perf_counter()
        try:
            response = self.pool.urlopen(
                method, url, headers=headers, retries=False, redirect=False
            )
            status, body = response.status, response.data
        except urllib3.exceptions.HTTPError as error:
            seconds = time.perf_counter() - started
            self.records.append((kind, CONNECTION_ERROR, seconds, started - self.origin))
            self.error(f"{kind} {url}: {type(error).__name__}: {error}")
            return CONNECTION_ERROR, b"", None
        seconds = time.perf_counter() - started
        self.records.append((kind, status, seconds, started - self.origin))
        if status not in EXPECTED[kind]:
            self.error(f"{kind} {url}: {status} {body[:200]!r}")
        return status, body, response

    def error(self, message: str) -> None:
        self.errors.append(message)

    def warm_up(self) -> bool:
        try:
            self.pool.urlopen("GET", "/healthz", retries=False).data  # noqa: B018 - read it
            return True
        except urllib3.exceptions.HTTPError as error:
            self.error(f"warm-up: {type(error).__name__}: {error}")
            return False

    def run(self, start: float, end: float) -> None:
        """Requests from wall-clock `start` to `end` (time.time(), shared by all processes)."""
        time.sleep(max(0.0, start - time.time()))
        self.origin = time.perf_counter() - (time.time() - start)
        if self.think:  # paced clients do not all begin in the same millisecond
            time.sleep(self.random.uniform(0, 2 * self.think))
        while time.time() < end:
            kind = self.random.choices(self.kinds, self.weights)[0]
            if kind in ("thumbnail", "screenshot") and not self.thumbnails:
                kind = "html"  # the page must have been loaded once
            getattr(self, kind)()
            if self.think:
                time.sleep(self.random.uniform(0, 2 * self.think))
        self.pool.close()

    def take(self) -> None:
        unique_id = str(uuid.uuid4())
        url = (
            f"/profile/{PROFILE}/take?unique_id={unique_id}"
            f"&qualified_repo=test/servo&run_id={next(self.run_ids)}"
        )
        headers = {"Authorization": f"Bearer {API_TOKEN}"}
        status, body, _ = self.request("take", "POST", url, headers)
        if status != 200:
            return
        try:
            answer = json.loads(body)
        except ValueError:
            self.error(f"take: not JSON: {body[:200]!r}")
            return
        if answer is None:
            self.null_takes += 1
        elif isinstance(answer, list) and len(answer) == 1:
            registration = answer[0]["runner"].get("registration") or {}
            self.takes.append((unique_id, [answer[0]["id"]], [registration.get("name", "")]))
        else:
            self.error(f"take: neither null nor one runner: {body[:200]!r}")

    def json(self) -> bytes:
        return self.request("json", "GET", "/dashboard.json")[1]

    def html(self) -> None:
        headers = {"If-None-Match": self.etag} if self.etag else None
        status, body, response = self.request("html", "GET", "/dashboard.html", headers)
        if status == 200:
            self.etag = response.headers.get("ETag")
            self.pages.add(self.etag or "")
            # None when no runner has a screenshot yet (say all were just replaced): then
            # the client polls the page instead of fetching screens.
            self.thumbnails = [
                (int(number), url) for url, number in THUMBNAIL_URL.findall(body.decode())
            ]

    def thumbnail(self) -> None:
        runner_id, url = self.random.choice(self.thumbnails)
        self.screen("thumbnail", runner_id, url)

    def screenshot(self) -> None:
        runner_id, _ = self.random.choice(self.thumbnails)
        self.screen("screenshot", runner_id, f"/runner/{runner_id}/screenshot.png")

    def screen(self, kind: str, runner_id: int, url: str) -> None:
        status, _, _ = self.request(kind, "GET", url)
        if status != 404:
            return
        # Expected only if the runner has gone since the page was rendered.
        self.thumbnails = [entry for entry in self.thumbnails if entry[0] != runner_id]
        body = self.json()
        try:
            present = any(r["id"] == runner_id for r in json.loads(body)["runners"])
        except (ValueError, KeyError, TypeError):
            self.error(f"{kind}: could not check a 404 of runner {runner_id}")
            return
        if present:
            self.error(f"{kind} {url}: 404 for runner {runner_id}, which is still there")
        else:
            self.expected_404[kind] += 1


def client_process(
    port: int,
    numbers: list[int],
    weights: dict[str, float],
    think: float,
    seconds: float,
    ready: Any,
    go: Any,
    start_at: Any,
    results: Any,
) -> None:
    """Connect every client, say ready, wait for the common start, run, send the results."""
    sys.setswitchinterval(0.0005)  # as the monitor: a client's answer does not wait long
    clients = [Client(number, port, weights, think) for number in numbers]
    warmed = [False] * len(clients)

    def warm(index: int) -> None:
        warmed[index] = clients[index].warm_up()

    threads = [threading.Thread(target=warm, args=(i,)) for i in range(len(clients))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ready.put(sum(warmed))
    go.wait()
    start = start_at.value
    cpu = time.process_time()
    threads = [
        threading.Thread(target=c.run, args=(start, start + seconds), daemon=True) for c in clients
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + HTTP_CONNECT_TIMEOUT + HTTP_READ_TIMEOUT + 10)
    results.put(
        {
            "records": [r for c in clients for r in c.records],
            "takes": [t for c in clients for t in c.takes],
            "null_takes": sum(c.null_takes for c in clients),
            "expected_404": dict(sum((c.expected_404 for c in clients), Counter())),
            "errors": [e for c in clients for e in c.errors],
            "pages": sorted(set().union(*(c.pages for c in clients))),
            "cpu": time.process_time() - cpu,
            "unfinished": sum(thread.is_alive() for thread in threads),
        }
    )


# The jobs (a process of its own: GitHub's side) -----------------------------------------


def jobs_process(standin_url: str, job_seconds: float, stop: Any, results: Any) -> None:
    """Start a job on every reserved runner, end it `job_seconds` later; record labels."""
    http = urllib3.PoolManager(retries=urllib3.Retry(3, backoff_factor=0.1), timeout=30.0)
    base = f"{standin_url}/_standin/runners"
    started: dict[int, float] = {}
    reserved_for: dict[str, set[str]] = defaultdict(set)  # unique_id -> registration names
    labels_of: dict[str, set[str]] = defaultdict(set)  # registration name -> unique_ids
    several: list[dict[str, Any]] = []
    counts = Counter()
    cpu = time.process_time()

    def look(start_jobs: bool) -> None:
        now = time.monotonic()
        for runner in http.request("GET", base).json():
            name = runner["name"]
            mine = [
                label["name"].partition(":")[2]
                for label in runner["labels"]
                if label["name"].startswith("reserved-for:")
            ]
            for unique_id in mine:
                reserved_for[unique_id].add(name)
                labels_of[name].add(unique_id)
            if len(mine) > 1:
                several.append({"name": name, "reserved_for": mine})
            if (
                start_jobs
                and mine
                and runner["status"] == "online"
                and not runner["busy"]
                and runner["id"] not in started
            ):
                http.request("POST", f"{base}/{runner['id']}/busy", json={"busy": True})
                started[runner["id"]] = now
                counts["jobs started"] += 1
        for runner_id, since in list(started.items()):
            if start_jobs and now - since >= job_seconds:
                http.request("POST", f"{base}/{runner_id}/finish-job", json={})
                del started[runner_id]
                counts["jobs finished"] += 1
        counts["looks"] += 1

    while not stop.wait(JOBS_POLL_SECONDS):
        look(start_jobs=True)
    look(start_jobs=False)  # labels added since the last look
    results.put(
        {
            "reserved_for": {key: sorted(value) for key, value in reserved_for.items()},
            "several_labels": several,
            "labels_of": {key: sorted(value) for key, value in labels_of.items()},
            "counts": dict(counts),
            "cpu": time.process_time() - cpu,
        }
    )


# The run ---------------------------------------------------------------------------------


def wait_for_screenshots(rig: Rig, timeout: float = 60.0) -> float:
    """Wait until every observed runner has a saved screenshot (the scheduler's 5 s job)."""
    started = time.monotonic()
    while True:
        observation = rig.monitor.observation
        runners = observation.runners if observation else []
        missing = [r.id for r in runners if rig.monitor.guests.screenshot_version(r.id) is None]
        if runners and not missing:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise SystemExit(f"{len(missing)} runners without a screenshot after {timeout:.0f} s")
        time.sleep(0.25)


@contextlib.contextmanager
def counting_renders() -> Iterator[Callable[[], int]]:
    """Count the dashboard fragment's renders (each calls `dashboard.overview` once) while
    inside; yields a function returning the count. A diagnostic only: a counter's cost."""
    count = [0]
    lock = threading.Lock()
    original = dashboard.overview

    def overview(*args: Any, **kwargs: Any) -> Any:
        with lock:
            count[0] += 1
        return original(*args, **kwargs)

    dashboard.overview = overview
    try:
        yield lambda: count[0]
    finally:
        dashboard.overview = original


def wait_for_records(raw: dict[str, Any], since: Any, timeout: float = 10.0) -> None:
    """Let the monitor write the last takes' records (it does within half a second)."""
    issued = {unique_id for c in raw["clients"] for unique_id, _, _ in c["takes"]}
    deadline = time.monotonic() + timeout
    while not issued <= set(models.load_reservations(since)) and time.monotonic() < deadline:
        time.sleep(0.1)


def sample_monitor(
    rig: Rig, web: BackgroundServer, start_at: Any, stop: threading.Event
) -> list[dict[str, Any]]:
    """Every half second (for --dump): what the monitor holds and how long waitress' queue
    of requests waiting for a thread is."""
    samples: list[dict[str, Any]] = []
    while not stop.wait(0.5):
        observation = rig.monitor.observation
        last_pass = rig.monitor.guests.screenshots.last_pass
        samples.append(
            {
                "t": round(time.time() - start_at.value, 2),
                "runners": len(observation.runners) if observation else 0,
                "idle": rig.idle_count(),
                "waiting": len(web._server.task_dispatcher.queue),  # a look inside waitress
                "screens_encoded": rig.monitor.guests.screenshots.encoded,
                "last_pass_seconds": last_pass.wall_seconds if last_pass else None,
                "cpu": time.process_time(),
            }
        )
    return samples


def run_load(rig: Rig, web: BackgroundServer, args: argparse.Namespace) -> dict[str, Any]:
    port = web.port
    context = multiprocessing.get_context("spawn")  # never fork a process holding libvirt
    ready, results, job_results = context.Queue(), context.Queue(), context.Queue()
    go, stop_jobs = context.Event(), context.Event()
    start_at = context.Value("d", 0.0)
    numbers = list(range(args.clients))
    groups = [numbers[i :: args.processes] for i in range(args.processes)]
    clients = [
        context.Process(
            target=client_process,
            args=(
                port,
                group,
                args.weights,
                args.think,
                args.seconds,
                ready,
                go,
                start_at,
                results,
            ),
            name=f"load-clients-{n}",
            daemon=True,
        )
        for n, group in enumerate(groups)
    ]
    jobs = context.Process(
        target=jobs_process,
        args=(rig.standin.url, args.job_seconds, stop_jobs, job_results),
        name="load-jobs",
        daemon=True,
    )
    jobs.start()
    for process in clients:
        process.start()
    connected = sum(ready.get(timeout=120) for _ in clients)
    progress(f"{connected}/{args.clients} clients connected")
    start_at.value = time.time() + 0.5
    events_before = models.last_event_id() or 0
    cpu = time.process_time()
    samples: list[dict[str, Any]] = []
    stop_sampling = threading.Event()
    sampler = threading.Thread(
        target=lambda: samples.extend(sample_monitor(rig, web, start_at, stop_sampling)),
        daemon=True,
    )
    if args.dump:
        sampler.start()
    go.set()
    answers = [results.get(timeout=args.seconds + 120) for _ in clients]
    cpu = time.process_time() - cpu
    stop_sampling.set()
    if args.dump:
        sampler.join()
    for process in clients:
        process.join(10)
    stop_jobs.set()
    jobs_answer = job_results.get(timeout=60)
    jobs.join(10)
    wall = time.time() - start_at.value
    return {
        "connected": connected,
        "clients": answers,
        "jobs": jobs_answer,
        "monitor_cpu": cpu,
        "wall": wall,
        "events": (models.last_event_id() or 0) - events_before,
        "samples": samples,
    }


# The report ------------------------------------------------------------------------------


def stats(seconds: list[float], limit: float, duration: float) -> dict[str, Any]:
    if not seconds:
        return {"count": 0}
    ordered = sorted(seconds)
    cuts = statistics.quantiles(ordered, n=100, method="inclusive") if len(ordered) > 1 else []
    return {
        "count": len(ordered),
        "per_second": len(ordered) / duration,
        "p50": cuts[49] if cuts else ordered[0],
        "p99": cuts[98] if cuts else ordered[0],
        "max": ordered[-1],
        "slow": sum(value > limit for value in ordered),
    }


def analyse(raw: dict[str, Any], args: argparse.Namespace, since: Any) -> dict[str, Any]:
    clients = raw["clients"]
    records = [r for c in clients for r in c["records"]]
    statuses: dict[str, Counter[int]] = defaultdict(Counter)
    for kind, status, _, _ in records:
        statuses[kind][status] += 1
    kinds = {
        kind: {
            **stats([r[2] for r in records if r[0] == kind], args.limit, args.seconds),
            "statuses": {str(k): v for k, v in sorted(statuses[kind].items())},
        }
        for kind in KINDS
    }
    overall = stats([r[2] for r in records], args.limit, args.seconds)
    errors = [e for c in clients for e in c["errors"]]
    takes = [t for c in clients for t in c["takes"]]
    taken = [runner_id for _, ids, _ in takes for runner_id in ids]
    expected_404 = sum((Counter(c["expected_404"]) for c in clients), Counter())

    # No runner reserved twice: by the takes' answers, at the stand-in, in the store.
    jobs = raw["jobs"]
    twice_answered = sorted(k for k, n in Counter(taken).items() if n > 1)
    unique_id_on_several = {k: v for k, v in jobs["reserved_for"].items() if len(v) > 1}
    not_seen = [
        (unique_id, names[0])
        for unique_id, _, names in takes
        if names[0] not in jobs["reserved_for"].get(unique_id, [])
    ]
    issued = {unique_id for unique_id, _, _ in takes}
    foreign = sorted(set(jobs["reserved_for"]) - issued)
    stored = models.load_reservations(since)
    stored_ids = Counter(i for record in stored.values() for i in record.runner_ids)
    twice_stored = sorted(k for k, n in stored_ids.items() if n > 1)
    missing_records = sorted(issued - set(stored))
    double = {
        "runner ids answered by two takes": twice_answered,
        "registrations with two reserved-for labels": jobs["several_labels"],
        "unique_ids on two registrations": unique_id_on_several,
        "takes whose label the stand-in never showed": not_seen,
        "reserved-for labels of no take": foreign,
        "runners in two stored reservations": twice_stored,
        "takes without a stored reservation": missing_records,
    }
    unfinished = sum(c["unfinished"] for c in clients)
    if unfinished:
        errors.append(f"{unfinished} client threads still running at the end")
    if raw["connected"] < args.clients:
        errors.append(f"only {raw['connected']}/{args.clients} clients connected")
    return {
        "settings": {
            "clients": args.clients,
            "seconds": args.seconds,
            "runners": args.runners,
            "processes": args.processes,
            "mix": args.weights,
            "think": args.think,
            "job_seconds": args.job_seconds,
            "limit": args.limit,
            "web_threads": args.web_threads or HTTP_THREADS,
        },
        "kinds": kinds,
        "overall": overall,
        "errors": len(errors),
        "error_samples": errors[:SAMPLE_ERRORS],
        "takes": {
            "granted": len(takes),
            "null": sum(c["null_takes"] for c in clients),
            "distinct_runners": len(set(taken)),
        },
        "expected_404": dict(expected_404),
        "double_reservation": double,
        "jobs": jobs["counts"],
        "cpu": {
            "monitor_process": raw["monitor_cpu"],
            "clients": sum(c["cpu"] for c in clients),
            "jobs": jobs["cpu"],
            "wall": raw["wall"],
        },
        "monitor_events": raw["events"],
        "dashboard": {
            "renders": raw["renders"],
            "distinct_pages": len(set().union(*(c["pages"] for c in clients))),
        },
    }


def verdict(result: dict[str, Any]) -> dict[str, bool]:
    limit = result["settings"]["limit"]
    return {
        "no error": result["errors"] == 0,
        f"no request slower than {limit:g} s": result["overall"].get("slow", 0) == 0,
        "no runner reserved twice": not any(result["double_reservation"].values()),
        "every kind of request made, some takes granted": result["takes"]["granted"] > 0
        and all(result["kinds"][kind]["count"] for kind in result["settings"]["mix"]),
    }


def ms(value: float) -> str:
    return f"{value * 1000:.1f} ms"


def print_report(result: dict[str, Any]) -> None:
    settings = result["settings"]
    print(
        f"## Load: {settings['clients']} clients x {settings['seconds']:g} s, "
        f"{settings['runners']} runners\n"
    )
    print(
        f"{settings['processes']} client processes, mix {settings['mix']}, think "
        f"{settings['think']:g} s, jobs {settings['job_seconds']:g} s, monitor waitress "
        f"threads {settings['web_threads']}\n"
    )
    print("| kind | requests | req/s | p50 | p99 | max | > limit | statuses |")
    print("|---|---|---|---|---|---|---|---|")
    rows = [(kind, result["kinds"][kind]) for kind in KINDS] + [("all", result["overall"])]
    for kind, row in rows:
        if not row.get("count"):
            print(f"| {kind} | 0 | | | | | | |")
            continue
        statuses = ", ".join(f"{k}: {v}" for k, v in row.get("statuses", {}).items())
        print(
            f"| {kind} | {row['count']} | {row['per_second']:.0f} | {ms(row['p50'])} | "
            f"{ms(row['p99'])} | {ms(row['max'])} | {row['slow']} | {statuses} |"
        )
    takes = result["takes"]
    print(
        f"\ntakes: {takes['granted']} granted ({takes['distinct_runners']} distinct runners), "
        f"{takes['null']} answered null (no runner idle)"
    )
    print(f"expected 404s (runner gone since its page): {result['expected_404'] or 0}")
    print(f"jobs: {result['jobs']}; monitor events recorded: {result['monitor_events']}")
    dashboard_ = result["dashboard"]
    print(
        f"/dashboard.html: {dashboard_['renders']} renders of the fragment for "
        f"{dashboard_['distinct_pages']} distinct pages sent"
    )
    cpu = result["cpu"]
    print(
        f"CPU over {cpu['wall']:.1f} s: monitor process {cpu['monitor_process']:.1f} s, "
        f"clients {cpu['clients']:.1f} s, jobs {cpu['jobs']:.1f} s (2 cores = "
        f"{2 * cpu['wall']:.0f} s)"
    )
    print(f"errors: {result['errors']}")
    for sample in result["error_samples"]:
        print(f"  {sample}")
    for name, found in result["double_reservation"].items():
        if found:
            print(f"DOUBLE RESERVATION: {name}: {found}")
    for name, ok in verdict(result).items():
        print(f"{'PASS' if ok else 'FAIL'}: {name}")


def main() -> int:
    args = parse_args()
    quiet_logging()
    with Rig(args.runners) as rig:
        since = rig.monitor.clock() - timedelta(hours=1)
        seconds = rig.bring_to_idle()
        progress(f"{args.runners} runners Idle after {seconds:.1f} s")
        rig.standin.agent_online_after(AGENT_ONLINE_AFTER)  # replacements come online
        seconds = wait_for_screenshots(rig)
        progress(f"every runner has a screenshot after {seconds:.1f} s more")
        web = BackgroundServer(
            make_app(rig.config, rig.monitor),
            threads=args.web_threads or HTTP_THREADS,
            name="bench-monitor",
        )
        try:
            progress(f"{args.clients} clients for {args.seconds:g} s ...")
            with counting_renders() as renders:
                raw = run_load(rig, web, args)
                raw["renders"] = renders()
        finally:
            web.close()
        wait_for_records(raw, since)
        result = analyse(raw, args, since)
    if args.dump:
        dump = {
            "records": [r for c in raw["clients"] for r in c["records"]],
            "samples": raw["samples"],
            "result": result,
        }
        args.dump.write_text(json.dumps(dump))
    if args.json:
        print(json.dumps({**result, "verdict": verdict(result)}, indent=1, sort_keys=True))
    else:
        print_report(result)
    return 0 if all(verdict(result).values()) else 1


if __name__ == "__main__":
    sys.exit(main())
