"""LibvirtHypervisor end to end on a real libvirtd + QEMU (TCG), as set up by tests/libvirtd.sh.

Needs root, `bash tests/libvirtd.sh` (pool and network `monitor-test`) and qemu-img. Skipped
when libvirtd is not reachable, unless MONITOR_REQUIRE_LIBVIRTD=1 makes that a failure.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

libvirt = pytest.importorskip("libvirt")

from PIL import Image  # noqa: E402

from monitor.errors import MonitorError  # noqa: E402
from monitor.errors import TransientError  # noqa: E402
from monitor.hypervisor import SOURCE_POOL_PREFIX  # noqa: E402
from monitor.hypervisor import Guest  # noqa: E402
from monitor.hypervisor.libvirt_hypervisor import LibvirtHypervisor  # noqa: E402
from monitor.images import make_seed_iso  # noqa: E402
from tests.support.libvirtd import LIBVIRTD_PID  # noqa: E402
from tests.support.libvirtd import NETWORK  # noqa: E402
from tests.support.libvirtd import POOL  # noqa: E402
from tests.support.libvirtd import SUBNET  # noqa: E402
from tests.support.libvirtd import URI  # noqa: E402
from tests.support.under_pytest import require_libvirtd  # noqa: E402

pytestmark = pytest.mark.libvirtd

log = logging.getLogger(__name__)

# TCG ('qemu'): KVM exists on these machines but guests hang in early boot. The disk source
# is a placeholder that runner_domain_xml replaces with the runner's overlay volume. Booting
# from the network makes iPXE ask dnsmasq for a lease (~6 s under TCG), which gives
# ipv4_address a real DHCP lease to find; there is no OS, the screen shows SeaBIOS and iPXE.
TEMPLATE_XML = f"""\
<domain type='qemu'>
  <name>monitor-test.template</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='network'/></os>
  <features><acpi/><apic/></features>
  <on_reboot>destroy</on_reboot>
  <devices>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>
      <source dev='/dev/null'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:00:00:01'/>
      <source network='{NETWORK}'/>
      <model type='virtio'/>
    </interface>
    <graphics type='vnc' listen='127.0.0.1' autoport='yes'/>
    <video><model type='vga'/></video>
    <memballoon model='none'/>
  </devices>
</domain>
"""


@pytest.fixture(scope="module")
def conn():
    """A separate connection to inspect libvirtd's state from outside the hypervisor."""
    try:
        connection = libvirt.open(URI)
    except libvirt.libvirtError as e:
        require_libvirtd(f"cannot connect to {URI}: {e}")
    try:
        pool = connection.storagePoolLookupByName(POOL)
        if not pool.isActive():
            require_libvirtd(f"storage pool {POOL} is not active")
    except libvirt.libvirtError as e:
        require_libvirtd(f"no storage pool {POOL}: {e}")
    if shutil.which("qemu-img") is None:
        require_libvirtd("qemu-img is missing")
    yield connection
    connection.close()


@pytest.fixture
def base_image(conn):
    """A tiny qcow2 base image in the pool directory, not known to the pool as a volume."""
    pool_dir = ET.fromstring(conn.storagePoolLookupByName(POOL).XMLDesc()).findtext("target/path")
    path = Path(pool_dir) / f"pytest-base-{uuid.uuid4().hex[:8]}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "32M"], check=True)
    yield path
    path.unlink(missing_ok=True)


@pytest.fixture
def hv():
    hypervisor = LibvirtHypervisor(URI, POOL)
    yield hypervisor
    hypervisor.close()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _timed(timings: dict[str, float], step: str, call, *args):
    start = time.monotonic()
    result = call(*args)
    timings[step] = time.monotonic() - start
    return result


