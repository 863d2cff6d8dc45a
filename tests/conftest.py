"""Shared fixtures: a real config file written per test, a real SQLite store per test, the rigs
of tests/support, and the connection and guest image of the real-VM tests. Helpers and
constants live in tests/support."""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import time
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path

import pytest

from monitor import config as config_module
from monitor import models
from monitor.hypervisor.libvirt_hypervisor import LibvirtHypervisor
from monitor.standin import GitHubStandIn
from tests.support import served
from tests.support import vms
from tests.support.configs import write_config
from tests.support.constants import GITHUB_TOKEN
from tests.support.libvirtd import NETWORK
from tests.support.libvirtd import POOL
from tests.support.libvirtd import QEMU_GUEST_XML
from tests.support.libvirtd import URI
from tests.support.rigs import Rig
from tests.support.under_pytest import require_libvirtd

log = logging.getLogger(__name__)


@pytest.fixture
def make_config(tmp_path):
    def make(**kwargs):
        path = write_config(tmp_path, **kwargs)
        return config_module.load(path, environ={})

    return make


@pytest.fixture
def store(tmp_path):
    models.open_store(tmp_path / "data")
    yield models
    models.close_store()


@pytest.fixture
def make_rig(make_config, store):
    """Started in-process rigs (tests/support/rigs.py); stopped after the test."""
    rigs = []

    def make(**kwargs) -> Rig:
        rig = Rig(make_config(**kwargs))
        rig.monitor.start()
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.monitor.stop()


@pytest.fixture
def make_served_rig(
    tmp_path: Path, standin: GitHubStandIn
) -> Iterator[Callable[..., served.Rig]]:
    """One served rig per test (tests/support/served.py) on the module's `standin`."""
    rigs: list[served.Rig] = []

    def make(target: int, extra: str = "", *, online: bool = True) -> served.Rig:
        assert not rigs, "one rig per test"
        rig = served.start_rig(tmp_path, standin, target, extra, online=online)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        served.stop_rig(rig)
    models.close_store()


@pytest.fixture(scope="module")
def conn():
    """A connection of the test's own, to look at libvirtd from outside the monitor."""
    libvirt = pytest.importorskip("libvirt")
    try:
        connection = libvirt.open(URI)
    except libvirt.libvirtError as e:
        require_libvirtd(f"cannot connect to {URI}: {e}")
    try:
        if not connection.storagePoolLookupByName(POOL).isActive():
            require_libvirtd(f"storage pool {POOL} is not active")
        if not connection.networkLookupByName(NETWORK).isActive():
            require_libvirtd(f"network {NETWORK} is not active")
    except libvirt.libvirtError as e:
        require_libvirtd(f"no pool or network {POOL}: {e}")
    free = vms.free_addresses(connection)
    if free < vms.MIN_FREE_ADDRESSES:
        # Each guest gets a fresh MAC, and dnsmasq keeps its lease for the lease time after
        # it is gone (an hour on a network made by an older tests/libvirtd.sh): runs in
        # quick succession use the range up, and guests then boot to no address (a timeout
        # that says nothing about the cause).
        require_libvirtd(
            f"only {free} addresses of network {NETWORK}'s DHCP range are free (a lease "
            "outlives its guest)",
            "wait for some to expire, or run `bash tests/libvirtd.sh` again",
        )
    yield connection
    connection.close()


@pytest.fixture(scope="module")
def guest_image(conn) -> dict[str, Path]:
    """The kernel and initramfs from tests/guest/build.sh (cached between runs)."""
    work = Path(os.environ.get("MONITOR_GUEST_DIR", "/var/tmp/monitor-guest"))
    started = time.monotonic()
    result = subprocess.run(
        ["bash", str(vms.GUEST_SOURCES / "build.sh"), str(work)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    log.warning("guest image ready in %.2f s: %s", time.monotonic() - started, result.stderr)
    return {"kernel": work / "vmlinuz", "initrd": work / "initrd.gz"}


@pytest.fixture
def real(tmp_path: Path):
    """A config for the real libvirtd (tests/libvirtd.sh) with QEMU guests that need not boot,
    a guest prefix of the test's own, and a GitHub stand-in: (config, standin, prefix). The
    test's guests are removed after it."""
    libvirt = pytest.importorskip("libvirt")
    try:
        connection = libvirt.open(URI)
        connection.storagePoolLookupByName(POOL)
        connection.networkLookupByName(NETWORK)
        connection.close()
    except libvirt.libvirtError as error:
        require_libvirtd(f"no usable libvirtd at {URI} ({error})")
    prefix = f"ci-test{secrets.token_hex(3)}"
    standin = GitHubStandIn(token=GITHUB_TOKEN)
    standin.start()
    path = write_config(
        tmp_path,
        github_api_url=standin.base_url,
        libvirt_uri=URI,
        storage_pool=POOL,
        guest_xml=QEMU_GUEST_XML,
        extra=f'libvirt_runner_guest_prefix = "{prefix}"\n',
    )
    config = config_module.load(path, environ={})
    yield config, standin, prefix
    standin.stop()
    cleanup = LibvirtHypervisor(URI, POOL)
    for guest in cleanup.list_guests(prefix + "-"):
        cleanup.destroy_guest(guest.name)
    cleanup.close()
