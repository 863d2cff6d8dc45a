"""CPU time of one screenshot pass over `--guests` runner guests (the dashboard's screenshot
job, run every 5 s by the scheduler).

One process: libvirt's test driver on a private node file with `--guests` running guests,
and the job's `ScreenshotStore.refresh` (what `Monitor.refresh_screenshots` calls with the
observed runners' guests) writing into a temporary directory. Measured per pass: wall time,
the CPU time of the thread running it (`time.thread_time`, what the store itself records) and
of the whole process (`time.process_time`, which includes libvirt's event loop thread).

Scenarios, each `--rounds` times with a fresh store (the median is shown):
- test driver, first pass: every screen is new, so each is decoded and thumbnailed (the test
  driver's 1120×832 grayscale PNG is kept as it is, as QEMU 7.1+'s PNGs are);
- test driver, second pass: nothing changed, so each screen is only captured and hashed;
- QEMU-like PPM, first and second pass: the same with a synthetic 1024×768 RGB text console
  in PPM (what QEMU before 7.1 gives), which also needs a full PNG encode;
- capture only: the libvirt calls alone, for context.

Fails (exit 1) if a pass does not encode, or skip, every guest as expected. There is no speed
target: the numbers are recorded in docs/benchmarks.md.

    .venv/bin/python -m bench.screenshot_pass [--guests 20 --rounds 3]
"""

from __future__ import annotations

import argparse
import io
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from PIL import ImageDraw

from monitor.hypervisor.libvirt_hypervisor import LibvirtHypervisor
from monitor.screenshots import PassResult
from monitor.screenshots import ScreenshotStore
from tests.support.constants import NODE_POOL as POOL
from tests.support.constants import NODE_XML
from tests.support.constants import TEST_GUEST_XML

PPM_SIZE = (1024, 768)


@dataclass
class Sample:
    result: PassResult
    process_seconds: float


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--guests", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="fresh stores per scenario")
    args = parser.parse_args()
    if args.guests < 1 or args.rounds < 1:
        parser.error("--guests and --rounds must be at least 1")
    return args


def console_ppm(number: int) -> bytes:
    """A 1024×768 RGB PPM of a text console, different for each guest (as QEMU would give
    for a guest that has booted and printed a few screens of log)."""
    image = Image.new("RGB", PPM_SIZE, (0, 0, 0))
    draw = ImageDraw.Draw(image)
    for row in range(0, PPM_SIZE[1], 16):
        line = f"[{row / 16:6.2f}] guest {number}: booted: hello 192.168.150.{number} runner ok "
        draw.text((0, row), line * 2, fill=(170, 170, 170))
    out = io.BytesIO()
    image.save(out, format="PPM")
    return out.getvalue()


def timed_pass(
    store: ScreenshotStore, guests: dict[int, str], capture: Callable[[str], bytes]
) -> Sample:
    process_started = time.process_time()
    result = store.refresh(guests, capture)
    return Sample(result, time.process_time() - process_started)


def run_scenario(
    root: Path, guests: dict[int, str], capture: Callable[[str], bytes], rounds: int
) -> tuple[list[Sample], list[Sample]]:
    """(first passes, second passes) over `rounds` fresh stores."""
    firsts, seconds = [], []
    for number in range(rounds):
        directory = root / f"store-{number}"
        store = ScreenshotStore(directory)
        firsts.append(timed_pass(store, guests, capture))
        seconds.append(timed_pass(store, guests, capture))
        shutil.rmtree(directory)
    return firsts, seconds


def capture_only(
    guests: dict[int, str], capture: Callable[[str], bytes], rounds: int
) -> list[Sample]:
    samples = []
    for _ in range(rounds):
        wall, thread, process = time.perf_counter(), time.thread_time(), time.process_time()
        for name in guests.values():
            capture(name)
        result = PassResult(
            wall_seconds=time.perf_counter() - wall, cpu_seconds=time.thread_time() - thread
        )
        samples.append(Sample(result, time.process_time() - process))
    return samples


def row(name: str, samples: list[Sample], guests: int) -> str:
    def median(values: list[float]) -> float:
        return statistics.median(values) * 1000

    wall = median([s.result.wall_seconds for s in samples])
    thread = median([s.result.cpu_seconds for s in samples])
    process = median([s.process_seconds for s in samples])
    last = samples[-1].result
    counts = f"{last.encoded:>3} {last.unchanged:>3} {last.failed:>3}"
    return (
        f"| {name:<38} | {counts} | {wall:10.1f} | {thread:10.1f} | {process:11.1f} "
        f"| {thread / guests:9.2f} |"
    )


def check(name: str, samples: list[Sample], encoded: int, unchanged: int) -> list[str]:
    return [
        f"FAIL: {name}: {s.result.encoded} encoded, {s.result.unchanged} unchanged, "
        f"{s.result.failed} failed (expected {encoded}, {unchanged}, 0)"
        for s in samples
        if (s.result.encoded, s.result.unchanged, s.result.failed) != (encoded, unchanged, 0)
    ]


def main() -> int:
    args = parse_args()
    root = Path(tempfile.mkdtemp(prefix="monitor-bench-screenshots-"))
    node = root / "node.xml"
    node.write_text(NODE_XML)
    base = root / "base.img"
    with open(base, "wb") as image:
        image.truncate(16 * 1024 * 1024)
    hypervisor = LibvirtHypervisor(f"test://{node}", POOL)
    try:
        guests = {number: f"linux.{number}" for number in range(1, args.guests + 1)}
        for name in guests.values():
            hypervisor.create_guest(name, TEST_GUEST_XML.format(profile="linux"), base)
            hypervisor.start_guest(name)
        ppms = {name: console_ppm(number) for number, name in guests.items()}

        driver_first, driver_second = run_scenario(
            root, guests, hypervisor.screenshot_raw, args.rounds
        )
        ppm_first, ppm_second = run_scenario(root, guests, ppms.__getitem__, args.rounds)
        captures = capture_only(guests, hypervisor.screenshot_raw, args.rounds)
    finally:
        hypervisor.close()
        shutil.rmtree(root, ignore_errors=True)

    n = args.guests
    sample_ppm = len(next(iter(ppms.values())))
    print(
        f"{n} guests, median of {args.rounds} rounds; times in ms; test driver screen "
        f"1120x832 L PNG, synthetic screen {PPM_SIZE[0]}x{PPM_SIZE[1]} RGB PPM "
        f"({sample_ppm} bytes)"
    )
    header = (
        f"| {'pass':<38} | enc unc err | {'wall':>10} | {'thread CPU':>10} "
        f"| {'process CPU':>11} | {'CPU/guest':>9} |"
    )
    print(header)
    print("|".join("-" * len(cell) if cell else "" for cell in header.split("|")))
    print(row("test driver PNG, first (all changed)", driver_first, n))
    print(row("test driver PNG, second (unchanged)", driver_second, n))
    print(row("QEMU-like PPM, first (all changed)", ppm_first, n))
    print(row("QEMU-like PPM, second (unchanged)", ppm_second, n))
    print(row("capture only (test driver)", captures, n))

    failures = (
        check("test driver, first pass", driver_first, n, 0)
        + check("test driver, second pass", driver_second, 0, n)
        + check("PPM, first pass", ppm_first, n, 0)
        + check("PPM, second pass", ppm_second, 0, n)
    )
    for failure in failures:
        print(failure)
    if not failures:
        print("PASS: first passes encoded every guest, second passes skipped every guest")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
