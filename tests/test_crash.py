"""Crash safety (issue [5/6]): `kill -9` of `monitor run` during create, destroy and reserve,
against the real libvirtd (qemu:///system, pool monitor-test); after each restart on the same
data dir the monitor converges: no orphan guest, registration or volume, no runner reserved
twice, no id reused.

A short run of `bench/crash.py` (5 kill points, about 75 s); the full run of 20 points is
`.venv/bin/python -m bench.crash --points 20` (docs/reliability.md, "Crash safety").
Needs `bash tests/libvirtd.sh`; skipped without it, unless MONITOR_REQUIRE_LIBVIRTD=1.
"""

from __future__ import annotations

import pytest

libvirt = pytest.importorskip("libvirt")

from bench import crash  # noqa: E402
from tests.support.under_pytest import require_libvirtd  # noqa: E402

pytestmark = pytest.mark.libvirtd

POINTS = 5  # each phase at least once (bench.crash.balanced_phases)
SEED = 2


@pytest.fixture
def real_libvirtd() -> None:
    try:
        connection = libvirt.open(crash.URI)
    except libvirt.libvirtError as error:
        require_libvirtd(f"cannot connect to {crash.URI}: {error}")
    try:
        if not connection.storagePoolLookupByName(crash.POOL).isActive():
            require_libvirtd(f"storage pool {crash.POOL} is not active")
    except libvirt.libvirtError as error:
        require_libvirtd(f"no storage pool {crash.POOL}: {error}")
    finally:
        connection.close()


def test_monitor_converges_after_kill_9_during_create_destroy_and_reserve(tmp_path, real_libvirtd):
    report = crash.run(POINTS, seed=SEED, root=tmp_path)
    table = report.table()
    print(table)  # shown when the test fails: phase, what was left, time to converge

    assert len(report.points) == POINTS
    assert report.phases_hit >= set(crash.PHASES), table
    not_converged = [p for p in report.points if p.converged_in is None]
    assert not_converged == [], table
    # Orphan guests, registrations, volumes; a runner or unique_id reserved twice; an id
    # reused: each is a violation.
    assert report.violations == [], "\n".join([*report.violations, table])
