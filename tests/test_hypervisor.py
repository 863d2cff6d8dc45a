"""LibvirtHypervisor against the real libvirt-python binding and libvirt's test driver.

Each test opens its own `test:///<tmp>/node.xml`: every open of a custom node file gets a
private copy of its state, so tests are isolated and need no daemon. Because the state is
private to one connection, assertions about it go through the hypervisor's own connection.

What the test driver (libvirt 9.0) does with storage, as measured here: a `dir` pool declared in
the node file works without touching the disk; `createXML` of a volume with a `<backingStore>`
is accepted and echoed back in the volume XML, but no file is written and the backing path is
not checked; `storageVolLookupByPath` finds the node file's volumes; `delete` forgets the
volume. `undefineFlags` rejects VIR_DOMAIN_UNDEFINE_NVRAM ("unsupported flags (0x4)"), which
exercises the plain-undefine fallback. The screenshot is a fixed PNG, returned even for
inactive domains, and `interfaceAddresses` returns the same made-up lease for every source.
"""

from __future__ import annotations

import io
import ipaddress
import json
import logging
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
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
from monitor.hypervisor import EVENT_LOOP_THREAD_NAME  # noqa: E402
from monitor.hypervisor import Guest  # noqa: E402
from monitor.hypervisor.addresses import pick_ipv4  # noqa: E402
from monitor.hypervisor.connection import start_event_loop  # noqa: E402
from monitor.hypervisor.domain_xml import image_guest_domain_xml  # noqa: E402
from monitor.hypervisor.domain_xml import runner_domain_xml  # noqa: E402
from monitor.hypervisor.domain_xml import sniff_image  # noqa: E402
from monitor.hypervisor.libvirt_hypervisor import LibvirtHypervisor  # noqa: E402
from monitor.screenshots import to_png  # noqa: E402

ROOT = Path(__file__).parent.parent
FIXTURES = Path(__file__).parent / "fixtures"
UPSTREAM_GUEST_XML = FIXTURES / "upstream/profiles/servo-ubuntu2204/guest.xml"
MAC_RE = re.compile(r"^52:54:00(:[0-9a-f]{2}){3}$")
SUBNET = ipaddress.IPv4Network("192.168.151.0/24")
POOL = "runners"

NODE_XML = """\
<node xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
  <cpu><mhz>2000</mhz><nodes>1</nodes><sockets>1</sockets><cores>2</cores>
    <threads>1</threads></cpu>
  <memory>8388608</memory>
  <network>
    <name>monitor-test</name>
    <bridge name='virbr151'/>
    <ip address='192.168.151.1' netmask='255.255.255.0'>
      <dhcp><range start='192.168.151.100' end='192.168.151.200'/></dhcp>
    </ip>
  </network>
  <pool type='dir'>
    <name>{pool}</name>
    <target><path>{pool_dir}</path></target>
    <volume type='file'>
      <name>base.qcow2</name>
      <capacity unit='MiB'>64</capacity>
      <target><format type='qcow2'/></target>
    </volume>
  </pool>
</node>
"""

TEMPLATE_XML = """\
<domain type='test'>
  <name>linux.template</name>
  <uuid>8f2c1f3e-6f53-4d3c-9d5e-2f4b3c9a7e10</uuid>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source dev='/dev/null'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:b8:b3:dd'/>
      <source network='monitor-test'/>
    </interface>
  </devices>
</domain>
"""


@pytest.fixture
def pool_dir(tmp_path: Path) -> Path:
    return tmp_path / "pool"


@pytest.fixture
def uri(tmp_path: Path, pool_dir: Path) -> str:
    node = tmp_path / "node.xml"
    node.write_text(NODE_XML.format(pool=POOL, pool_dir=pool_dir))
    return f"test://{node}"


@pytest.fixture
def hv(uri: str):
    hypervisor = LibvirtHypervisor(uri, POOL)
    yield hypervisor
    hypervisor.close()


@pytest.fixture
def base(pool_dir: Path) -> Path:
    """The base image declared in the node file (the test driver writes no files)."""
    return pool_dir / "base.qcow2"


def _conn(hv: LibvirtHypervisor):
    return hv._connection()


def _volumes(hv: LibvirtHypervisor) -> list[str]:
    return sorted(v.name() for v in _conn(hv).storagePoolLookupByName(POOL).listAllVolumes())


def _domain_xml(hv: LibvirtHypervisor, name: str) -> ET.Element:
    return ET.fromstring(_conn(hv).lookupByName(name).XMLDesc(0))


def _canonical(element: ET.Element) -> str:
    return ET.canonicalize(ET.tostring(element, encoding="unicode"), strip_text=True)


# -- runner_domain_xml -------------------------------------------------------------------


def test_runner_domain_xml_clones_upstream_guest():
    template = UPSTREAM_GUEST_XML.read_text()

    result = runner_domain_xml(template, "servo-ubuntu2204.7", "/pool/servo-ubuntu2204.7.qcow2")

    old, new = ET.fromstring(template), ET.fromstring(result)
    assert new.findtext("name") == "servo-ubuntu2204.7"
    new_uuid = new.findtext("uuid")
    assert uuid.UUID(new_uuid).version == 4
    assert new_uuid != old.findtext("uuid")
    new_mac = new.find("devices/interface/mac").get("address")
    assert MAC_RE.match(new_mac)
    assert new_mac != old.find("devices/interface/mac").get("address")

    disk = new.find("devices/disk[@device='disk']")
    assert disk.get("type") == "file"
    assert disk.find("source").attrib == {"file": "/pool/servo-ubuntu2204.7.qcow2"}
    assert disk.find("driver").attrib == {
        "name": "qemu",
        "type": "qcow2",
        "cache": "none",
        "io": "native",
        "discard": "unmap",
    }
    assert "virt-clone(1) will replace this" in result  # comments survive
    assert "libosinfo:os" in result  # and so do namespace prefixes

    # Everything else is identical: apply the expected edits to the template and compare.
    old.find("name").text = "servo-ubuntu2204.7"
    old.find("uuid").text = new_uuid
    old.find("devices/interface/mac").set("address", new_mac)
    old_disk = old.find("devices/disk[@device='disk']")
    old_disk.set("type", "file")
    old_disk.find("driver").set("type", "qcow2")
    old_disk.find("source").attrib = {"file": "/pool/servo-ubuntu2204.7.qcow2"}
    assert _canonical(new) == _canonical(old)
    cdrom = "devices/disk[@device='cdrom']"
    assert _canonical(new.find(cdrom)) == _canonical(ET.fromstring(template).find(cdrom))