def _wait_for_ipv4(hv: LibvirtHypervisor, name: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while (address := hv.ipv4_address(name)) is None:
        assert time.monotonic() < deadline, f"no IPv4 address for {name} after {timeout} s"
        time.sleep(0.5)
    return address


def test_runner_guest_on_real_qemu(conn, hv, base_image):
    name = f"monitor-pytest-{uuid.uuid4().hex[:8]}.1"
    base_digest = _sha256(base_image)
    timings: dict[str, float] = {}
    # A left-over file the pool does not know: create must refresh the pool and replace it.
    (base_image.parent / f"{name}.qcow2").write_bytes(b"left over")
    try:
        _timed(timings, "create", hv.create_guest, name, TEMPLATE_XML, base_image)

        assert hv.list_guests("monitor-pytest-") == [Guest(name, active=False)]
        volume = conn.storagePoolLookupByName(POOL).storageVolLookupByName(f"{name}.qcow2")
        overlay = Path(volume.path())
        assert overlay.exists()
        info = json.loads(
            subprocess.run(
                ["qemu-img", "info", "--output=json", str(overlay)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        )
        assert info["format"] == "qcow2"
        assert info["backing-filename"] == str(base_image)
        assert info["backing-filename-format"] == "qcow2"
        assert info["virtual-size"] == 32 * 1024 * 1024

        _timed(timings, "start", hv.start_guest, name)
        assert hv.list_guests("monitor-pytest-") == [Guest(name, active=True)]

        png = _timed(timings, "screenshot", hv.screenshot_png, name)
        with Image.open(io.BytesIO(png)) as image:
            assert image.format == "PNG"
            assert image.size[0] >= 320 and image.size[1] >= 200

        # iPXE's lease. The agent and ARP sources fail here; that must not escape.
        address = _timed(timings, "ipv4 (until iPXE's lease)", _wait_for_ipv4, hv, name)
        assert ipaddress.IPv4Address(address) in SUBNET
        mac = ET.fromstring(conn.lookupByName(name).XMLDesc()).find("devices/interface/mac")
        leases = conn.networkLookupByName(NETWORK).DHCPLeases(mac.get("address"))
        assert address in [lease["ipaddr"] for lease in leases]

        _timed(timings, "destroy", hv.destroy_guest, name)
        assert hv.list_guests("monitor-pytest-") == []
        with pytest.raises(libvirt.libvirtError):
            conn.lookupByName(name)
        assert f"{name}.qcow2" not in conn.storagePoolLookupByName(POOL).listVolumes()
        assert not overlay.exists()
        assert base_image.exists() and _sha256(base_image) == base_digest

        _timed(timings, "destroy again", hv.destroy_guest, name)
    finally:
        log.warning("qemu timings: %s", {k: round(v, 3) for k, v in timings.items()})
        hv.destroy_guest(name)
        (base_image.parent / f"{name}.qcow2").unlink(missing_ok=True)  # if create failed


def _qemu_img_info(path: Path) -> dict:
    result = subprocess.run(
        ["qemu-img", "info", "--output=json", str(path)], check=True, capture_output=True, text=True
    )
    return json.loads(result.stdout)


def test_rebuild_guest_on_real_qemu(conn, hv, tmp_path):
    """A rebuild guest as the rebuild worker drives it, on its timeout path: the iPXE guest
    never powers off. Its image is a copy of a raw file outside every pool, with a seed ISO."""
    tag = uuid.uuid4().hex[:8]
    guest, runner = f"monitor-pytest-rebuild-{tag}", f"monitor-pytest-{tag}.1"
    prefix = f"monitor-pytest-image-{tag}@"
    volume = f"{prefix}2024-05-01T00:00:00Z.qcow2"
    source = tmp_path / "image-deps" / "disk.raw"
    source.parent.mkdir()
    source.write_bytes(os.urandom(1024 * 1024) + bytes(15 * 1024 * 1024))
    profile = tmp_path / "profile"
    profile.mkdir()
    (profile / "user-data").write_text("#cloud-config\n")
    (profile / "meta-data").write_text("instance-id: rebuild\n")
    if shutil.which("genisoimage") is None:
        require_libvirtd("genisoimage is missing")
    seed = make_seed_iso(profile, tmp_path / "config.iso")
    timings: dict[str, float] = {}
    try:
        path = _timed(
            timings,
            "create",
            hv.create_image_guest,
            guest,
            TEMPLATE_XML,
            volume,
            64 * 1024 * 1024,
            source,
            seed,
        )

        assert path.exists() and hv.volume_path(volume) == path
        info = _qemu_img_info(path)
        assert info["format"] == "qcow2"
        assert info["virtual-size"] == 64 * 1024 * 1024  # grown from the source's 16 MiB
        assert "backing-filename" not in info  # a copy that stands alone
        compare = subprocess.run(
            ["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(source), str(path)],
            capture_output=True,
            text=True,
        )
        assert compare.returncode == 0, compare.stdout + compare.stderr
        assert not [p for p in conn.listStoragePools() if p.startswith(SOURCE_POOL_PREFIX)]
        devices = ET.fromstring(conn.lookupByName(guest).XMLDesc()).find("devices")
        assert devices.find("disk[@device='disk']/source").get("file") == str(path)
        assert devices.find("disk[@device='cdrom']/source").get("file") == str(seed)
        assert hv.guest_state(guest) == "shutoff"

        _timed(timings, "start", hv.start_guest, guest)
        deadline = time.monotonic() + 2  # the rebuild's timeout, shortened
        while time.monotonic() < deadline:
            assert hv.guest_state(guest) == "running"
            time.sleep(0.5)
        _timed(timings, "remove", hv.remove_image_guest, guest)

        assert hv.guest_state(guest) is None
        with pytest.raises(libvirt.libvirtError):
            conn.lookupByName(guest)
        assert path.exists()  # the product stays
        assert hv.list_image_volumes(prefix) == [volume]
        hv.remove_image_guest(guest)

        # A runner on the new image: its base image cannot be deleted under it.
        hv.create_guest(runner, TEMPLATE_XML, path)
        assert _qemu_img_info(Path(hv.volume_path(f"{runner}.qcow2")))["backing-filename"] == str(
            path
        )
        with pytest.raises(MonitorError) as refused:
            hv.delete_volume(volume)
        assert refused.value.status == 409
        assert f"{runner}.qcow2" in str(refused.value)
        assert path.exists()

        hv.destroy_guest(runner)
        _timed(timings, "delete", hv.delete_volume, volume)
        assert not path.exists() and hv.volume_path(volume) is None
        hv.delete_volume(volume)  # gone already: fine
    finally:
        log.warning("rebuild timings: %s", {k: round(v, 3) for k, v in timings.items()})
        hv.remove_image_guest(guest)
        hv.destroy_guest(runner)
        try:
            hv.delete_volume(volume)
        except MonitorError as e:
            log.warning("cleanup: %s", e)


def test_image_from_a_qcow2_overlay_in_a_directory_another_pool_covers(conn, hv, tmp_path):
    """A pool (here: one a killed monitor's copy left behind) already covers the source's
    directory: the copy uses it, refreshed, and leaves it alone. The source is an overlay;
    the image gets its whole chain's content and no backing file."""
    tag = uuid.uuid4().hex[:8]
    guest, volume = f"monitor-pytest-rebuild-{tag}", f"monitor-pytest-image-{tag}@1.qcow2"
    directory = tmp_path / "image-deps"
    directory.mkdir()
    pool_xml = (
        f"<pool type='dir'><name>monitor-pytest-deps-{tag}</name>"
        f"<target><path>{directory}</path></target></pool>"
    )
    other_pool = conn.storagePoolCreateXML(pool_xml, 0)
    try:
        base = directory / "base.raw"
        base.write_bytes(os.urandom(1024 * 1024) + bytes(7 * 1024 * 1024))
        source = directory / "overlay.qcow2"  # made after the pool's last refresh
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(source)],
            check=True,
        )

        path = hv.create_image_guest(guest, TEMPLATE_XML, volume, 16 * 1024 * 1024, source)

        info = _qemu_img_info(path)
        assert (info["format"], info["virtual-size"]) == ("qcow2", 16 * 1024 * 1024)
        assert "backing-filename" not in info
        compare = subprocess.run(
            ["qemu-img", "compare", "-F", "qcow2", str(source), str(path)],
            capture_output=True,
            text=True,
        )
        assert compare.returncode == 0, compare.stdout + compare.stderr
        assert other_pool.isActive()
        assert not [p for p in conn.listStoragePools() if p.startswith(SOURCE_POOL_PREFIX)]
    finally:
        hv.remove_image_guest(guest)
        hv.delete_volume(volume)
        other_pool.destroy()


def _sparse_image_with_data(path: Path, size: int) -> None:
    """A raw image with one non-zero byte in every 64 KiB: cheap to write, but qemu-img must
    copy every cluster of it."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset in range(0, size, 65536):
            f.seek(offset)
            f.write(b"\x01")


def test_calls_go_on_while_an_image_is_copied(conn, hv, tmp_path, base_image, caplog):
    """The copy runs on its own connection, so the hypervisor's other calls do not wait for
    it; and libvirt refuses to refresh a pool while a volume is built in it, so listings
    then use what libvirt knows instead of failing."""
    tag = uuid.uuid4().hex[:8]
    guest, volume = f"monitor-pytest-rebuild-{tag}", f"monitor-pytest-image-{tag}@1.qcow2"
    runner = f"monitor-pytest-{tag}.1"
    source = tmp_path / "source.raw"
    _sparse_image_with_data(source, 1024**3)
    outcome: list[object] = []

    def create() -> None:
        try:
            outcome.append(hv.create_image_guest(guest, TEMPLATE_XML, volume, 1024**3, source))
        except BaseException as e:  # handed to the test
            outcome.append(e)

    copier = threading.Thread(target=create, daemon=True)
    latencies: list[float] = []
    try:
        with caplog.at_level(logging.DEBUG, logger="monitor.hypervisor"):
            start = time.monotonic()
            copier.start()
            while copier.is_alive():
                call_start = time.monotonic()
                hv.list_volumes("monitor-pytest-")
                hv.list_image_volumes("monitor-pytest-image-")
                hv.list_guests("monitor-pytest-")
                if not latencies:  # a runner comes and goes meanwhile
                    hv.create_guest(runner, TEMPLATE_XML, base_image)
                    hv.destroy_guest(runner)
                latencies.append(time.monotonic() - call_start)
            copier.join()
            copy_seconds = time.monotonic() - start
        assert isinstance(outcome[0], Path), outcome[0]
        busy = [r for r in caplog.records if "asynchronous jobs" in r.getMessage()]
        log.warning(
            "copy %.2f s; %d rounds of calls meanwhile, the slowest %.3f s; %d refreshes refused",
            copy_seconds,
            len(latencies),
            max(latencies),
            len(busy),
        )
        assert busy, "no listing ran during the copy"
        # Calls that waited for the copy would make one or two rounds in all (measured: 1).
        assert len(latencies) >= 10
        assert volume in hv.list_image_volumes("monitor-pytest-image-")
    finally:
        copier.join(120)
        hv.destroy_guest(runner)
        hv.remove_image_guest(guest)
        hv.delete_volume(volume)


def _libvirtd_pid() -> int:
    try:
        pid = int(LIBVIRTD_PID.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError) as e:
        require_libvirtd(f"no running libvirtd in {LIBVIRTD_PID}: {e}")
    return pid


def _call_in_thread(call, *args, timeout: float) -> tuple[object, float]:
    """Run `call(*args)` in a daemon thread; return (its result or exception, seconds), or
    fail the test if it is still blocked after `timeout` s."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call(*args))
        except BaseException as e:  # handed to the test
            outcome.append(e)

    start = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    elapsed = time.monotonic() - start
    assert not thread.is_alive(), f"{call.__name__} still blocked after {timeout} s"
    return outcome[0], elapsed


def test_hung_libvirtd_makes_calls_fail_instead_of_blocking(conn):
    pid = _libvirtd_pid()
    hv = LibvirtHypervisor(URI, POOL, open_timeout=5)
    timings: dict[str, float] = {}
    try:
        assert isinstance(hv.list_guests(""), list)  # connected, with keepalive
        os.kill(pid, signal.SIGSTOP)
        try:
            # Keepalive: 3 unanswered pings 5 s apart close the connection (~20 s).
            error, timings["call on the open connection"] = _call_in_thread(
                hv.list_guests, "", timeout=60
            )
            assert isinstance(error, TransientError), error
            assert "keepalive" in str(error)
            assert hv.connection._conn is None  # dropped: the next call opens a new connection

            # Still hung: opening a new connection gives up after open_timeout.
            error, timings["reconnect"] = _call_in_thread(hv.list_guests, "", timeout=60)
            assert isinstance(error, TransientError), error
            assert "no answer within 5 s" in str(error)
        finally:
            os.kill(pid, signal.SIGCONT)

        # The daemon answers again: the pending open completes and calls work.
        guests, timings["after SIGCONT"] = _call_in_thread(hv.list_guests, "", timeout=60)
        assert isinstance(guests, list), guests
        assert all(v.endswith(".qcow2") for v in hv.list_volumes("monitor-pytest-"))
    finally:
        log.warning("hung libvirtd timings: %s", {k: round(v, 2) for k, v in timings.items()})
        hv.close()
