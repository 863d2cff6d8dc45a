"""What the check before a profile's creates costs (issue [4/4]): `creation_blocker` (the
storage pool, a qcow2 probe volume made and deleted, qemu-img, the profile's domain XML
defined under a throwaway name and undefined, its networks, its base image), timed on
libvirt's test driver and, when tests/libvirtd.sh's libvirtd answers, on the real one.

The monitor runs it once before a profile's first creates, after a failed create, and every
`profile_check_interval` while the profile is impossible; this says what each such look adds.

    .venv/bin/python -m bench.preflight [--runs 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from monitor.errors import MonitorError
from monitor.hypervisor.libvirt_hypervisor import LibvirtHypervisor
from tests.support.constants import TEST_GUEST_XML
from tests.support.libvirtd import POOL
from tests.support.libvirtd import QEMU_GUEST_XML
from tests.support.libvirtd import URI


def timed(hypervisor: LibvirtHypervisor, template: str, base: Path, runs: int) -> list[float]:
    """Seconds each of `runs` checks took (after one to open the connection); every check
    must find nothing in the way."""
    assert hypervisor.creation_blocker(template, base) is None
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        blocker = hypervisor.creation_blocker(template, base)
        times.append(time.perf_counter() - started)
        assert blocker is None, blocker
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.preflight", description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as directory:
        base = Path(directory) / "base.img"
        base.write_bytes(b"\0" * (1 << 20))
        cases = [
            ("test:///default", "default-pool", TEST_GUEST_XML.format(profile="linux")),
            (URI, POOL, QEMU_GUEST_XML.format(profile="linux")),
        ]
        for uri, pool, template in cases:
            hypervisor = LibvirtHypervisor(uri, pool, open_timeout=5)
            try:
                times = timed(hypervisor, template, base, args.runs)
            except MonitorError as error:
                print(f"{uri}: skipped ({error})")
                continue
            finally:
                hypervisor.close()
            print(
                f"{uri}: creation_blocker median {statistics.median(times) * 1000:.1f} ms, "
                f"max {max(times) * 1000:.1f} ms ({args.runs} runs)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