def test_runner_domain_xml_fills_in_missing_elements():
    template = """<domain type='kvm'>
      <os><type>hvm</type><nvram>/var/lib/libvirt/qemu/nvram/template_VARS.fd</nvram></os>
      <devices>
        <disk type='file' device='cdrom'><source file='/iso/config.iso'/></disk>
        <disk type='file' device='disk'>
          <target dev='vda'/>
          <backingStore type='file'><source file='/old/base.img'/></backingStore>
        </disk>
        <interface type='network'><source network='a'/></interface>
        <interface type='network'><source network='b'/></interface>
      </devices>
    </domain>"""

    new = ET.fromstring(runner_domain_xml(template, "r.1", "/pool/r.1.img", disk_format="raw"))

    assert new.findtext("name") == "r.1"
    uuid.UUID(new.findtext("uuid"))
    macs = [i.find("mac").get("address") for i in new.findall("devices/interface")]
    assert len(macs) == 2 and len(set(macs)) == 2 and all(MAC_RE.match(m) for m in macs)
    disk = new.find("devices/disk[@device='disk']")
    assert disk.find("driver").attrib == {"type": "raw"}
    assert disk.find("source").attrib == {"file": "/pool/r.1.img"}
    assert disk.find("backingStore") is None
    assert disk.find("target").get("dev") == "vda"
    cdrom = new.find("devices/disk[@device='cdrom']")
    assert cdrom.find("source").get("file") == "/iso/config.iso"
    # The shared NVRAM file becomes the template of the runner's own copy.
    nvram = new.find("os/nvram")
    assert nvram.get("template") == "/var/lib/libvirt/qemu/nvram/template_VARS.fd"
    assert not (nvram.text or "").strip()


def test_runner_domain_xml_gives_fresh_identity_each_time():
    first = ET.fromstring(runner_domain_xml(TEMPLATE_XML, "r.1", "/p/r.1.qcow2"))
    second = ET.fromstring(runner_domain_xml(TEMPLATE_XML, "r.1", "/p/r.1.qcow2"))

    assert first.findtext("uuid") != second.findtext("uuid")
    assert first.find("devices/interface/mac").get("address") != second.find(
        "devices/interface/mac"
    ).get("address")


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("<domain><name>x</name", "not valid XML"),
        ("", "not valid XML"),
        ("<network><name>x</name></network>", "not a <domain>"),
        ("<domain><name>x</name></domain>", "no <disk device='disk'>"),
        ("<domain><devices><disk device='cdrom'/></devices></domain>", "no <disk device='disk'>"),
    ],
)
def test_runner_domain_xml_rejects_unusable_template(template, message):
    with pytest.raises(MonitorError) as info:
        runner_domain_xml(template, "r.1", "/p/r.1.qcow2")

    assert message in str(info.value)
    assert "r.1" in str(info.value)


# -- lifecycle on the test driver ---------------------------------------------------------


def test_guest_lifecycle(hv, base):
    hv.create_guest("linux.1", TEMPLATE_XML, base)

    assert hv.list_guests("linux.") == [Guest("linux.1", active=False)]
    assert _volumes(hv) == ["base.qcow2", "linux.1.qcow2"]
    volume = ET.fromstring(
        _conn(hv).storagePoolLookupByName(POOL).storageVolLookupByName("linux.1.qcow2").XMLDesc()
    )
    assert volume.find("backingStore/path").text == str(base)
    assert volume.find("backingStore/format").get("type") == "qcow2"
    assert volume.find("target/format").get("type") == "qcow2"
    assert volume.findtext("capacity") == str(64 * 1024 * 1024)
    disk = _domain_xml(hv, "linux.1").find("devices/disk[@device='disk']")
    assert disk.find("source").get("file") == volume.findtext("target/path")
    assert disk.find("driver").get("type") == "qcow2"

    hv.start_guest("linux.1")
    assert hv.list_guests("linux.") == [Guest("linux.1", active=True)]

    png = hv.screenshot_png("linux.1")
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG"
        assert image.size[0] > 0

    address = hv.ipv4_address("linux.1")
    assert address is not None
    assert ipaddress.IPv4Address(address) in SUBNET

    hv.destroy_guest("linux.1")
    assert hv.list_guests("") == []
    assert _volumes(hv) == ["base.qcow2"]

    hv.destroy_guest("linux.1")  # again: nothing left, still fine
    assert _volumes(hv) == ["base.qcow2"]


def test_destroy_deletes_volume_of_already_undefined_guest(hv, base):
    hv.create_guest("linux.1", TEMPLATE_XML, base)
    _conn(hv).lookupByName("linux.1").undefine()

    hv.destroy_guest("linux.1")

    assert _volumes(hv) == ["base.qcow2"]


def test_destroy_of_defined_but_stopped_guest(hv, base):
    hv.create_guest("linux.1", TEMPLATE_XML, base)

    hv.destroy_guest("linux.1")

    assert hv.list_guests("") == []
    assert _volumes(hv) == ["base.qcow2"]


def test_list_guests_filters_by_prefix(hv, base):
    for name in ("linux.2", "mac.1", "linux.1"):
        hv.create_guest(name, TEMPLATE_XML, base)
    hv.start_guest("linux.2")

    assert hv.list_guests("linux.") == [Guest("linux.1", False), Guest("linux.2", True)]
    assert [g.name for g in hv.list_guests("")] == ["linux.1", "linux.2", "mac.1"]


