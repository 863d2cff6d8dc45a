"""Scale: what reconcile passes, GitHub's rate limit, memory and a screenshot pass cost as the
number of runners grows (issue [6/6], "Scale"), all measured in one run.

Each size runs in a child process of its own (so that its resident memory is its own), with
bench/rig.py's set-up: the GitHub stand-in in a further process, libvirt's test driver on a
private node file in the child, a real `Monitor` with its scheduler (every job running, as
`monitor run` has them), profile `linux` with target = the size. In each child:

1. The runners are brought to Idle, and the screenshot job's store is brought to steady state
   (a pass that finds every screen unchanged, as an Idle runner's console stays).
2. Reconcile passes: `Monitor.tick` run on the monitor thread itself (`Monitor.call`), timed
   with that thread's CPU clock (`time.thread_time`), so waits (I/O, the GIL, other threads)
   are excluded. libvirt's test driver runs inside the client library, so its CPU (the guest
   listing) is counted as the monitor's; against libvirtd that work is in libvirtd.
3. Resident memory: `VmRSS` (and `VmHWM`) of the child from /proc/self/status, before the rig
   starts (every module imported) and with the runners Idle after the passes. A child of its
   own measures the test driver alone with as many running guests, for its share.
4. At `--api-size` only: GitHub API calls with steady runners and upstream's cache settings
   (`api_cache_timeout` 30 s, `monitor_poll_interval` 5 s: the config defaults, nothing
   shrunk), counted at the stand-in for `--window` seconds and scaled linearly to an hour:
   the rate-limit use (`GET /rate_limit`'s `used`, which 304s do not raise) and every
   request. Then a runner goes busy at the stand-in; how long until the monitor's observation
   shows it Busy (and, full mode, Idle again) is compared with upstream's delay: a list
   fetch every `api_cache_timeout`, a pass every `monitor_poll_interval`, so 35 s at most.
   Full mode changes the runner right after a list fetch: the worst case.
5. At `--screenshot-size` (the first that many runners of the smallest size that has them):
   `ScreenshotStore.refresh`, the scheduler's screenshot pass, into a fresh store: first pass
   (every screen new) and second pass (unchanged), thread CPU.

Targets (exit 1 if one is missed): median CPU per pass <= 1 ms per runner at every size,
per-runner cost at the largest size <= 1.5 x that at the size before it (linear growth, not
worse), <= 15 counted GitHub calls an hour in the steady window, and each change shown within
35 s.

    .venv/bin/python -m bench.scale                 # 10 100 1000 runners, 240 s window (~7 min)
    .venv/bin/python -m bench.scale --quick         # CI: 10 and 50 runners, 20 s window (~45 s)
    .venv/bin/python -m bench.scale --sizes 10 100 --window 60 --json results.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import os
import platform
import pstats
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.rig import PROFILE
from bench.rig import Rig
from bench.rig import quiet_logging
from monitor.hypervisor.libvirt_hypervisor import LibvirtHypervisor
from monitor.screenshots import ScreenshotStore
from tests.support.constants import GITHUB_TOKEN
from tests.support.constants import NODE_POOL as POOL
from tests.support.constants import NODE_XML
from tests.support.constants import ROOT
from tests.support.constants import TEST_GUEST_XML

# Targets (issue [6/6]).
CPU_PER_RUNNER_LIMIT = 0.001  # seconds of monitor CPU per runner per pass
LINEAR_LIMIT = 1.5  # per-runner cost, largest size / the size before it
CALLS_PER_HOUR_LIMIT = 15.0
UPSTREAM_LIST_SECONDS = 30.0  # upstream's api_cache_timeout: a list fetch every 30 s ...
UPSTREAM_CALLS_PER_HOUR = 3600 / UPSTREAM_LIST_SECONDS  # ... each counted: 120 an hour
UPSTREAM_POLL_SECONDS = 5.0  # upstream's monitor_poll_interval
UPSTREAM_DELAY = UPSTREAM_LIST_SECONDS + UPSTREAM_POLL_SECONDS

FULL = {
    "sizes": [10, 100, 1000],
    "passes": 100,
    "warmup": 3,
    "api_size": 100,
    "window": 240.0,
    "idle": 20.0,
    "screenshot_size": 100,
    "screenshot_rounds": 3,
}
QUICK = {
    "sizes": [10, 50],
    "passes": 10,
    "warmup": 2,
    "api_size": 50,
    "window": 20.0,
    "idle": 0.0,
    "screenshot_size": 10,
    "screenshot_rounds": 1,
}
PASS_GAP = 0.02  # seconds between timed passes
CHILD_TIMEOUT = 3600.0
RESULT_PREFIX = "SCALE-RESULT "


# -- measuring (in a child) --------------------------------------------------------------------


def memory() -> dict[str, int]:
    """VmRSS and VmHWM (peak) of this process, in bytes."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values


