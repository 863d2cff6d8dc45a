"""The XML documents libvirt is given, built without libvirt: runner and rebuild-guest domains
cloned from a profile's domain XML, overlay and base-image volumes, transient `dir` pools; and
the base-image facts (format, virtual size) an overlay volume needs.

Pure: no libvirt, no I/O beyond reading a base image's header. Imports only `errors` and the
role's constants from `monitor.hypervisor`.
"""

from __future__ import annotations

import io
import os
import random
import struct
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from string import ascii_lowercase

from monitor.errors import MonitorError
from monitor.hypervisor import GUEST_TOKEN_CMDLINE_PREFIX
from monitor.hypervisor import GUEST_TOKEN_OEM_PREFIX

QCOW2_MAGIC = b"QFI\xfb"


def runner_domain_xml(
    template_xml: str,
    name: str,
    disk_path: str,
    disk_format: str = "qcow2",
    guest_token: str | None = None,
) -> str:
    """Return the domain XML for runner guest `name`, cloned from a profile's domain XML.

    Like `virt-clone --preserve-data -f <disk>`: sets `<name>`, a fresh `<uuid>`, a fresh MAC on
    every `<interface>`, and points the first `<disk device='disk'>` at `disk_path` (a file of
    `disk_format`). Everything else, including other disks such as the cdrom, is left as it is.
    `guest_token`, when given, is handed to the guest (see `_give_guest_token`).
    Raises `MonitorError` if the template is not XML or has no disk.
    """
    try:
        root = ET.fromstring(template_xml, parser=_comment_keeping_parser())
        _keep_namespace_prefixes(template_xml)
    except ET.ParseError as e:
        raise MonitorError(f"guest template for {name} is not valid XML: {e}") from e
    if root.tag != "domain":
        raise MonitorError(f"guest template for {name} is not a <domain> (root is <{root.tag}>)")
    devices = root.find("devices")
    disk = None if devices is None else devices.find("disk[@device='disk']")
    if devices is None or disk is None:
        raise MonitorError(f"guest template for {name} has no <disk device='disk'>")

    name_element = _child(root, "name", 0)
    name_element.text = name
    _child(root, "uuid", list(root).index(name_element) + 1).text = str(uuid.uuid4())

    macs: set[str] = set()
    for interface in devices.findall("interface"):
        mac = _child(interface, "mac", 0)
        mac.attrib.clear()
        mac.set("address", _fresh_mac(macs))

    disk.set("type", "file")
    driver = disk.find("driver")
    if driver is None:
        driver = ET.Element("driver")
        disk.insert(0, driver)
    driver.set("type", disk_format)
    source = ET.Element("source", {"file": disk_path})
    old_source = disk.find("source")
    if old_source is None:
        disk.insert(list(disk).index(driver) + 1, source)
    else:
        source.tail = old_source.tail
        disk[list(disk).index(old_source)] = source
    # A <backingStore> describes the template's old source; libvirt honours it on input.
    for stale in disk.findall("backingStore"):
        disk.remove(stale)

    # A template NVRAM file is shared; undefine(NVRAM) would delete it. Give the runner its
    # own copy, as virt-clone does: libvirt names one and copies `template` on first start.
    nvram = root.find("os/nvram")
    nvram_path = "" if nvram is None else (nvram.text or "").strip()
    if nvram is not None and nvram_path:
        nvram.set("template", nvram.get("template") or nvram_path)
        nvram.text = None

    if guest_token is not None:
        _give_guest_token(root, guest_token)
    return ET.tostring(root, encoding="unicode")