@pytest.mark.parametrize(
    "template",
    [
        pytest.param("<domain><name>x</name", id="not-xml"),
        pytest.param("<domain type='test'><name>x</name></domain>", id="no-disk"),
        # libvirt 9.0 rejects the upstream profile (watchdog model 'itco'): defineXML fails.
        pytest.param(UPSTREAM_GUEST_XML.read_text(), id="define-fails"),
    ],
)
def test_failed_create_leaks_no_volume(hv, base, template):
    with pytest.raises(MonitorError) as info:
        hv.create_guest("linux.1", template, base)

    assert "linux.1" in str(info.value)
    assert _volumes(hv) == ["base.qcow2"]
    assert hv.list_guests("") == []


def test_guests_get_distinct_uuids_and_macs(hv, base):
    hv.create_guest("linux.1", TEMPLATE_XML, base)
    hv.create_guest("linux.2", TEMPLATE_XML, base)

    one, two = _domain_xml(hv, "linux.1"), _domain_xml(hv, "linux.2")
    template = ET.fromstring(TEMPLATE_XML)
    uuids = {one.findtext("uuid"), two.findtext("uuid"), template.findtext("uuid")}
    macs = {x.find("devices/interface/mac").get("address") for x in (one, two, template)}
    assert len(uuids) == 3
    assert len(macs) == 3


def test_create_replaces_left_over_volume(hv, base):
    leftover = (
        "<volume><name>linux.1.qcow2</name><capacity>1024</capacity>"
        "<target><format type='raw'/></target></volume>"
    )
    _conn(hv).storagePoolLookupByName(POOL).createXML(leftover, 0)

    hv.create_guest("linux.1", TEMPLATE_XML, base)

    volume = _conn(hv).storagePoolLookupByName(POOL).storageVolLookupByName("linux.1.qcow2")
    assert ET.fromstring(volume.XMLDesc()).find("backingStore/path").text == str(base)


def test_create_refuses_existing_guest_and_keeps_its_volume(hv, base):
    hv.create_guest("linux.1", TEMPLATE_XML, base)

    with pytest.raises(MonitorError) as info:
        hv.create_guest("linux.1", TEMPLATE_XML, base)

    assert info.value.status == 409
    assert "linux.1" in str(info.value)
    assert _volumes(hv) == ["base.qcow2", "linux.1.qcow2"]


# -- list_volumes -------------------------------------------------------------------------------


def test_list_volumes_finds_orphaned_runner_disks(hv, base):
    for name in ("ci-runner-linux.1", "ci-runner-linux.2", "other.1"):
        hv.create_guest(name, TEMPLATE_XML, base)
    raw = (
        "<volume><name>ci-runner-linux.3.img</name><capacity>1024</capacity>"
        "<target><format type='raw'/></target></volume>"
    )
    _conn(hv).storagePoolLookupByName(POOL).createXML(raw, 0)
    # The domain goes, its overlay stays behind: an orphan.
    _conn(hv).lookupByName("ci-runner-linux.1").undefine()

    assert hv.list_volumes("ci-runner-") == [
        "ci-runner-linux.1.qcow2",
        "ci-runner-linux.2.qcow2",
    ]
    assert hv.list_volumes("ci-runner-linux.1") == ["ci-runner-linux.1.qcow2"]
    assert hv.list_volumes("nothing-") == []
    assert hv.list_volumes("") == [
        "base.qcow2",
        "ci-runner-linux.1.qcow2",
        "ci-runner-linux.2.qcow2",
        "other.1.qcow2",
    ]
    guests = {g.name for g in hv.list_guests("ci-runner-")}
    orphans = [v for v in hv.list_volumes("ci-runner-") if v.removesuffix(".qcow2") not in guests]
    assert orphans == ["ci-runner-linux.1.qcow2"]

    hv.destroy_guest("ci-runner-linux.1")

    assert hv.list_volumes("ci-runner-") == ["ci-runner-linux.2.qcow2"]
    assert hv.list_guests("") == [Guest("ci-runner-linux.2", False), Guest("other.1", False)]
    assert hv.volume_names() == [
        "base.qcow2",
        "ci-runner-linux.2.qcow2",
        "ci-runner-linux.3.img",
        "other.1.qcow2",
    ]


def test_list_volumes_of_missing_pool_names_the_config_key(uri):
    hv = LibvirtHypervisor(uri, "no-such-pool")

    with pytest.raises(MonitorError) as info:
        hv.list_volumes("ci-runner-")

    assert "libvirt_storage_pool" in str(info.value)
    hv.close()


def _qcow2_header(virtual_size: int) -> bytes:
    # magic, version 3, no backing file, cluster_bits 16, size
    return b"QFI\xfb" + struct.pack(">IQIIQ", 3, 0, 0, 16, virtual_size) + bytes(72)


@pytest.mark.parametrize(
    ("content", "fmt", "capacity"),
    [
        (_qcow2_header(10 * 1024**3), "qcow2", 10 * 1024**3),
        (bytes(3 * 1024 * 1024), "raw", 3 * 1024 * 1024),
    ],
)
def test_create_sniffs_base_image_outside_pools(hv, tmp_path, content, fmt, capacity):
    base = tmp_path / "images" / "base.img@2024-01-01T00:00:00Z"
    base.parent.mkdir()
    base.write_bytes(content)

    hv.create_guest("linux.1", TEMPLATE_XML, base)

    volume = _conn(hv).storagePoolLookupByName(POOL).storageVolLookupByName("linux.1.qcow2")
    xml = ET.fromstring(volume.XMLDesc())
    assert xml.find("backingStore/format").get("type") == fmt
    assert xml.findtext("backingStore/path") == str(base)
    assert xml.findtext("capacity") == str(capacity)
    assert base.read_bytes() == content


def test_sniff_image_of_missing_file(tmp_path):
    with pytest.raises(MonitorError) as info:
        sniff_image(tmp_path / "nope.img")

    assert "nope.img" in str(info.value)