class StandIn:
    """What this benchmark asks the stand-in process over HTTP (bench/rig.py's
    `StandInProcess` has no busy switch and no rate-limit reading)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def _get(self, path: str, headers: dict[str, str] | None = None) -> Any:
        request = urllib.request.Request(self.url + path, headers=headers or {})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def rate_limit_used(self) -> int:
        """Calls counted against the primary rate limit so far (GET /rate_limit is free)."""
        headers = {"Authorization": f"Bearer {GITHUB_TOKEN}"}
        return int(self._get("/rate_limit", headers)["rate"]["used"])

    def requests(self) -> list[dict[str, Any]]:
        """Every API request answered so far: method, path, status."""
        return self._get("/_standin/requests")

    def set_busy(self, registration_id: int, busy: bool) -> None:
        data = json.dumps({"busy": busy}).encode()
        request = urllib.request.Request(
            f"{self.url}/_standin/runners/{registration_id}/busy", data, method="POST"
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()


def settle_screenshots(rig: Rig, size: int, timeout: float) -> dict[str, Any]:
    """Run screenshot passes here until one finds all `size` screens unchanged (the job
    does the same every 5 s; Idle runners' screens do not change). Returns that pass."""
    deadline = time.monotonic() + timeout
    monitor = rig.monitor
    while True:
        observation = monitor.observation
        assert observation is not None
        guests = {r.id: r.guest_name for r in observation.runners if r.guest_name is not None}
        result = monitor.guests.screenshots.refresh(guests, rig.hypervisor.screenshot_raw)
        if result.encoded == 0 and result.unchanged == size and result.failed == 0:
            return {"cpu": result.cpu_seconds, "wall": result.wall_seconds}
        if time.monotonic() > deadline:
            raise SystemExit(f"screenshot passes did not settle: {result}")


def measure_passes(rig: Rig, size: int, passes: int, warmup: int, profile: bool) -> dict:
    """`warmup` + `passes` reconcile passes on the monitor thread, each timed there."""
    monitor = rig.monitor
    profiler = cProfile.Profile() if profile else None

    def one_pass() -> tuple[float, float, int]:
        wall, cpu = time.perf_counter(), time.thread_time()
        observation = monitor.tick(monitor.clock())
        cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
        seen = -1 if observation is None else len(observation.runners)
        return cpu, wall, seen

    def profiled_pass() -> tuple[float, float, int]:
        assert profiler is not None
        profiler.enable()
        try:
            return one_pass()
        finally:
            profiler.disable()

    samples = []
    for number in range(warmup + passes):
        run = profiled_pass if profiler is not None and number >= warmup else one_pass
        cpu, wall, seen = monitor.call(run, timeout=120.0)
        if seen != size:
            raise SystemExit(f"a pass saw {seen} runners, not {size}")
        if number >= warmup:
            samples.append((cpu, wall))
        # Spread the passes over a few seconds, so that a moment of load elsewhere on the
        # machine (cache, frequency, a shared core) does not colour all of them.
        time.sleep(PASS_GAP)
    cpus = sorted(cpu for cpu, _ in samples)
    walls = [wall for _, wall in samples]
    result = {
        "passes": passes,
        "cpu_median": statistics.median(cpus),
        "cpu_mean": statistics.fmean(cpus),
        "cpu_p90": cpus[min(len(cpus) - 1, int(0.9 * len(cpus)))],
        "cpu_max": cpus[-1],
        "wall_median": statistics.median(walls),
    }
    if profiler is not None:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(25)
        result["profile"] = out.getvalue()
    return result


def all_idle(rig: Rig, size: int) -> bool:
    observation = rig.monitor.observation
    return (
        observation is not None
        and sum(r.status.value == "Idle" for r in observation.runners) == size
    )


def wait_for_fetch(rig: Rig, timeout: float) -> None:
    """Until the monitor stores a fresh runner list (the cache then lasts 30 s)."""
    before = rig.monitor.registrations.fetched_at
    deadline = time.monotonic() + timeout
    while rig.monitor.registrations.fetched_at == before:
        if time.monotonic() > deadline:
            raise SystemExit("no runner-list fetch came")
        time.sleep(0.01)


def time_until(rig: Rig, runner_id: int, status: str, started: float, timeout: float) -> float:
    """Seconds from `started` until the monitor's observation shows the runner in `status`."""
    while True:
        observation = rig.monitor.observation
        if observation is not None and any(
            r.id == runner_id and r.status.value == status for r in observation.runners
        ):
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            return float("inf")
        time.sleep(0.01)


def classify(requests: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts of API requests (the benchmark's own GET /rate_limit left out)."""
    api = [r for r in requests if r["path"] != "/rate_limit"]
    lists = [r for r in api if r["method"] == "GET" and r["path"].endswith("/actions/runners")]
    return {
        "all": len(api),
        "list_fetches": len(lists),
        "not_modified": sum(r["status"] == 304 for r in api),
        # What the stand-in counts: everything but 304s and 401s.
        "counted_by_log": sum(r["status"] not in (304, 401) for r in api),
        "counted_requests": [
            f"{r['method']} {r['path']} {r['status']}" for r in api if r["status"] not in (304, 401)
        ],
    }


def measure_api(rig: Rig, size: int, window: float, worst_case: bool) -> dict[str, Any]:
    """GitHub calls in a steady window, then how soon a runner going busy shows.

    Quick mode (not `worst_case`) forces one list fetch at the window's start, so that a
    window shorter than the cache's 30 s still sees a conditional request (its rates per hour
    then mean nothing); full mode forces nothing."""
    standin = StandIn(rig.standin.url)
    config = rig.config
    if not all_idle(rig, size):
        raise SystemExit("runners not steady before the API window")
    seen = len(standin.requests())
    used = standin.rate_limit_used()
    started = time.monotonic()
    if not worst_case:
        rig.monitor.registrations.cache.invalidate()
    time.sleep(window)
    elapsed = time.monotonic() - started
    steady = classify(standin.requests()[seen:])
    steady["counted"] = standin.rate_limit_used() - used
    steady["seconds"] = elapsed
    steady["counted_per_hour"] = steady["counted"] * 3600 / elapsed
    steady["all_per_hour"] = steady["all"] * 3600 / elapsed
    steady["list_fetches_per_hour"] = steady["list_fetches"] * 3600 / elapsed
    steady["still_idle"] = all_idle(rig, size)
    steady["forced_fetch"] = not worst_case

    # A change on GitHub: the lowest-id runner goes busy (a job started on it).
    observation = rig.monitor.observation
    assert observation is not None
    runner = observation.runners[0]
    assert runner.registration is not None
    seen = len(standin.requests())
    used = standin.rate_limit_used()
    if worst_case:
        wait_for_fetch(rig, 2 * config.api_cache_timeout.total_seconds() + 10)
    began = time.monotonic()
    standin.set_busy(runner.registration.id, True)
    timeout = 3 * UPSTREAM_DELAY
    delays = {"busy": time_until(rig, runner.id, "Busy", began, timeout)}
    if worst_case:
        # The fetch that showed it has just happened: going Idle again is the worst case too.
        began = time.monotonic()
        standin.set_busy(runner.registration.id, False)
        delays["idle"] = time_until(rig, runner.id, "Idle", began, timeout)
    change = classify(standin.requests()[seen:])
    change["counted"] = standin.rate_limit_used() - used
    if not worst_case:
        standin.set_busy(runner.registration.id, False)
    return {
        "api_cache_timeout": config.api_cache_timeout.total_seconds(),
        "monitor_poll_interval": config.monitor_poll_interval.total_seconds(),
        "steady": steady,
        "change": {"worst_case": worst_case, "delays": delays, **change},
    }


def measure_screenshots(rig: Rig, guests: int, rounds: int) -> dict[str, Any]:
    """First (all new) and second (unchanged) screenshot passes into fresh stores."""
    observation = rig.monitor.observation
    assert observation is not None
    chosen = dict(
        sorted((r.id, r.guest_name) for r in observation.runners if r.guest_name)[:guests]
    )
    firsts, seconds = [], []
    for _ in range(rounds):
        directory = Path(tempfile.mkdtemp(prefix="monitor-bench-scale-shots-"))
        try:
            store = ScreenshotStore(directory)
            firsts.append(store.refresh(chosen, rig.hypervisor.screenshot_raw))
            seconds.append(store.refresh(chosen, rig.hypervisor.screenshot_raw))
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def summary(results: list[Any]) -> dict[str, Any]:
        return {
            "cpu": statistics.median(r.cpu_seconds for r in results),
            "wall": statistics.median(r.wall_seconds for r in results),
            "encoded": [r.encoded for r in results],
            "unchanged": [r.unchanged for r in results],
            "failed": [r.failed for r in results],
        }

    return {
        "guests": len(chosen),
        "rounds": rounds,
        "first": summary(firsts),
        "second": summary(seconds),
    }


def thread_cpu() -> dict[str, float]:
    """CPU seconds (user + system) of each thread of this process so far, by thread name
    with its number left out (`monitor-reserve_3` counts as `monitor-reserve`), from
    /proc/self/task/*/stat (clock ticks: 10 ms steps)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    totals: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue  # the thread ended
        fields = stat.rpartition(")")[2].split()
        seconds = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        name = names.get(int(task.name), "other (libvirt's, waitress')")
        name = re.sub(r"[-_]\d+(_\d+)?$", "", name)
        name = "scheduler jobs" if name == "ThreadPoolExecutor" else name
        totals[name] = totals.get(name, 0.0) + seconds
    return totals


def measure_idle(seconds: float) -> dict[str, Any]:
    """The whole process's CPU while the runners stay Idle and every job runs as scheduled
    (passes every 5 s, list fetches every 30 s, addresses and screenshots every 5 s), and
    which threads spent it."""
    threads = thread_cpu()
    cpu, wall = time.process_time(), time.monotonic()
    time.sleep(seconds)
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    after = thread_cpu()
    by_thread = {name: after[name] - threads.get(name, 0.0) for name in after}
    by_thread = {name: value for name, value in by_thread.items() if value > 0}
    return {"seconds": wall, "cpu": cpu, "share": cpu / wall, "by_thread": by_thread}


def child(spec: dict[str, Any]) -> dict[str, Any]:
    quiet_logging()
    # A first screenshot pass of many runners outlasts the job's 5 s interval: APScheduler
    # says so every time. Not news here.
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    size = spec["size"]
    result: dict[str, Any] = {"size": size, "rss_before": memory()["VmRSS"]}
    cpu = time.process_time()
    with Rig(size) as rig:
        result["setup_seconds"] = rig.bring_to_idle(timeout=60 + size)
        result["setup_cpu"] = time.process_time() - cpu
        result["screenshots_steady"] = settle_screenshots(rig, size, timeout=60 + size)
        result["passes"] = measure_passes(
            rig, size, spec["passes"], spec["warmup"], spec.get("profile", False)
        )
        result["memory"] = memory()
        if spec["idle"]:
            result["idle"] = measure_idle(spec["idle"])
        if spec.get("api"):
            result["api"] = measure_api(rig, size, spec["window"], spec["worst_case"])
        if spec.get("screenshots"):
            result["screenshots"] = measure_screenshots(
                rig, spec["screenshots"], spec["screenshot_rounds"]
            )
    return result


def driver_child(size: int) -> dict[str, Any]:
    """Resident memory of libvirt's test driver alone with `size` running guests (in a
    monitor that runs it, it is in the monitor's process; with libvirtd it is not)."""
    root = Path(tempfile.mkdtemp(prefix="monitor-bench-scale-driver-"))
    try:
        node = root / "node.xml"
        node.write_text(NODE_XML)
        base = root / "base.img"
        with open(base, "wb") as image:
            image.truncate(16 * 1024 * 1024)
        before = memory()["VmRSS"]
        hypervisor = LibvirtHypervisor(f"test://{node}", POOL)
        try:
            for number in range(1, size + 1):
                name = f"bench-{PROFILE}.{number}"
                hypervisor.create_guest(name, TEST_GUEST_XML.format(profile=PROFILE), base)
                hypervisor.start_guest(name)
            after = memory()["VmRSS"]
        finally:
            hypervisor.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"size": size, "rss_before": before, "rss_after": after}


# -- the run (parent) --------------------------------------------------------------------------


def run_child(argument: str, value: str) -> dict[str, Any]:
    child_process = subprocess.run(
        [sys.executable, "-m", "bench.scale", argument, value],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        timeout=CHILD_TIMEOUT,
    )
    for line in child_process.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line.removeprefix(RESULT_PREFIX))
    raise SystemExit(f"{argument} {value}: no result (exit {child_process.returncode})")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, short window (CI)")
    parser.add_argument("--sizes", type=int, nargs="+", help="runner counts (10 100 1000)")
    parser.add_argument("--passes", type=int, help="timed passes per size (100)")
    parser.add_argument("--warmup", type=int, help="untimed passes first (3)")
    parser.add_argument("--api-size", type=int, help="size for the API window (100; 0: none)")
    parser.add_argument("--window", type=float, help="seconds of steady API counting (240)")
    parser.add_argument("--idle", type=float, help="seconds of process CPU, runners Idle (20)")
    parser.add_argument("--screenshot-size", type=int, help="guests per screenshot pass (100)")
    parser.add_argument("--screenshot-rounds", type=int, help="fresh stores (3)")
    parser.add_argument(
        "--profile", action="store_true", help="cProfile the passes (and slow them)"
    )
    parser.add_argument(
        "--json",
        metavar="FILE",
        help="also write the results as JSON ('-': stdout, the table then goes to stderr)",
    )
    args = parser.parse_args()
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.sizes = sorted(set(args.sizes))
    if args.sizes[0] < 1 or args.passes < 1 or args.warmup < 0:
        parser.error("sizes and --passes must be at least 1")
    if args.api_size and args.api_size not in args.sizes:
        parser.error("--api-size must be one of --sizes (or 0)")
    if args.screenshot_size and args.screenshot_size > args.sizes[-1]:
        parser.error("--screenshot-size must be at most the largest size")
    return args


def command_line() -> str:
    """This run's command, with paths inside the project relative to it (as run from there)."""

    def short(path: str) -> str:
        absolute = Path(path).absolute()
        return str(absolute.relative_to(ROOT)) if absolute.is_relative_to(ROOT) else path

    return shlex.join([short(sys.executable), short(sys.argv[0]), *sys.argv[1:]])


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "command": command_line(),
        "mode": "quick" if args.quick else "full",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_before": os.getloadavg(),
        },
        "sizes": [],
    }
    shot_size = min((s for s in args.sizes if s >= args.screenshot_size), default=None)
    for size in args.sizes:
        spec = {
            "size": size,
            "passes": args.passes,
            "warmup": args.warmup,
            "profile": args.profile,
            "api": size == args.api_size,
            "window": args.window,
            "idle": args.idle,
            "worst_case": not args.quick,
            "screenshots": args.screenshot_size if size == shot_size else 0,
            "screenshot_rounds": args.screenshot_rounds,
        }
        print(f"... {size} runners", file=sys.stderr, flush=True)
        results["sizes"].append(run_child("--child", json.dumps(spec)))
    largest = args.sizes[-1]
    print(f"... test driver alone, {largest} guests", file=sys.stderr, flush=True)
    results["driver"] = run_child("--driver-child", str(largest))
    results["machine"]["load_after"] = os.getloadavg()
    return results


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def mib(size: float) -> str:
    return f"{size / 2**20:.1f}"