def _give_guest_token(root: ET.Element, token: str) -> None:
    """Put the guest's token where only the guest reads it: an SMBIOS OEM string
    (`monitor-guest-token=<token>`, type 11: `dmidecode -t 11` on Linux,
    `/sys/firmware/dmi/entries/11-0/raw`, or WMI on Windows), and, for a guest whose kernel
    libvirt loads directly, its command line (`monitor.guest_token=<token>`)."""
    os_element = root.find("os")
    if os_element is None:
        os_element = ET.SubElement(root, "os")
    smbios = os_element.find("smbios")
    if smbios is None:
        smbios = ET.SubElement(os_element, "smbios")
    smbios.set("mode", "sysinfo")
    sysinfo = root.find("sysinfo[@type='smbios']")
    if sysinfo is None:
        sysinfo = ET.Element("sysinfo", type="smbios")
        root.insert(list(root).index(os_element), sysinfo)
    oem = sysinfo.find("oemStrings")
    if oem is None:
        oem = ET.SubElement(sysinfo, "oemStrings")
    for stale in oem.findall("entry"):
        if (stale.text or "").startswith(GUEST_TOKEN_OEM_PREFIX):
            oem.remove(stale)
    ET.SubElement(oem, "entry").text = GUEST_TOKEN_OEM_PREFIX + token
    if os_element.find("kernel") is not None:
        cmdline = os_element.find("cmdline")
        if cmdline is None:
            cmdline = ET.SubElement(os_element, "cmdline")
        words = [
            word
            for word in (cmdline.text or "").split()
            if not word.startswith(GUEST_TOKEN_CMDLINE_PREFIX)
        ]
        cmdline.text = " ".join([*words, GUEST_TOKEN_CMDLINE_PREFIX + token])


def image_guest_domain_xml(
    template_xml: str,
    name: str,
    disk_path: str,
    seed_iso: str | None = None,
    guest_token: str | None = None,
) -> str:
    """Return the domain XML of rebuild guest `name`, cloned from a profile's domain XML.

    As `runner_domain_xml` (fresh name, UUID and MACs; the first `<disk device='disk'>` is
    the qcow2 file `disk_path`, here the base-image volume itself), plus, when `seed_iso` is
    given, that file as a read-only CD-ROM: upstream's `virsh change-media <guest> sda
    <config.iso>` into the template's first `<disk device='cdrom'>`, or, when the template
    has none, a new SATA CD-ROM on the first free `sdX` target (SATA works on both the `pc`
    and `q35` machines; `q35` has no IDE).
    """
    domain_xml = runner_domain_xml(template_xml, name, disk_path, guest_token=guest_token)
    if seed_iso is None:
        return domain_xml
    root = ET.fromstring(domain_xml, parser=_comment_keeping_parser())
    devices = root.find("devices")
    assert devices is not None  # runner_domain_xml insists on a disk
    cdrom = devices.find("disk[@device='cdrom']")
    if cdrom is None:
        disks = devices.findall("disk")
        taken = {target.get("dev") for target in devices.findall("disk/target")}
        target = next((f"sd{c}" for c in ascii_lowercase if f"sd{c}" not in taken), None)
        if target is None:
            raise MonitorError(f"guest template for {name} has no free sdX target for a CD-ROM")
        cdrom = ET.Element("disk", device="cdrom")
        ET.SubElement(cdrom, "target", dev=target, bus="sata")
        devices.insert(list(devices).index(disks[-1]) + 1, cdrom)
    cdrom.set("type", "file")
    driver = cdrom.find("driver")
    if driver is None:
        driver = ET.Element("driver", name="qemu")
        cdrom.insert(0, driver)
    driver.set("type", "raw")
    source = ET.Element("source", {"file": seed_iso})
    old_source = cdrom.find("source")
    if old_source is None:
        cdrom.insert(list(cdrom).index(driver) + 1, source)
    else:
        cdrom[list(cdrom).index(old_source)] = source
    if cdrom.find("readonly") is None:
        ET.SubElement(cdrom, "readonly")
    return ET.tostring(root, encoding="unicode")