def test_create_with_missing_base_image_leaks_nothing(hv, tmp_path):
    with pytest.raises(MonitorError):
        hv.create_guest("linux.1", TEMPLATE_XML, tmp_path / "missing.img")

    assert _volumes(hv) == ["base.qcow2"]
    assert hv.list_guests("") == []


@pytest.mark.parametrize("method", ["screenshot_png", "screenshot_raw"])
def test_screenshot_of_stopped_guest_is_an_error(hv, base, method):
    hv.create_guest("linux.1", TEMPLATE_XML, base)

    with pytest.raises(MonitorError) as info:
        getattr(hv, method)("linux.1")

    assert info.value.status == 409
    assert "linux.1" in str(info.value) and "not running" in str(info.value)


def test_screenshot_raw_is_the_drivers_picture_unconverted(hv, base):
    hv.create_guest("linux.1", TEMPLATE_XML, base)
    hv.start_guest("linux.1")

    raw = hv.screenshot_raw("linux.1")

    # The test driver gives a PNG, so the converted screenshot is the same bytes.
    assert raw.startswith(b"\x89PNG\r\n\x1a\n")
    assert hv.screenshot_png("linux.1") == raw
    with Image.open(io.BytesIO(raw)) as image:
        assert (image.size, image.mode) == ((1120, 832), "L")


def test_ipv4_of_stopped_guest_is_none(hv, base):
    hv.create_guest("linux.1", TEMPLATE_XML, base)

    assert hv.ipv4_address("linux.1") is None


def test_to_png_converts_ppm():
    ppm = io.BytesIO()
    Image.new("RGB", (4, 3), (200, 10, 10)).save(ppm, format="PPM")

    png = to_png(ppm.getvalue())

    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG"
        assert image.size == (4, 3)
        assert image.getpixel((0, 0)) == (200, 10, 10)


def test_to_png_rejects_garbage():
    with pytest.raises(MonitorError):
        to_png(b"not an image")


# -- pick_ipv4 (spec §6 T7) -----------------------------------------------------------------


def _ipv4(addr: str, prefix: int = 24) -> dict:
    return {"addr": addr, "prefix": prefix, "type": libvirt.VIR_IP_ADDR_TYPE_IPV4}


def _ipv6(addr: str, prefix: int = 64) -> dict:
    return {"addr": addr, "prefix": prefix, "type": libvirt.VIR_IP_ADDR_TYPE_IPV6}


S60_LEASE = {"vnet6130": {"addrs": [_ipv4("192.168.100.195", 24)], "hwaddr": "52:54:00:1c:1f:5e"}}
S61_ARP = {"vnet91": {"addrs": [_ipv4("192.168.100.189", 0)], "hwaddr": "52:54:00:95:5e:68"}}
S62_AGENT = {
    "lo0": {
        "addrs": [_ipv4("127.0.0.1", 8), _ipv6("::1", 128), _ipv6("fe80::1", 64)],
        "hwaddr": None,
    },
    "en0": {
        "addrs": [_ipv6("fe80::1c8d:4e2a:9f3b:12aa", 64), _ipv4("192.168.100.133", 24)],
        "hwaddr": "52:54:0:9b:ba:6e",
    },
    "utun0": {"addrs": [_ipv6("fe80::ce81:b1c:bd2c:69e", 64)], "hwaddr": None},
    "utun1": {"addrs": [_ipv6("fe80::a4b1:2d55:6c0e:1d3f", 64)], "hwaddr": None},
}
CINET = ipaddress.IPv4Network("192.168.100.0/24")


@pytest.mark.parametrize(
    ("addresses", "expected"),
    [
        pytest.param(S60_LEASE, "192.168.100.195", id="S60-lease"),
        pytest.param(S61_ARP, "192.168.100.189", id="S61-arp"),
        pytest.param(S62_AGENT, "192.168.100.133", id="S62-agent-macos"),
    ],
)
@pytest.mark.parametrize("subnet", [None, CINET], ids=["any-subnet", "cinet"])
def test_pick_ipv4_upstream_scenarios(addresses, expected, subnet):
    assert pick_ipv4(addresses, subnet) == expected


@pytest.mark.parametrize(
    ("addresses", "subnet", "expected"),
    [
        ({}, None, None),
        ({"lo": {"addrs": [_ipv4("127.0.0.1", 8)], "hwaddr": "00:00:00:00:00:00"}}, None, None),
        ({"eth0": {"addrs": [_ipv4("169.254.3.4", 16)], "hwaddr": "x"}}, None, None),
        ({"eth0": {"addrs": [_ipv6("2001:db8::1")], "hwaddr": "x"}}, None, None),
        ({"eth0": {"addrs": None, "hwaddr": "x"}}, None, None),
        ({"eth0": {"addrs": [_ipv4("not-an-ip")], "hwaddr": "x"}}, None, None),
        (
            {"a": {"addrs": [_ipv4("10.0.0.5")]}, "b": {"addrs": [_ipv4("192.168.100.7")]}},
            None,
            "10.0.0.5",
        ),
        (
            {"a": {"addrs": [_ipv4("10.0.0.5")]}, "b": {"addrs": [_ipv4("192.168.100.7")]}},
            CINET,
            "192.168.100.7",
        ),
        ({"a": {"addrs": [_ipv4("10.0.0.5")]}}, CINET, None),
    ],
)
def test_pick_ipv4_edge_cases(addresses, subnet, expected):
    assert pick_ipv4(addresses, subnet) == expected


# -- errors ------------------------------------------------------------------------------------


def test_unknown_guest_is_a_monitor_error(hv):
    for call in (hv.start_guest, hv.screenshot_png, hv.screenshot_raw, hv.ipv4_address):
        with pytest.raises(MonitorError) as info:
            call("linux.404")
        assert info.value.status == 404
        assert "linux.404" in str(info.value)