def report(results: dict[str, Any], out: Any) -> dict[str, bool]:
    def say(text: str = "") -> None:
        print(text, file=out)

    sizes = results["sizes"]
    machine = results["machine"]
    say(f"command: {results['command']}")
    say(
        f"machine: {machine['cpus']} CPUs, Python {machine['python']}, load average "
        f"{machine['load_before'][0]:.2f} before, {machine['load_after'][0]:.2f} after"
    )
    say()
    say(
        "Reconcile passes (Monitor.tick on the monitor thread; CPU = that thread's CPU time, "
        f"median of {sizes[0]['passes']['passes']} passes; test driver in-process)"
    )
    say(
        "| runners | to Idle | CPU/pass p50 | p90 | max | wall p50 | CPU/runner/pass "
        "| pass ratio | per-runner ratio |"
    )
    say("|---|---|---|---|---|---|---|---|---|")
    previous = None
    ratios = []
    derived: dict[str, Any] = results.setdefault("derived", {"sizes": {}})
    for entry in sizes:
        size, passes = entry["size"], entry["passes"]
        per_runner = passes["cpu_median"] / size
        row: dict[str, Any] = {"cpu_per_runner": per_runner}
        if previous is None:
            pass_ratio = runner_ratio = "—"
        else:
            p_size, p_passes = previous["size"], previous["passes"]
            pass_x = passes["cpu_median"] / p_passes["cpu_median"]
            runner_x = per_runner / (p_passes["cpu_median"] / p_size)
            ratios.append(runner_x)
            row.update(previous_size=p_size, pass_ratio=pass_x, per_runner_ratio=runner_x)
            pass_ratio = f"{pass_x:.2f} × (size {size / p_size:.0f} ×)"
            runner_ratio = f"{runner_x:.2f} ×"
        derived["sizes"][str(size)] = row
        say(
            f"| {size} | {entry['setup_seconds']:.1f} s | {ms(passes['cpu_median'])} ms "
            f"| {ms(passes['cpu_p90'])} ms | {ms(passes['cpu_max'])} ms "
            f"| {ms(passes['wall_median'])} ms | {per_runner * 1e6:.1f} µs "
            f"| {pass_ratio} | {runner_ratio} |"
        )
        previous = entry
    if len(sizes) > 1:
        # Least squares: CPU per pass = fixed + per_runner × runners.
        xs = [e["size"] for e in sizes]
        ys = [e["passes"]["cpu_median"] for e in sizes]
        slope, fixed = statistics.linear_regression(xs, ys)
        derived["fit"] = {"fixed": fixed, "per_runner": slope}
        say(
            f"least-squares fit over the sizes: CPU per pass = {ms(fixed)} ms + "
            f"{slope * 1e6:.1f} µs × runners"
        )
    say()
    say("Resident memory of the monitor's process (VmRSS; before = every module imported)")
    say("| runners | before | with the runners Idle | delta | delta per runner | peak (VmHWM) |")
    say("|---|---|---|---|---|---|")
    for entry in sizes:
        delta = entry["memory"]["VmRSS"] - entry["rss_before"]
        say(
            f"| {entry['size']} | {mib(entry['rss_before'])} MiB "
            f"| {mib(entry['memory']['VmRSS'])} MiB | {mib(delta)} MiB "
            f"| {delta / entry['size'] / 1024:.1f} KiB | {mib(entry['memory']['VmHWM'])} MiB |"
        )
    if len(sizes) > 1:
        low, high = sizes[0], sizes[-1]
        slope = (high["memory"]["VmRSS"] - low["memory"]["VmRSS"]) / (high["size"] - low["size"])
        derived["rss_per_runner"] = slope
        say(
            f"per runner, from {low['size']} to {high['size']} runners: "
            f"{slope / 1024:.1f} KiB (the slope: fixed costs left out)"
        )
    driver = results["driver"]
    driver_delta = driver["rss_after"] - driver["rss_before"]
    say(
        f"test driver alone with {driver['size']} running guests: +{mib(driver_delta)} MiB "
        "(in the monitor's process only because the test driver runs in-process)"
    )
    say()
    idle = [e for e in sizes if "idle" in e]
    if idle:
        say("The monitor's process while the runners stay Idle (every job as scheduled)")
        say("| runners | CPU | of wall time | by thread |")
        say("|---|---|---|---|")
        for entry in idle:
            use = entry["idle"]
            threads = sorted(use["by_thread"].items(), key=lambda item: -item[1])
            shares = ", ".join(f"{name} {value:.2f} s" for name, value in threads)
            say(
                f"| {entry['size']} | {use['cpu']:.2f} s in {use['seconds']:.0f} s "
                f"| {use['share'] * 100:.1f} % of a core | {shares} |"
            )
        say()
    say("Screenshot passes (the scheduler's job, ScreenshotStore.refresh; thread CPU)")
    say("| runners | steady pass (every screen unchanged): CPU / wall |")
    say("|---|---|")
    for entry in sizes:
        steady = entry["screenshots_steady"]
        say(f"| {entry['size']} | {ms(steady['cpu'])} / {ms(steady['wall'])} ms |")
    shots = next((e["screenshots"] for e in sizes if "screenshots" in e), None)
    if shots is not None:
        first, second = shots["first"], shots["second"]
        say(
            f"{shots['guests']} guests, fresh store, median of {shots['rounds']}: first pass "
            f"(all new) {ms(first['cpu'])} ms CPU ({ms(first['wall'])} ms wall, "
            f"{first['cpu'] / shots['guests'] * 1000:.2f} ms a screen), second pass "
            f"(unchanged) {ms(second['cpu'])} ms CPU ({ms(second['wall'])} ms wall)"
        )
    api_entry = next((e for e in sizes if "api" in e), None)
    checks: dict[str, bool] = {}
    for entry in sizes:
        per_runner = entry["passes"]["cpu_median"] / entry["size"]
        checks[f"{entry['size']} runners: CPU per runner per pass <= 1 ms"] = (
            per_runner <= CPU_PER_RUNNER_LIMIT
        )
    if ratios:
        checks[
            f"linear: per-runner cost at {sizes[-1]['size']} <= {LINEAR_LIMIT} x at "
            f"{sizes[-2]['size']}"
        ] = ratios[-1] <= LINEAR_LIMIT
    if api_entry is not None:
        api = api_entry["api"]
        steady, change = api["steady"], api["change"]
        say()
        say(
            f"GitHub API with {api_entry['size']} steady runners, api_cache_timeout "
            f"{api['api_cache_timeout']:.0f} s, monitor_poll_interval "
            f"{api['monitor_poll_interval']:.0f} s, counted at the stand-in for "
            f"{steady['seconds']:.0f} s, scaled to an hour:"
        )
        say(
            f"  counted against the rate limit: {steady['counted']} "
            f"= {steady['counted_per_hour']:.1f}/h (upstream: {UPSTREAM_CALLS_PER_HOUR:.0f}/h)"
        )
        say(
            f"  all requests: {steady['all']} = {steady['all_per_hour']:.0f}/h, of which list "
            f"fetches {steady['list_fetches']} = {steady['list_fetches_per_hour']:.0f}/h, "
            f"answered 304: {steady['not_modified']}"
        )
        if steady["forced_fetch"]:
            say("  (quick: one list fetch forced at the start, so the rates per hour mean nothing)")
        if steady["counted_requests"]:
            say(f"  counted: {', '.join(steady['counted_requests'])}")
        delays = change["delays"]
        shown = ", ".join(f"{kind} after {value:.1f} s" for kind, value in delays.items())
        when = "right after a list fetch (worst case)" if change["worst_case"] else "at any time"
        say(
            f"  a runner going busy at the stand-in {when}: shown {shown} "
            f"(upstream: up to {UPSTREAM_DELAY:.0f} s); calls meanwhile {change['all']}, "
            f"counted {change['counted']}"
        )
        checks[f"steady: <= {CALLS_PER_HOUR_LIMIT:.0f} counted GitHub calls an hour"] = (
            steady["counted_per_hour"] <= CALLS_PER_HOUR_LIMIT and steady["still_idle"]
        )
        checks[f"a change shows within {UPSTREAM_DELAY:.0f} s"] = all(
            value <= UPSTREAM_DELAY for value in delays.values()
        )
    say()
    for entry in sizes:
        if "profile" in entry["passes"]:
            say(f"profile of the passes with {entry['size']} runners:")
            say(entry["passes"]["profile"])
    for name, ok in checks.items():
        say(f"{'PASS' if ok else 'FAIL'}: {name}")
    return checks


def main() -> int:
    args = parse_args()
    results = run(args)
    out = sys.stderr if args.json == "-" else sys.stdout
    checks = report(results, out)
    results["checks"] = checks
    if args.json == "-":
        print(json.dumps(results, indent=1))
    elif args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(RESULT_PREFIX + json.dumps(child(json.loads(sys.argv[2]))), flush=True)
        sys.exit(0)
    if sys.argv[1:2] == ["--driver-child"]:
        print(RESULT_PREFIX + json.dumps(driver_child(int(sys.argv[2]))), flush=True)
        sys.exit(0)
    sys.exit(main())