def overlay_volume_xml(name: str, capacity: int, backing: str, backing_format: str) -> str:
    volume = ET.Element("volume")
    ET.SubElement(volume, "name").text = name
    ET.SubElement(volume, "capacity", unit="bytes").text = str(capacity)
    target = ET.SubElement(volume, "target")
    ET.SubElement(target, "format", type="qcow2")
    # Without it libvirt 9.0 writes the old qcow2 v2 format (compat 0.10).
    ET.SubElement(target, "compat").text = "1.1"
    backing_store = ET.SubElement(volume, "backingStore")
    ET.SubElement(backing_store, "path").text = backing
    ET.SubElement(backing_store, "format", type=backing_format)
    return ET.tostring(volume, encoding="unicode")


def image_volume_xml(name: str, capacity: int) -> str:
    volume = ET.Element("volume")
    ET.SubElement(volume, "name").text = name
    ET.SubElement(volume, "capacity", unit="bytes").text = str(capacity)
    target = ET.SubElement(volume, "target")
    ET.SubElement(target, "format", type="qcow2")
    ET.SubElement(target, "compat").text = "1.1"  # as overlay_volume_xml
    return ET.tostring(volume, encoding="unicode")


def dir_pool_xml(name: str, directory: str) -> str:
    pool = ET.Element("pool", type="dir")
    ET.SubElement(pool, "name").text = name
    ET.SubElement(ET.SubElement(pool, "target"), "path").text = directory
    return ET.tostring(pool, encoding="unicode")


def sniff_image(path: Path) -> tuple[str, int]:
    """Return (format, virtual size) of a disk image file: qcow2 (size from its header) or
    raw (the file's size)."""
    try:
        with open(path, "rb") as f:
            header = f.read(32)
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise MonitorError(f"cannot read base image {path}: {e.strerror or e}") from e
    if header[:4] == QCOW2_MAGIC and len(header) == 32:
        # qcow2 header: magic, version, backing file offset/size, cluster bits, then size.
        return "qcow2", struct.unpack(">Q", header[24:32])[0]
    return "raw", size


def _comment_keeping_parser() -> ET.XMLParser:
    return ET.XMLParser(target=ET.TreeBuilder(insert_comments=True))


def _keep_namespace_prefixes(document: str) -> None:
    # ElementTree writes foreign namespaces (e.g. libosinfo metadata) as ns0, ns1... unless
    # their prefixes are registered. The registry is process-wide; re-registering is harmless.
    for _event, (prefix, uri) in ET.iterparse(io.StringIO(document), events=("start-ns",)):
        if prefix:
            try:
                ET.register_namespace(prefix, uri)
            except ValueError:
                pass  # A reserved ns<N> prefix: ElementTree picks its own.


def _child(parent: ET.Element, tag: str, index: int) -> ET.Element:
    """Return `parent`'s first `tag` child, inserting an empty one at `index` if missing."""
    child = parent.find(tag)
    if child is None:
        child = ET.Element(tag)
        parent.insert(index, child)
    return child


def _fresh_mac(taken: set[str]) -> str:
    while True:
        mac = "52:54:00:" + ":".join(f"{random.randrange(256):02x}" for _ in range(3))
        if mac not in taken:
            taken.add(mac)
            return mac


def template_networks(template_xml: str) -> list[str]:
    """The libvirt networks a profile's domain XML plugs its interfaces into
    (`<interface type='network'><source network='…'/>`), in order, each once."""
    try:
        root = ET.fromstring(template_xml)
    except ET.ParseError as e:
        raise MonitorError(f"guest template is not valid XML: {e}") from e
    names: list[str] = []
    for interface in root.findall("devices/interface[@type='network']"):
        source = interface.find("source")
        network = None if source is None else source.get("network")
        if network and network not in names:
            names.append(network)
    return names


def probe_volume_xml(name: str) -> str:
    """A 1 MiB qcow2 volume: made and deleted again to show that libvirt can write runner
    overlays into a pool (the directory is writable and `qemu-img` is there)."""
    return image_volume_xml(name, 1 << 20)