def test_libvirt_error_becomes_monitor_error_503(hv, base):
    hv.create_guest("linux.1", TEMPLATE_XML, base)
    hv.start_guest("linux.1")

    with pytest.raises(MonitorError) as info:
        hv.start_guest("linux.1")  # already running

    assert not isinstance(info.value, TransientError)
    assert info.value.status == 503
    assert "linux.1" in str(info.value)
    assert isinstance(info.value.__cause__, libvirt.libvirtError)


def test_missing_storage_pool_names_the_config_key(uri, base):
    hv = LibvirtHypervisor(uri, "no-such-pool")

    for call in (
        lambda: hv.create_guest("linux.1", TEMPLATE_XML, base),
        lambda: hv.destroy_guest("linux.1"),
    ):
        with pytest.raises(MonitorError) as info:
            call()
        assert "no-such-pool" in str(info.value)
        assert "libvirt_storage_pool" in str(info.value)
    assert hv.list_guests("") == []
    hv.close()


def test_lost_connection_is_transient_and_reconnects(hv, base):
    hv.create_guest("linux.1", TEMPLATE_XML, base)
    lost = _conn(hv)
    lost.close()  # the binding now answers "invalid connection pointer"

    with pytest.raises(TransientError) as info:
        hv.list_guests("")
    assert info.value.status == 503

    # The next call opens a new connection (a fresh private test-driver state).
    assert hv.list_guests("") == []
    assert _conn(hv) is not lost


def test_role_and_domain_xml_import_without_libvirt():
    # Everything outside the package types a hypervisor with the Protocol; that must not need
    # the binding.
    probe = (
        "import sys; sys.modules['libvirt'] = None; "
        "import monitor.hypervisor, monitor.hypervisor.domain_xml"
    )
    subprocess.run([sys.executable, "-c", probe], cwd=ROOT, check=True, timeout=60)


def test_unreachable_libvirt_is_transient(tmp_path):
    hv = LibvirtHypervisor(f"test://{tmp_path}/missing-node.xml")

    with pytest.raises(TransientError) as info:
        hv.list_guests("")

    assert "missing-node.xml" in str(info.value)


def test_libvirt_does_not_print_errors(hv, capfd):
    with pytest.raises(MonitorError):
        hv.start_guest("linux.404")

    assert capfd.readouterr().err == ""


# -- event loop, keepalive, hung opens ---------------------------------------------------------

EVENT_LOOP_PROBE = """
import json, sys, threading
import libvirt
calls = []
register = libvirt.virEventRegisterDefaultImpl
libvirt.virEventRegisterDefaultImpl = lambda: calls.append(1) or register()
from monitor.hypervisor import EVENT_LOOP_THREAD_NAME
from monitor.hypervisor.libvirt_hypervisor import LibvirtHypervisor
uri, pool = sys.argv[1:]
hypervisors = [LibvirtHypervisor(uri, pool) for _ in range(6)]
barrier = threading.Barrier(len(hypervisors))
def call(hv):
    barrier.wait()
    hv.list_guests("")
threads = [threading.Thread(target=call, args=(hv,)) for hv in hypervisors]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
for hv in hypervisors[:3]:
    hv.close()
    hv.list_guests("")
print(json.dumps({
    "registrations": len(calls),
    "loops": [t.is_alive() for t in threading.enumerate() if t.name == EVENT_LOOP_THREAD_NAME],
}))
"""


def test_event_loop_is_started_once_per_process(uri):
    # A fresh process, so that no earlier test has started the loop already.
    result = subprocess.run(
        [sys.executable, "-c", EVENT_LOOP_PROBE, uri, POOL],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(result.stdout) == {"registrations": 1, "loops": [True]}


def test_event_loop_thread_is_shared_by_hypervisors(uri):
    hypervisors = [LibvirtHypervisor(uri, POOL) for _ in range(3)]
    for hv in hypervisors:
        hv.list_guests("")

    loops = [t for t in threading.enumerate() if t.name == EVENT_LOOP_THREAD_NAME]
    assert loops == [start_event_loop()]
    assert loops[0].is_alive() and loops[0].daemon
    for hv in hypervisors:
        hv.close()


def test_connection_delivers_libvirt_events(hv, base):
    # Without the default event implementation registered before open(), the test driver
    # refuses: "could not initialize domain event timer".
    events = []
    arrived = threading.Event()

    def lifecycle(_conn, dom, event, _detail, _opaque):
        events.append((dom.name(), event))
        arrived.set()

    callback = _conn(hv).domainEventRegisterAny(
        None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lifecycle, None
    )
    try:
        hv.create_guest("linux.1", TEMPLATE_XML, base)
        assert arrived.wait(10)
        assert events[0] == ("linux.1", libvirt.VIR_DOMAIN_EVENT_DEFINED)
    finally:
        _conn(hv).domainEventDeregisterAny(callback)


def test_keepalive_unsupported_by_the_test_driver_is_ignored(hv, caplog, capfd):
    with caplog.at_level(logging.DEBUG, logger="monitor.hypervisor"):
        assert hv.list_guests("") == []

    assert any("no keepalive" in r.message and r.levelno == logging.DEBUG for r in caplog.records)
    assert capfd.readouterr().err == ""


@pytest.fixture
def silent_libvirtd():
    """A unix socket that accepts connections and never answers: a hung libvirtd as far as
    opening a connection goes. Yields (uri, stop); stop() closes every socket."""
    directory = tempfile.mkdtemp(prefix="monitor-hung-")
    path = f"{directory}/libvirt-sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(8)
    accepted: list[socket.socket] = []
    stopped = threading.Event()

    def accept() -> None:
        while not stopped.is_set():
            try:
                client, _ = server.accept()
            except OSError:
                return
            accepted.append(client)

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()

    def stop() -> None:
        stopped.set()
        server.shutdown(socket.SHUT_RDWR)
        server.close()
        for client in accepted:
            client.close()
        acceptor.join(5)

    yield f"qemu+unix:///system?socket={path}", stop
    if not stopped.is_set():
        stop()
    shutil.rmtree(directory, ignore_errors=True)


def test_open_of_hung_libvirtd_is_transient_not_blocking(silent_libvirtd):
    uri, stop = silent_libvirtd
    hv = LibvirtHypervisor(uri, POOL, open_timeout=0.5)

    openings = []
    for _ in range(2):  # the second caller waits for the same open, and gives up as well
        start = time.monotonic()
        with pytest.raises(TransientError) as info:
            hv.list_guests("")
        assert time.monotonic() - start < 5
        assert "no answer within 0.5 s" in str(info.value)
        assert info.value.status == 503
        openings.append(hv.connection._opening)
    assert openings[0] is not None and openings[0] is openings[1]

    # The daemon goes away: the pending open fails, and so does the call waiting for it.
    stop()
    with pytest.raises(TransientError) as info:
        hv.list_guests("")
    assert "no answer" not in str(info.value)
    assert isinstance(info.value.__cause__, libvirt.libvirtError)
    hv.close()


# -- base-image volumes and rebuild guests -----------------------------------------------------

IMAGE = "image-linux@2024-05-01T00:00:00Z.qcow2"
GiB = 1024**3


def _volume_xml(hv: LibvirtHypervisor, volume: str) -> ET.Element:
    pool = _conn(hv).storagePoolLookupByName(POOL)
    return ET.fromstring(pool.storageVolLookupByName(volume).XMLDesc())


def _pools(hv: LibvirtHypervisor) -> list[str]:
    return sorted(p.name() for p in _conn(hv).listAllStoragePools(0))


def test_create_image_guest_with_an_empty_disk(hv, pool_dir):
    path = hv.create_image_guest("rebuild-linux", TEMPLATE_XML, IMAGE, 2 * GiB)

    assert path == pool_dir / IMAGE
    assert _volumes(hv) == ["base.qcow2", IMAGE]
    volume = _volume_xml(hv, IMAGE)
    assert volume.find("target/format").get("type") == "qcow2"
    assert volume.findtext("capacity") == str(2 * GiB)
    assert volume.find("backingStore") is None
    domain = _domain_xml(hv, "rebuild-linux")
    disk = domain.find("devices/disk[@device='disk']")
    assert disk.get("type") == "file"
    assert disk.find("source").attrib == {"file": str(path)}
    assert disk.find("driver").get("type") == "qcow2"
    assert domain.find("devices/disk[@device='cdrom']") is None
    template = ET.fromstring(TEMPLATE_XML)
    assert domain.findtext("uuid") != template.findtext("uuid")
    assert MAC_RE.match(domain.find("devices/interface/mac").get("address"))
    assert hv.list_guests("rebuild-") == [Guest("rebuild-linux", active=False)]
    assert hv.guest_state("rebuild-linux") == "shutoff"


def test_create_image_guest_copies_a_pool_volume_without_backing_it(hv, base):
    path = hv.create_image_guest("rebuild-linux", TEMPLATE_XML, IMAGE, GiB, source=base)

    volume = _volume_xml(hv, IMAGE)
    assert volume.findtext("target/path") == str(path)
    assert volume.find("target/format").get("type") == "qcow2"
    assert volume.findtext("capacity") == str(GiB)  # grown from the source's 64 MiB
    assert volume.find("backingStore") is None  # a copy that stands alone
    assert _volumes(hv) == ["base.qcow2", IMAGE]


def test_create_image_guest_of_the_source_size(hv, base):
    hv.create_image_guest("rebuild-linux", TEMPLATE_XML, IMAGE, 64 * 1024**2, source=base)

    assert _volume_xml(hv, IMAGE).findtext("capacity") == str(64 * 1024**2)


def test_create_image_guest_refuses_a_source_larger_than_the_size(hv, base):
    with pytest.raises(MonitorError) as info:
        hv.create_image_guest("rebuild-linux", TEMPLATE_XML, IMAGE, 1024**2, source=base)

    assert info.value.status == 400
    assert str(base) in str(info.value) and IMAGE in str(info.value)
    assert _volumes(hv) == ["base.qcow2"]
    assert hv.list_guests("") == []


def test_create_image_guest_from_a_file_outside_the_pools(hv, tmp_path):
    # The test driver's transient pool lists no files (real libvirtd: test_hypervisor_qemu).
    source = tmp_path / "images" / "jammy-server-cloudimg-amd64.raw"
    source.parent.mkdir()
    source.write_bytes(bytes(1024**2))

    with pytest.raises(MonitorError) as info:
        hv.create_image_guest("rebuild-linux", TEMPLATE_XML, IMAGE, GiB, source=source)

    assert info.value.status == 404
    assert str(source) in str(info.value)
    assert _pools(hv) == [POOL]  # the transient pool is gone again
    assert _volumes(hv) == ["base.qcow2"]
    assert hv.list_guests("") == []


@pytest.mark.parametrize("missing", ["source", "seed_iso"])
def test_create_image_guest_with_a_missing_file_is_404(hv, tmp_path, missing):
    with pytest.raises(MonitorError) as info:
        hv.create_image_guest(
            "rebuild-linux", TEMPLATE_XML, IMAGE, GiB, **{missing: tmp_path / "nope"}
        )

    assert info.value.status == 404
    assert str(tmp_path / "nope") in str(info.value)
    assert _volumes(hv) == ["base.qcow2"]
    assert hv.list_guests("") == []


def test_create_image_guest_adds_the_seed_iso_as_a_cdrom(hv, tmp_path):
    seed = tmp_path / "config.iso"
    seed.write_bytes(b"CD001")

    path = hv.create_image_guest("rebuild-linux", TEMPLATE_XML, IMAGE, GiB, seed_iso=seed)

    devices = _domain_xml(hv, "rebuild-linux").find("devices")
    [cdrom] = devices.findall("disk[@device='cdrom']")
    assert cdrom.get("type") == "file"
    assert cdrom.find("source").attrib == {"file": str(seed)}
    assert cdrom.find("driver").get("type") == "raw"
    assert cdrom.find("readonly") is not None
    assert cdrom.find("target").attrib == {"dev": "sda", "bus": "sata"}
    assert devices.find("disk[@device='disk']/source").get("file") == str(path)


def test_image_guest_domain_xml_puts_the_seed_into_the_templates_cdrom():
    # Upstream's guest.xml has an empty SATA CD-ROM `sda`; upstream's change-media fills it.
    template = UPSTREAM_GUEST_XML.read_text()

    new = ET.fromstring(
        image_guest_domain_xml(template, "rebuild", "/pool/image.qcow2", "/data/config.iso")
    )

    [cdrom] = new.findall("devices/disk[@device='cdrom']")
    assert cdrom.get("type") == "file"
    assert cdrom.find("source").attrib == {"file": "/data/config.iso"}
    assert cdrom.find("target").attrib == {"dev": "sda", "bus": "sata"}
    assert cdrom.find("driver").attrib == {"name": "qemu", "type": "raw"}
    assert len(cdrom.findall("readonly")) == 1
    assert cdrom.find("boot").get("order") == "2"  # the rest of it is the template's
    assert new.find("devices/disk[@device='disk']/source").get("file") == "/pool/image.qcow2"
    # Without a seed, it is the runner's clone.
    plain = ET.fromstring(image_guest_domain_xml(template, "rebuild", "/pool/image.qcow2"))
    assert plain.find("devices/disk[@device='cdrom']/source") is None


def test_image_guest_domain_xml_replaces_an_existing_seed_and_picks_free_targets():
    template = """<domain type='kvm'><devices>
      <disk type='file' device='disk'><source file='/x.img'/><target dev='sda' bus='sata'/></disk>
      <disk type='block' device='cdrom'><source dev='/dev/sr0'/><target dev='hdc' bus='ide'/>
        <readonly/></disk>
    </devices></domain>"""

    new = ET.fromstring(image_guest_domain_xml(template, "g", "/p/i.qcow2", "/new.iso"))
    [cdrom] = new.findall("devices/disk[@device='cdrom']")
    assert cdrom.get("type") == "file"
    assert cdrom.find("source").attrib == {"file": "/new.iso"}
    assert cdrom.find("target").attrib == {"dev": "hdc", "bus": "ide"}

    no_cdrom = template.replace("device='cdrom'", "device='floppy'")
    new = ET.fromstring(image_guest_domain_xml(no_cdrom, "g", "/p/i.qcow2", "/new.iso"))
    cdrom = new.find("devices/disk[@device='cdrom']")
    assert cdrom.find("target").attrib == {"dev": "sdb", "bus": "sata"}  # sda is taken
    disks = [d.get("device") for d in new.findall("devices/disk")]
    assert disks == ["disk", "floppy", "cdrom"]


def test_image_guest_domain_xml_with_every_sata_target_taken():
    disks = "".join(
        f"<disk type='file' device='disk'><target dev='sd{c}' bus='sata'/></disk>"
        for c in "abcdefghijklmnopqrstuvwxyz"
    )

    with pytest.raises(MonitorError) as info:
        image_guest_domain_xml(f"<domain><devices>{disks}</devices></domain>", "g", "/i", "/s")

    assert "no free sdX target" in str(info.value) and "g" in str(info.value)


def test_create_image_guest_refuses_an_existing_guest(hv, base):
    hv.create_guest("rebuild-linux", TEMPLATE_XML, base)

    with pytest.raises(MonitorError) as info:
        hv.create_image_guest("rebuild-linux", TEMPLATE_XML, IMAGE, GiB)

    assert info.value.status == 409
    assert "rebuild-linux" in str(info.value)
    assert _volumes(hv) == ["base.qcow2", "rebuild-linux.qcow2"]


def test_create_image_guest_refuses_an_existing_volume(hv, base):
    hv.create_image_guest("rebuild-linux", TEMPLATE_XML, IMAGE, GiB)
    hv.remove_image_guest("rebuild-linux")

    with pytest.raises(MonitorError) as info:
        hv.create_image_guest("rebuild-linux.2", TEMPLATE_XML, IMAGE, 2 * GiB, source=base)

    assert info.value.status == 409
    assert IMAGE in str(info.value)
    assert _volume_xml(hv, IMAGE).findtext("capacity") == str(GiB)  # untouched
    assert hv.list_guests("") == []


@pytest.mark.parametrize(
    "template",
    [
        pytest.param("<domain><name>x</name", id="not-xml"),
        pytest.param("<domain type='test'><name>x</name></domain>", id="no-disk"),
        pytest.param(UPSTREAM_GUEST_XML.read_text(), id="define-fails"),
    ],
)
@pytest.mark.parametrize("with_source", [False, True], ids=["empty", "copy"])
def test_failed_create_image_guest_leaves_nothing(hv, base, template, with_source):
    source = base if with_source else None

    with pytest.raises(MonitorError) as info:
        hv.create_image_guest("rebuild-linux", template, IMAGE, GiB, source=source)

    assert "rebuild-linux" in str(info.value)
    assert _volumes(hv) == ["base.qcow2"]
    assert hv.list_guests("") == []


@pytest.mark.parametrize(
    ("name", "volume", "size"),
    [("", IMAGE, GiB), ("a/b", IMAGE, GiB), ("g", "", GiB), ("g", "../x", GiB), ("g", IMAGE, 0)],
)
def test_create_image_guest_rejects_bad_arguments(hv, name, volume, size):
    with pytest.raises(MonitorError) as info:
        hv.create_image_guest(name, TEMPLATE_XML, volume, size)

    assert info.value.status == 400
    assert _volumes(hv) == ["base.qcow2"]


def test_guest_state_follows_the_guest(hv):
    assert hv.guest_state("rebuild-linux") is None
    hv.create_image_guest("rebuild-linux", TEMPLATE_XML, IMAGE, GiB)
    assert hv.guest_state("rebuild-linux") == "shutoff"

    hv.start_guest("rebuild-linux")
    assert hv.guest_state("rebuild-linux") == "running"
    dom = _conn(hv).lookupByName("rebuild-linux")
    dom.suspend()
    assert hv.guest_state("rebuild-linux") == "paused"
    dom.resume()
    assert hv.guest_state("rebuild-linux") == "running"
    dom.destroy()  # as a guest that powers itself off ends up
    assert hv.guest_state("rebuild-linux") == "shutoff"

    hv.remove_image_guest("rebuild-linux")
    assert hv.guest_state("rebuild-linux") is None


@pytest.mark.parametrize("started", [False, True], ids=["defined", "running"])
def test_remove_image_guest_keeps_the_volume(hv, started):
    path = hv.create_image_guest("rebuild-linux", TEMPLATE_XML, IMAGE, GiB)
    if started:
        hv.start_guest("rebuild-linux")

    hv.remove_image_guest("rebuild-linux")

    assert hv.list_guests("") == []
    assert _volumes(hv) == ["base.qcow2", IMAGE]
    assert hv.volume_path(IMAGE) == path
    hv.remove_image_guest("rebuild-linux")  # again: nothing left, still fine
    hv.remove_image_guest("never-was")


def test_volume_path(hv, pool_dir):
    assert hv.volume_path("base.qcow2") == pool_dir / "base.qcow2"
    assert hv.volume_path(IMAGE) is None

    path = hv.create_image_guest("rebuild-linux", TEMPLATE_XML, IMAGE, GiB)

    assert hv.volume_path(IMAGE) == path == pool_dir / IMAGE


def test_list_image_volumes(hv, base):
    for when in ("2024-05-02T00:00:00Z", "2024-05-01T00:00:00Z"):
        hv.create_image_guest(f"rebuild-linux@{when}", TEMPLATE_XML, f"image-linux@{when}", GiB)
    hv.create_image_guest("rebuild-mac", TEMPLATE_XML, "image-mac@1.img", GiB)
    hv.create_guest("ci-runner-linux.1", TEMPLATE_XML, base)

    assert hv.list_image_volumes("image-linux@") == [
        "image-linux@2024-05-01T00:00:00Z",
        "image-linux@2024-05-02T00:00:00Z",
    ]
    assert hv.list_image_volumes("image-") == [
        "image-linux@2024-05-01T00:00:00Z",
        "image-linux@2024-05-02T00:00:00Z",
        "image-mac@1.img",
    ]
    assert hv.list_image_volumes("nothing") == []
    assert hv.list_image_volumes("") == hv.volume_names()
    assert hv.list_volumes("") == ["base.qcow2", "ci-runner-linux.1.qcow2"]  # unchanged


def test_delete_volume_refuses_a_base_image_of_runners(hv):
    path = hv.create_image_guest("rebuild-linux", TEMPLATE_XML, IMAGE, GiB)
    hv.remove_image_guest("rebuild-linux")
    hv.create_guest("ci-runner-linux.1", TEMPLATE_XML, path)
    hv.create_guest("ci-runner-linux.2", TEMPLATE_XML, path)

    with pytest.raises(MonitorError) as info:
        hv.delete_volume(IMAGE)

    assert info.value.status == 409
    message = str(info.value)
    assert IMAGE in message
    assert "ci-runner-linux.1.qcow2" in message and "ci-runner-linux.2.qcow2" in message
    assert IMAGE in _volumes(hv)

    hv.destroy_guest("ci-runner-linux.1")
    with pytest.raises(MonitorError):
        hv.delete_volume(IMAGE)  # one runner is left
    hv.destroy_guest("ci-runner-linux.2")

    hv.delete_volume(IMAGE)

    assert _volumes(hv) == ["base.qcow2"]
    assert hv.volume_path(IMAGE) is None
    hv.delete_volume(IMAGE)  # again: gone already, still fine


def test_delete_volume_of_runner_overlay_and_unused_base(hv, base):
    hv.create_guest("ci-runner-linux.1", TEMPLATE_XML, base)

    with pytest.raises(MonitorError) as info:
        hv.delete_volume("base.qcow2")
    assert info.value.status == 409

    hv.destroy_guest("ci-runner-linux.1")
    hv.delete_volume("base.qcow2")
    assert _volumes(hv) == []


def _libvirt_error(code: int, message: str) -> libvirt.libvirtError:
    error = libvirt.libvirtError(message)
    error.args = (message,)
    error.err = (code, libvirt.VIR_FROM_STORAGE, message, 2, None, None, None, 0, 0)
    return error


def test_listings_use_the_known_volumes_while_libvirt_refuses_a_refresh(hv, base, monkeypatch):
    # libvirt 9.0 refuses while a volume is built in the pool (test_hypervisor_qemu makes it).
    hv.create_guest("ci-runner-linux.1", TEMPLATE_XML, base)
    refused = "internal error: pool 'runners' has asynchronous jobs running."

    def busy(_pool, _flags=0):
        raise _libvirt_error(libvirt.VIR_ERR_INTERNAL_ERROR, refused)

    monkeypatch.setattr(libvirt.virStoragePool, "refresh", busy)

    assert hv.list_volumes("ci-") == ["ci-runner-linux.1.qcow2"]
    assert hv.list_image_volumes("") == ["base.qcow2", "ci-runner-linux.1.qcow2"]
    with pytest.raises(MonitorError) as info:
        hv.delete_volume("base.qcow2")
    assert info.value.status == 409

    def broken(_pool, _flags=0):
        raise _libvirt_error(libvirt.VIR_ERR_INTERNAL_ERROR, "internal error: something else")

    monkeypatch.setattr(libvirt.virStoragePool, "refresh", broken)
    for call in (hv.list_volumes, hv.list_image_volumes, hv.delete_volume):
        with pytest.raises(MonitorError) as info:
            call("x")
        assert info.value.status == 503 and "something else" in str(info.value)
