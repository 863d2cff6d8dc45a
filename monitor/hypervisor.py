"""The hypervisor adapter: runner guests on libvirt, and the only module that imports libvirt.

`Hypervisor` names the operations the loop needs; `LibvirtHypervisor` implements them with
libvirt-python. A runner guest is a domain cloned from its profile's complete domain XML (the
upstream `guest.xml`) plus a qcow2 overlay volume, named `<guest>.qcow2`, in one storage pool,
backed by the profile's base image. This replaces upstream's copy + `virt-clone` (spec §7.5)
and `virsh destroy` + `undefine --storage` (§7.6). Every libvirt failure leaves this module as a
`MonitorError` (status 503), or a `TransientError` when the connection itself was lost.

A hung libvirtd must not block the loop forever. libvirt's default event loop runs in one daemon
thread per process (`start_event_loop`), and every connection gets keepalive (`KEEPALIVE_*`):
a call to a daemon that stopped answering fails after 15-20 s as a lost connection. Opening a
connection has no keepalive, so it runs in a helper thread that callers wait on for at most
`open_timeout` seconds.

Imports only `errors`, `screenshots` (PNG conversion, with Pillow) and libvirt; never the loop,
models or web layers.
"""

from __future__ import annotations

import io
import ipaddress
import logging
import os
import random
import struct
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from string import ascii_lowercase
from typing import Any
from typing import Protocol

import libvirt

from monitor.errors import MonitorError
from monitor.errors import TransientError
from monitor.screenshots import to_png

log = logging.getLogger(__name__)

QCOW2_MAGIC = b"QFI\xfb"

# The order upstream's domifaddr fallback uses is lease, arp, agent (§8.2); ARP is broken on
# libvirt 9.0 with recent kernels ("wrong nlmsg len"), so it goes last here.
ADDRESS_SOURCES = (
    ("lease", libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE),
    ("agent", libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT),
    ("arp", libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP),
)
# DHCP leases outlive their guests (dnsmasq keeps them for the lease time, 1 h by default), so
# a guest started with a MAC that had one reports that old address at once, before it has
# even booted. `start_guest` therefore notes, in the domain's metadata, the leases its MACs
# had just before the start; `ipv4_address` ignores a lease that is still exactly one of
# those (same MAC, address and expiry time: a new lease or a renewal changes the expiry).
# How a guest finds its token (see _give_guest_token).
GUEST_TOKEN_OEM_PREFIX = "monitor-guest-token="
GUEST_TOKEN_CMDLINE_PREFIX = "monitor.guest_token="
STALE_LEASES_URI = "urn:monitor:leases-before-start"
STALE_LEASES_KEY = "monitor"

# Errors that mean the connection to libvirtd is gone (measured on libvirt 9.0 after killing
# libvirtd: "Cannot write data: Broken pipe" is SYSTEM_ERROR from RPC, the next call gives
# "client socket is closed" from RPC; after SIGSTOP with keepalive: "connection closed due to
# keepalive timeout", INTERNAL_ERROR from RPC). Other SYSTEM_ERRORs (e.g. a storage file) are not.
_LOST_CODES = {libvirt.VIR_ERR_RPC, libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_INVALID_CONN}
_LOST_DOMAINS = {libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE}

# Keepalive: a ping after KEEPALIVE_INTERVAL s without traffic from libvirtd; the connection is
# closed when KEEPALIVE_COUNT pings in a row go unanswered (measured: 20.0 s after SIGSTOP).
KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 3
# How long a caller waits for libvirt.open(); a slower open keeps going in its thread, and the
# next caller waits for that same open.
OPEN_TIMEOUT = 30.0
EVENT_LOOP_THREAD_NAME = "libvirt-event-loop"

_event_loop_lock = threading.Lock()
_event_loop_thread: threading.Thread | None = None

# Transient `dir` pools opened over a source image's directory, for the time of one copy.
SOURCE_POOL_PREFIX = "monitor-source-"

# libvirt's domain states as `guest_state` reports them; any other state is "other".
_GUEST_STATES = {
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "running",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
}


@dataclass(frozen=True)
class Guest:
    """A libvirt domain as the loop sees it."""

    name: str
    active: bool


class Hypervisor(Protocol):
    """The guest operations the monitor loop needs. Every method may raise `MonitorError`."""

    def list_guests(self, prefix: str) -> list[Guest]:
        """Return every guest (defined or running) whose name starts with `prefix`."""
        ...

    def create_guest(
        self, name: str, template_xml: str, base_image: Path, guest_token: str | None = None
    ) -> None:
        """Define guest `name` from a profile's domain XML, with its own disk backed by
        `base_image` and `guest_token` for the guest to read. Defined, not started."""
        ...

    def start_guest(self, name: str) -> None:
        """Start a defined guest."""
        ...

    def destroy_guest(self, name: str) -> None:
        """Stop and undefine guest `name` and delete its own disk. Idempotent: a guest or
        disk that is already gone is fine. Never touches base images."""
        ...

    def list_volumes(self, prefix: str) -> list[str]:
        """Return the names of the runner disks (`<guest>.qcow2`) in the runner storage pool
        whose name starts with `prefix`, sorted, whether or not their guest still exists.
        An orphan `<guest>.qcow2` is removed with `destroy_guest(<guest>)`."""
        ...

    def create_image_guest(
        self,
        name: str,
        template_xml: str,
        volume: str,
        size: int,
        source: Path | None = None,
        seed_iso: Path | None = None,
        guest_token: str | None = None,
    ) -> Path:
        """Create base-image volume `volume` (qcow2, `size` bytes: a standalone copy of
        `source`, or empty) and define rebuild guest `name` whose first disk is that volume,
        with `seed_iso` as a read-only CD-ROM. Not started. Return the volume's path.
        An existing guest or volume of that name is a 409."""
        ...

    def guest_state(self, name: str) -> str | None:
        """Return "running", "shutoff", "paused" or "other"; None when there is no such guest."""
        ...

    def remove_image_guest(self, name: str) -> None:
        """Stop and undefine a rebuild guest, keeping its disk volume (the product).
        Idempotent."""
        ...

    def volume_path(self, volume: str) -> Path | None:
        """Return the path of `volume` in the storage pool, or None if there is none."""
        ...

    def list_image_volumes(self, prefix: str) -> list[str]:
        """Return the names of the volumes in the storage pool starting with `prefix`
        (any suffix), sorted."""
        ...

    def delete_volume(self, volume: str) -> None:
        """Delete `volume` from the storage pool. Idempotent. A volume that backs another
        volume (a runner's overlay) is refused with a 409."""
        ...

    def screenshot_raw(self, name: str) -> bytes:
        """Return the guest's screen exactly as the hypervisor produced it (PNG or PPM). A
        guest that is not running is an error (409)."""
        ...

    def screenshot_png(self, name: str) -> bytes:
        """Return a PNG of the guest's screen. A guest that is not running is an error."""
        ...

    def ipv4_address(self, name: str) -> str | None:
        """Return the guest's IPv4 address, or None while it has none."""
        ...

    def close(self) -> None:
        """Release the hypervisor connection."""
        ...


def start_event_loop() -> threading.Thread:
    """Register libvirt's default event implementation and run it in a daemon thread, once
    per process; return that thread. Thread-safe. Must run before the `libvirt.open` of any
    connection that needs keepalive or events: connections opened earlier get neither."""
    global _event_loop_thread
    with _event_loop_lock:
        if _event_loop_thread is None:
            try:
                libvirt.virEventRegisterDefaultImpl()
            except libvirt.libvirtError as e:
                raise MonitorError(f"cannot start the libvirt event loop: {e}", 503) from e
            thread = threading.Thread(
                target=_run_event_loop, name=EVENT_LOOP_THREAD_NAME, daemon=True
            )
            thread.start()
            _event_loop_thread = thread
        return _event_loop_thread


def _run_event_loop() -> None:
    while True:
        try:
            libvirt.virEventRunDefaultImpl()
        except libvirt.libvirtError as e:  # pragma: no cover - libvirt never fails here
            log.warning("libvirt event loop: %s", e)
            time.sleep(1)


class _PendingOpen:
    """A `libvirt.open(uri)` (plus keepalive) running in its own daemon thread: against a hung
    libvirtd it blocks until the daemon answers, and no libvirt timeout covers it."""

    def __init__(self, uri: str | None) -> None:
        self.uri = uri
        self.conn: libvirt.virConnect | None = None
        self.error: Exception | None = None
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._abandoned = False
        threading.Thread(target=self._open, name="libvirt-open", daemon=True).start()

    def wait(self, timeout: float) -> bool:
        """Return whether the open finished (with `conn` or `error`) within `timeout` s."""
        return self._done.wait(timeout)

    def abandon(self) -> None:
        """Nobody wants the connection any more: close it now or when it arrives."""
        with self._lock:
            self._abandoned = True
            conn, self.conn = self.conn, None
        _close_quietly(conn)

    def _open(self) -> None:
        conn = None
        try:
            conn = libvirt.open(self.uri)
            try:
                conn.setKeepAlive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
            except libvirt.libvirtError as e:
                # The test driver: "this function is not supported ... virConnectSetKeepAlive".
                log.debug("libvirt at %s: no keepalive: %s", _uri_name(self.uri), e)
        except Exception as e:  # noqa: BLE001 - handed to the waiting callers
            self.error = e
        with self._lock:
            if self._abandoned:
                conn, abandoned = None, conn
            else:
                self.conn, abandoned = conn, None
            self._done.set()
        _close_quietly(abandoned)


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


def pick_ipv4(addresses: dict[str, Any], subnet: ipaddress.IPv4Network | None = None) -> str | None:
    """Return the first usable IPv4 address in a `virDomainInterfaceAddresses` result.

    `addresses` maps interface name to `{'addrs': [{'addr', 'prefix', 'type'}], 'hwaddr'}`
    (type 0 is IPv4). Loopback, link-local and unspecified addresses are skipped, and so are
    addresses outside `subnet` when it is given.
    """
    for interface in addresses.values():
        for entry in (interface or {}).get("addrs") or []:
            if entry.get("type") != libvirt.VIR_IP_ADDR_TYPE_IPV4:
                continue
            try:
                address = ipaddress.IPv4Address(entry.get("addr"))
            except ValueError:
                continue
            if address.is_loopback or address.is_link_local or address.is_unspecified:
                continue
            if subnet is not None and address not in subnet:
                continue
            return str(address)
    return None


class LibvirtHypervisor:
    """`Hypervisor` on a libvirt connection, opened lazily and re-opened after it is lost.

    `uri` None means libvirt's default URI. Runner disks are volumes in `storage_pool`.
    Thread-safe: the connection is shared by all threads (libvirt connections are), and only
    opening or dropping it is serialised. A call that finds no connection waits at most
    `open_timeout` seconds for one (`TransientError` after that).
    """

    def __init__(
        self, uri: str | None, storage_pool: str = "default", *, open_timeout: float = OPEN_TIMEOUT
    ) -> None:
        self.uri = uri
        self.storage_pool = storage_pool
        self.open_timeout = open_timeout
        self._conn: libvirt.virConnect | None = None
        self._opening: _PendingOpen | None = None
        self._lock = threading.Lock()
        self.errors = 0  # libvirt calls that failed (/metrics)
        # libvirt prints every error to stderr unless a handler is registered.
        libvirt.registerErrorHandler(_ignore_libvirt_error, None)

    def volume_names(self) -> list[str]:
        """Names of all the volumes in the runner storage pool, sorted (for leak checks)."""
        return self._volume_names()

    def list_volumes(self, prefix: str) -> list[str]:
        """Names of the volumes in the runner storage pool (refreshed first) that start with
        `prefix` and end with `.qcow2`, sorted: runner disks, with or without a guest."""
        return [n for n in self._volume_names() if n.startswith(prefix) and n.endswith(".qcow2")]

    def list_guests(self, prefix: str) -> list[Guest]:
        """Return every guest (defined or running) whose name starts with `prefix`."""
        conn = self._connection()
        with self._errors(conn, "list guests"):
            domains = conn.listAllDomains(0)
        guests = []
        for dom in domains:
            try:
                with self._errors(conn, "list guests"):
                    name = dom.name()
                    if name.startswith(prefix):
                        guests.append(Guest(name, bool(dom.isActive())))
            except MonitorError as e:
                if not _is_no_domain(e.__cause__):
                    raise
                # Undefined by another thread between the listing and isActive().
        return sorted(guests, key=lambda g: g.name)

    def create_guest(
        self, name: str, template_xml: str, base_image: Path, guest_token: str | None = None
    ) -> None:
        """Define guest `name` with an overlay volume `<name>.qcow2` on `base_image`, and
        `guest_token` (if given) where the guest can read it.

        Steps:
        1. refuse if a domain of that name exists (its disk must not be touched);
        2. find the base image's format and virtual size (its pool volume, else its header);
        3. delete a left-over volume `<name>.qcow2`, then create the overlay volume;
        4. define the domain from `runner_domain_xml`, deleting the volume if that fails.
        The guest is not started.
        """
        if not name or "/" in name:
            raise MonitorError(f"invalid guest name {name!r}")
        conn = self._connection()
        if self._lookup(conn, name) is not None:
            raise MonitorError(f"cannot create guest {name}: it already exists", status=409)
        pool = self._pool(conn)
        base = os.path.abspath(base_image)
        base_format, capacity = self._base_image_info(conn, base)
        volume_xml = _overlay_volume_xml(f"{name}.qcow2", capacity, base, base_format)

        volume = self._create_volume(conn, pool, name, volume_xml)
        try:
            with self._errors(conn, f"define guest {name}"):
                domain_xml = runner_domain_xml(
                    template_xml, name, volume.path(), guest_token=guest_token
                )
                conn.defineXML(domain_xml)
        except BaseException:
            try:
                self._delete_volume(conn, volume, name)
            except MonitorError as cleanup:
                log.warning("guest %s: cannot delete its new volume: %s", name, cleanup)
            raise
        log.info("defined guest %s on %s (%s)", name, base, base_format)

    def start_guest(self, name: str) -> None:
        """Start a defined guest, first noting the DHCP leases its MACs already have (see
        `STALE_LEASES_URI`)."""
        conn = self._connection()
        dom = self._domain(conn, name)
        self._note_leases_before_start(conn, dom, name)
        with self._errors(conn, f"start guest {name}"):
            dom.create()

    def destroy_guest(self, name: str) -> None:
        """Stop and undefine guest `name`, then delete its volume `<name>.qcow2`.

        Idempotent: a missing domain, a stopped one, or a missing volume is fine. Only the
        runner's own volume is deleted; base images are shared and never touched.
        """
        conn = self._connection()
        dom = self._lookup(conn, name)
        if dom is not None:
            self._stop_and_undefine(conn, dom, name)
        pool = self._pool(conn)
        try:
            with self._errors(conn, f"look up the volume of guest {name}"):
                volume = pool.storageVolLookupByName(f"{name}.qcow2")
        except MonitorError as e:
            if not _has_code(e.__cause__, libvirt.VIR_ERR_NO_STORAGE_VOL):
                raise
            return
        self._delete_volume(conn, volume, name)

    def screenshot_raw(self, name: str) -> bytes:
        """Return the guest's screen in whatever format libvirt produced (QEMU 7.1 and later
        give PNG, older ones PPM; the test driver a fixed PNG), unconverted: the screenshot job
        compares these bytes to skip unchanged screens without decoding them.

        A guest that is not running is a `MonitorError` with status 409 (libvirt's test driver
        would return a picture anyway).
        """
        return self._screenshot(name)[1]

    def screenshot_png(self, name: str) -> bytes:
        """Return a PNG of the guest's screen, converting whatever format libvirt produced.

        A guest that is not running is a `MonitorError` with status 409.
        """
        mime, data = self._screenshot(name)
        try:
            return to_png(data)
        except MonitorError as e:
            raise MonitorError(f"screenshot of guest {name} ({mime}): {e}", 503) from e

    def ipv4_address(self, name: str) -> str | None:
        """Return the guest's first usable IPv4 address from its DHCP lease, guest agent or
        ARP entry (in that order), or None. A source that fails is skipped, and so is a
        lease the guest's MAC already had before `start_guest` started it (a destroyed
        guest's, not this one's). When there was such a lease, the host's ARP table is not
        asked either: it may still map that MAC to the destroyed guest's address."""
        conn = self._connection()
        dom = self._domain(conn, name)
        stale = False
        for source_name, source in ADDRESS_SOURCES:
            if stale and source == libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP:
                continue
            try:
                with self._errors(conn, f"get the {source_name} addresses of guest {name}"):
                    addresses = dom.interfaceAddresses(source, 0)
                if source == libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE and addresses:
                    current = self._without_stale_leases(conn, dom, name, addresses)
                    stale = current != addresses
                    addresses = current
            except TransientError:
                raise
            except MonitorError as e:
                log.debug("%s", e)
                continue
            address = pick_ipv4(addresses or {})
            if address is not None:
                return address
        return None

    def _note_leases_before_start(
        self, conn: libvirt.virConnect, dom: libvirt.virDomain, name: str
    ) -> None:
        """Record the leases the guest's MACs have now in its (persistent) metadata, which
        the start copies to the running domain: a monitor restarted later still knows them.
        Drivers without DHCP leases (the test driver) record nothing."""
        try:
            leases = self._current_leases(conn, dom, name)
        except TransientError:
            raise
        except MonitorError as e:
            log.debug("%s; not noting its leases", e)
            return
        element = ET.Element("leases")
        for mac, address, expiry in sorted(leases):
            ET.SubElement(element, "lease", mac=mac, ip=address, expiry=str(expiry))
        try:
            with self._errors(conn, f"note the leases of guest {name}"):
                dom.setMetadata(
                    libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                    ET.tostring(element, encoding="unicode"),
                    STALE_LEASES_KEY,
                    STALE_LEASES_URI,
                    libvirt.VIR_DOMAIN_AFFECT_CURRENT,
                )
        except TransientError:
            raise
        except MonitorError as e:
            # Not worth failing the start for: its addresses are then believed as before.
            log.warning("%s", e)

    def _without_stale_leases(
        self, conn: libvirt.virConnect, dom: libvirt.virDomain, name: str, addresses: Any
    ) -> dict[str, Any]:
        """`addresses` (a lease-source `interfaceAddresses` result) without the leases noted
        before the guest's start that nothing has renewed since."""
        before = self._leases_before_start(conn, dom, name)
        suspects = {
            (str(interface.get("hwaddr", "")).lower(), entry.get("addr"))
            for interface in addresses.values()
            for entry in (interface or {}).get("addrs") or []
        } & {(mac, address) for mac, address, _expiry in before}
        if not suspects:
            return dict(addresses)  # The usual case: fresh MACs, no lease before the start.
        try:
            stale = before & self._current_leases(conn, dom, name)
        except MonitorError as e:
            # The lease it had before cannot be told from a new one: not trusted.
            log.debug("%s; ignoring its leases from before its start", e)
            stale = before
        stale_pairs = {(mac, address) for mac, address, _expiry in stale}
        kept: dict[str, Any] = {}
        for interface_name, interface in addresses.items():
            mac = str((interface or {}).get("hwaddr", "")).lower()
            entries = [
                entry
                for entry in (interface or {}).get("addrs") or []
                if (mac, entry.get("addr")) not in stale_pairs
            ]
            kept[interface_name] = {**(interface or {}), "addrs": entries}
        if stale_pairs:
            log.debug("guest %s: ignoring leases from before its start: %s", name, stale_pairs)
        return kept

    def _leases_before_start(
        self, conn: libvirt.virConnect, dom: libvirt.virDomain, name: str
    ) -> set[tuple[str, str, int]]:
        """(MAC, address, expiry time) of the leases `start_guest` noted; empty if none were
        (a guest started some other way: every lease is believed, as before)."""
        try:
            with self._errors(conn, f"read the metadata of guest {name}"):
                text = dom.metadata(
                    libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                    STALE_LEASES_URI,
                    libvirt.VIR_DOMAIN_AFFECT_CURRENT,
                )
        except TransientError:
            raise
        except MonitorError as e:
            if not _has_code(e.__cause__, libvirt.VIR_ERR_NO_DOMAIN_METADATA):
                raise
            return set()
        try:
            element = ET.fromstring(text)
            return {
                (lease.get("mac", "").lower(), lease.get("ip", ""), int(lease.get("expiry", "")))
                for lease in element.iter("lease")
            }
        except (ET.ParseError, ValueError) as e:
            log.warning("guest %s: unreadable lease metadata, ignored: %s", name, e)
            return set()

    def _current_leases(
        self, conn: libvirt.virConnect, dom: libvirt.virDomain, name: str
    ) -> set[tuple[str, str, int]]:
        """(MAC, address, expiry time) of the DHCP leases that libvirt's networks hold now
        for the MACs of the guest's network interfaces."""
        with self._errors(conn, f"read the interfaces of guest {name}"):
            devices = ET.fromstring(dom.XMLDesc(0)).find("devices")
        macs_by_network: dict[str, set[str]] = {}
        interfaces = [] if devices is None else devices.findall("interface[@type='network']")
        for interface in interfaces:
            source, mac = interface.find("source"), interface.find("mac")
            if source is not None and mac is not None and source.get("network"):
                macs = macs_by_network.setdefault(source.get("network", ""), set())
                macs.add(mac.get("address", "").lower())
        leases: set[tuple[str, str, int]] = set()
        for network_name, macs in sorted(macs_by_network.items()):
            with self._errors(conn, f"read the DHCP leases of network {network_name}"):
                found = conn.networkLookupByName(network_name).DHCPLeases(None, 0)
            for lease in found:
                mac = str(lease.get("mac", "")).lower()
                if mac in macs and lease.get("type") == libvirt.VIR_IP_ADDR_TYPE_IPV4:
                    leases.add((mac, str(lease.get("ipaddr")), int(lease.get("expirytime", 0))))
        return leases

    def close(self) -> None:
        """Close the connection (and give up an open in progress); the next call opens a new
        one."""
        with self._lock:
            conn, self._conn = self._conn, None
            opening, self._opening = self._opening, None
        if opening is not None:
            opening.abandon()
        _close_quietly(conn)

    # -- base-image volumes and rebuild guests -----------------------------------------------

    def create_image_guest(
        self,
        name: str,
        template_xml: str,
        volume: str,
        size: int,
        source: Path | None = None,
        seed_iso: Path | None = None,
        guest_token: str | None = None,
    ) -> Path:
        """Create base-image volume `volume` and define rebuild guest `name` writing into it.

        The volume is qcow2 in the storage pool and stands alone (no backing file), so runner
        overlays on it survive the source being replaced or deleted:
        - without `source`, an empty disk of `size` bytes (upstream's windows10 kind);
        - with `source`, libvirt's `createXMLFrom` (`qemu-img convert` into qcow2, which also
          flattens any backing chain) from the pool volume that is that file, or, when no
          active pool holds it, from a transient `dir` pool over its directory that exists
          only for the copy. The format is libvirt's probe of the file, so any image format
          qemu-img reads will do; the monitor never streams the bytes itself. The copy is
          then grown to `size`; a source larger than `size` is refused (400), as upstream.

        The guest is `image_guest_domain_xml(template_xml, ...)`: the profile's domain with a
        fresh name, UUID and MACs, its first disk the volume itself (not an overlay) and
        `seed_iso`, if given, as a read-only CD-ROM. It is defined, not started.

        Returns the volume's path. A guest `name` or a volume `volume` that exists already is
        a 409 and nothing is touched; any later failure deletes the new volume again.
        """
        for kind, value in (("guest", name), ("volume", volume)):
            if not value or "/" in value:
                raise MonitorError(f"invalid {kind} name {value!r}", 400)
        if size <= 0:
            raise MonitorError(f"image volume {volume}: invalid size {size!r}", 400)
        seed = None if seed_iso is None else os.path.abspath(seed_iso)
        if seed is not None and not os.path.isfile(seed):
            raise MonitorError(f"cannot create guest {name}: no seed ISO {seed}", 404)
        source_path = None if source is None else os.path.abspath(source)

        conn = self._connection()
        if self._lookup(conn, name) is not None:
            raise MonitorError(f"cannot create guest {name}: it already exists", 409)
        pool = self._pool(conn)
        self._refresh(conn, pool)
        if self._find_volume(conn, pool, volume) is not None:
            raise MonitorError(f"cannot create image volume {volume}: it already exists", 409)

        volume_xml = _image_volume_xml(volume, size)
        if source_path is None:
            with self._errors(conn, f"create image volume {volume}"):
                image = pool.createXML(volume_xml, 0)
        else:
            image = self._copy_into_new_volume(conn, pool, volume_xml, volume, size, source_path)
        try:
            with self._errors(conn, f"grow image volume {volume} to {size} bytes"):
                if image.info()[1] < size:  # qemu-img convert keeps the source's size
                    image.resize(size, 0)
                path = image.path()
            with self._errors(conn, f"define guest {name}"):
                conn.defineXML(
                    image_guest_domain_xml(template_xml, name, path, seed, guest_token)
                )
        except BaseException:
            self._delete_new_volume(conn, image, volume)
            raise
        log.info(
            "defined rebuild guest %s on image volume %s (%s)",
            name,
            volume,
            f"copy of {source_path}" if source_path else f"empty, {size} bytes",
        )
        return Path(path)

    def guest_state(self, name: str) -> str | None:
        """Return the guest's state as "running" (also libvirt's "blocked", a running guest
        waiting for I/O), "shutoff", "paused" or "other" (shutting down, crashed,
        suspended to RAM), or None when there is no such guest: enough to wait for a rebuild
        guest to power itself off."""
        conn = self._connection()
        dom = self._lookup(conn, name)
        if dom is None:
            return None
        try:
            with self._errors(conn, f"get the state of guest {name}"):
                state = dom.state(0)[0]
        except MonitorError as e:
            if _is_no_domain(e.__cause__):
                return None  # undefined meanwhile
            raise
        return _GUEST_STATES.get(state, "other")

    def remove_image_guest(self, name: str) -> None:
        """Stop (if running) and undefine rebuild guest `name`, with its NVRAM but without
        any storage: its disk is the base-image volume, the product of the rebuild, and
        `delete_volume` removes it when that is wanted. Idempotent."""
        conn = self._connection()
        dom = self._lookup(conn, name)
        if dom is not None:
            self._stop_and_undefine(conn, dom, name)

    def volume_path(self, volume: str) -> Path | None:
        """Return the path of `volume` in the storage pool, or None if the pool has no such
        volume (as libvirt knows it: no refresh, so this is cheap)."""
        conn = self._connection()
        pool = self._pool(conn)
        found = self._find_volume(conn, pool, volume)
        if found is None:
            return None
        with self._errors(conn, f"get the path of volume {volume}"):
            return Path(found.path())

    def list_image_volumes(self, prefix: str) -> list[str]:
        """Names of the volumes in the storage pool (refreshed first) that start with
        `prefix`, whatever their suffix, sorted."""
        return [n for n in self._volume_names() if n.startswith(prefix)]

    def delete_volume(self, volume: str) -> None:
        """Delete `volume` from the storage pool; one that is gone already is fine.

        Refused (409, nothing deleted) while `volume` is the backing file of another volume
        in the pool, as every runner overlay is of its base image: deleting it would break
        those runners' disks. The check reads each volume's `<backingStore><path>` after a
        pool refresh; the caller (the monitor thread) must not create overlays on `volume`
        meanwhile.
        """
        conn = self._connection()
        pool = self._pool(conn)
        self._refresh(conn, pool)
        found = self._find_volume(conn, pool, volume)
        if found is None:
            return
        with self._errors(conn, f"get the path of volume {volume}"):
            path = os.path.normpath(found.path())
        users = self._volumes_backed_by(conn, pool, path)
        if users:
            shown = ", ".join(users[:5]) + (f" and {len(users) - 5} more" if len(users) > 5 else "")
            raise MonitorError(
                f"cannot delete volume {volume}: it is the backing file of {shown}", 409
            )
        try:
            with self._errors(conn, f"delete volume {volume}"):
                found.delete(0)
        except MonitorError as e:
            if not _has_code(e.__cause__, libvirt.VIR_ERR_NO_STORAGE_VOL):
                raise
            return
        log.info("deleted volume %s", volume)

    # -- connection and error handling ----------------------------------------------------

    def _connection(self) -> libvirt.virConnect:
        """Return the connection, opening one if needed.

        The open runs in a `_PendingOpen` thread shared by every caller that needs it; each
        caller waits at most `open_timeout` s and then gets a `TransientError`, while the open
        goes on for the next caller. The event loop is started first, for keepalive.
        """
        while True:
            with self._lock:
                if self._conn is not None:
                    return self._conn
                if self._opening is None:
                    start_event_loop()
                    self._opening = _PendingOpen(self.uri)
                opening = self._opening
            if not opening.wait(self.open_timeout):
                raise TransientError(
                    f"cannot connect to libvirt at {_uri_name(self.uri)}: no answer within "
                    f"{self.open_timeout:g} s (is libvirtd hung?)"
                )
            with self._lock:
                if self._opening is opening:
                    self._opening = None
                    self._conn = opening.conn
                    if self._conn is not None:
                        log.info("connected to libvirt at %s", _uri_name(self.uri))
            if opening.error is not None:
                raise TransientError(
                    f"cannot connect to libvirt at {_uri_name(self.uri)}: {opening.error}"
                ) from opening.error
            # Otherwise the connection is in self._conn, unless close() or a lost connection
            # took it away meanwhile: then go round and open another.

    def _drop(self, conn: libvirt.virConnect) -> None:
        """Forget a lost connection, unless another thread already replaced it.

        It is not closed here: another thread may be inside a libvirt call on it, and
        closing frees what that call is using (a segfault, seen while libvirtd was stopped
        under a screenshot pass). The binding closes it when the last thread lets go of it.
        """
        with self._lock:
            if self._conn is conn:
                self._conn = None

    @contextmanager
    def _errors(self, conn: libvirt.virConnect, action: str) -> Iterator[None]:
        """Turn a libvirtError into a MonitorError about `action` (TransientError and a
        reconnect on the next call when the connection is lost)."""
        try:
            yield
        except libvirt.libvirtError as e:
            with self._lock:
                self.errors += 1
            if _is_lost(conn, e):
                self._drop(conn)
                raise TransientError(f"libvirt connection lost: cannot {action}: {e}") from e
            raise MonitorError(f"libvirt: cannot {action}: {e}", status=503) from e

    # -- helpers ---------------------------------------------------------------------------

    def _screenshot(self, name: str) -> tuple[str, bytes]:
        """(MIME type, bytes) of the running guest's screen, as libvirt streams it."""
        conn = self._connection()
        dom = self._domain(conn, name)
        with self._errors(conn, f"take a screenshot of guest {name}"):
            if not dom.isActive():
                raise MonitorError(f"cannot take a screenshot of guest {name}: not running", 409)
            stream = conn.newStream(0)
            chunks: list[bytes] = []
            try:
                mime = dom.screenshot(stream, 0, 0)
                stream.recvAll(_collect, chunks)
                stream.finish()
            except BaseException:
                _abort_quietly(stream)
                raise
        return mime, b"".join(chunks)

    def _volume_names(self) -> list[str]:
        conn = self._connection()
        pool = self._pool(conn)
        self._refresh(conn, pool)
        with self._errors(conn, f"list volumes of {self.storage_pool}"):
            return sorted(pool.listVolumes())

    def _lookup(self, conn: libvirt.virConnect, name: str) -> libvirt.virDomain | None:
        try:
            with self._errors(conn, f"look up guest {name}"):
                return conn.lookupByName(name)
        except MonitorError as e:
            if _is_no_domain(e.__cause__):
                return None
            raise

    def _domain(self, conn: libvirt.virConnect, name: str) -> libvirt.virDomain:
        dom = self._lookup(conn, name)
        if dom is None:
            raise MonitorError(f"guest {name} does not exist", status=404)
        return dom

    def _pool(self, conn: libvirt.virConnect) -> libvirt.virStoragePool:
        try:
            with self._errors(conn, f"look up storage pool {self.storage_pool}"):
                pool = conn.storagePoolLookupByName(self.storage_pool)
                active = pool.isActive()
        except MonitorError as e:
            if not _has_code(e.__cause__, libvirt.VIR_ERR_NO_STORAGE_POOL):
                raise
            raise MonitorError(
                f"libvirt storage pool {self.storage_pool!r} does not exist; create it or set "
                "the libvirt_storage_pool config key to an existing pool",
                status=503,
            ) from e
        if not active:
            raise MonitorError(f"libvirt storage pool {self.storage_pool!r} is not active", 503)
        return pool

    def _base_image_info(self, conn: libvirt.virConnect, base: str) -> tuple[str, int]:
        """Return (format, virtual size) of the base image: from its volume if some pool has
        it, else from the file (qcow2 header, or raw with the file's size)."""
        try:
            with self._errors(conn, f"look up base image {base}"):
                volume = conn.storageVolLookupByPath(base)
                fmt = ET.fromstring(volume.XMLDesc(0)).find("target/format")
                capacity = volume.info()[1]
            if fmt is not None and fmt.get("type"):
                return fmt.get("type", "raw"), capacity
        except MonitorError as e:
            if not _has_code(e.__cause__, libvirt.VIR_ERR_NO_STORAGE_VOL):
                raise
        return sniff_image(Path(base))

    def _create_volume(
        self,
        conn: libvirt.virConnect,
        pool: libvirt.virStoragePool,
        name: str,
        volume_xml: str,
    ) -> libvirt.virStorageVol:
        volume_name = f"{name}.qcow2"
        for attempt in range(2):
            try:
                with self._errors(conn, f"look up the volume of guest {name}"):
                    old = pool.storageVolLookupByName(volume_name)
                log.warning("deleting left-over volume %s", volume_name)
                self._delete_volume(conn, old, name)
            except MonitorError as e:
                if not _has_code(e.__cause__, libvirt.VIR_ERR_NO_STORAGE_VOL):
                    raise
            try:
                with self._errors(conn, f"create the volume of guest {name}"):
                    return pool.createXML(volume_xml, 0)
            except MonitorError as e:
                # A file the pool does not know yet ("volume target path ... already
                # exists"): refresh the pool so the next round finds and deletes it.
                if attempt or not _has_code(e.__cause__, libvirt.VIR_ERR_OPERATION_INVALID):
                    raise
                with self._errors(conn, f"refresh storage pool {self.storage_pool}"):
                    pool.refresh(0)
        raise AssertionError("unreachable")

    def _delete_volume(
        self, conn: libvirt.virConnect, volume: libvirt.virStorageVol, name: str
    ) -> None:
        try:
            with self._errors(conn, f"delete the volume of guest {name}"):
                volume.delete(0)
        except MonitorError as e:
            if not _has_code(e.__cause__, libvirt.VIR_ERR_NO_STORAGE_VOL):
                raise

    def _stop_and_undefine(
        self, conn: libvirt.virConnect, dom: libvirt.virDomain, name: str
    ) -> None:
        gone_or_stopped = (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID)
        try:
            with self._errors(conn, f"stop guest {name}"):
                if dom.isActive():
                    dom.destroy()
        except MonitorError as e:
            if not _has_code(e.__cause__, *gone_or_stopped):
                raise
        flags = (
            libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
            | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        )
        for with_flags in (True, False):
            try:
                with self._errors(conn, f"undefine guest {name}"):
                    if with_flags:
                        dom.undefineFlags(flags)
                    else:
                        dom.undefine()
                log.info("destroyed guest %s", name)
                return
            except TransientError:
                raise
            except MonitorError as e:
                if _is_no_domain(e.__cause__):
                    return
                if not with_flags:
                    raise
                # Drivers without NVRAM or snapshot support reject the flags.
                log.debug("%s; retrying without flags", e)

    def _refresh(self, conn: libvirt.virConnect, pool: libvirt.virStoragePool) -> None:
        """Refresh the pool, so that files made or removed behind libvirt's back count.

        libvirt refuses while a volume is being built in the pool ("has asynchronous jobs
        running"), and a base-image copy takes as long as `qemu-img convert` does; then the
        volumes libvirt knows are used as they are, rather than failing every listing.
        """
        try:
            with self._errors(conn, f"refresh storage pool {pool.name()}"):
                pool.refresh(0)
        except TransientError:
            raise
        except MonitorError as e:
            if not _is_busy_pool(e.__cause__):
                raise
            log.debug("%s; using the volumes libvirt knows", e)

    def _find_volume(
        self, conn: libvirt.virConnect, pool: libvirt.virStoragePool, volume: str
    ) -> libvirt.virStorageVol | None:
        try:
            with self._errors(conn, f"look up volume {volume}"):
                return pool.storageVolLookupByName(volume)
        except MonitorError as e:
            if _has_code(e.__cause__, libvirt.VIR_ERR_NO_STORAGE_VOL):
                return None
            raise

    def _copy_into_new_volume(
        self,
        conn: libvirt.virConnect,
        pool: libvirt.virStoragePool,
        volume_xml: str,
        volume: str,
        size: int,
        source: str,
    ) -> libvirt.virStorageVol:
        """Create the volume of `volume_xml` in `pool` as a copy of the image file `source`
        (converted to the volume's format by libvirt), refusing a source larger than `size`;
        return it as a volume of `conn`.

        The copy runs on a connection of its own. Measured on libvirt 9.0: while one call
        on a connection runs `createXMLFrom`, other calls on that connection can wait until
        it returns (a pool lookup waited 0.15 s of a 0.17 s copy); a multi-GB copy would so
        stall the monitor thread and the screenshot job for minutes. On a second connection
        they took milliseconds throughout. (The test driver keeps each connection's state
        apart, so there the copy stays on `conn`.)
        """
        copier = self._copy_connection(conn)
        try:
            copy_pool = pool if copier is conn else self._pool(copier)
            with self._source_volume(copier, source) as original:
                with self._errors(copier, f"read source image {source}"):
                    capacity = original.info()[1]
                if capacity > size:
                    raise MonitorError(
                        f"cannot create image volume {volume}: source image {source} is "
                        f"{capacity} bytes, more than the image size of {size} bytes",
                        400,
                    )
                with self._errors(copier, f"copy {source} into image volume {volume}"):
                    copy = copy_pool.createXMLFrom(volume_xml, original, 0)
            if copier is conn:
                return copy
            try:
                with self._errors(conn, f"look up the new image volume {volume}"):
                    return pool.storageVolLookupByName(volume)
            except BaseException:
                self._delete_new_volume(copier, copy, volume)
                raise
        finally:
            if copier is not conn:
                _close_quietly(copier)

    def _copy_connection(self, conn: libvirt.virConnect) -> libvirt.virConnect:
        """A new connection to the same libvirt for one long call (see
        `_copy_into_new_volume`), or `conn` itself on the test driver. The caller closes it."""
        with self._errors(conn, "get the libvirt driver's name"):
            if conn.getType() == "TEST":
                return conn
        opening = _PendingOpen(self.uri)
        if not opening.wait(self.open_timeout):
            opening.abandon()
            raise TransientError(
                f"cannot connect to libvirt at {_uri_name(self.uri)} for a copy: no answer "
                f"within {self.open_timeout:g} s (is libvirtd hung?)"
            )
        if opening.conn is None:
            raise TransientError(
                f"cannot connect to libvirt at {_uri_name(self.uri)} for a copy: {opening.error}"
            ) from opening.error
        return opening.conn

    @contextmanager
    def _source_volume(
        self, conn: libvirt.virConnect, source: str
    ) -> Iterator[libvirt.virStorageVol]:
        """The storage volume that is the file `source`, for `createXMLFrom`.

        From the active pool that has it, else from a transient `dir` pool over its directory
        (`SOURCE_POOL_PREFIX`...), destroyed again when the caller is done; destroying a dir
        pool leaves its files alone. A monitor killed meanwhile leaves that pool behind until
        libvirtd restarts; the next copy from the same directory then uses it.
        """
        found = None
        try:
            with self._errors(conn, f"look up source image {source}"):
                found = conn.storageVolLookupByPath(source)
        except MonitorError as e:
            if not _has_code(e.__cause__, libvirt.VIR_ERR_NO_STORAGE_VOL):
                raise
        if found is not None:
            yield found
            return
        if not os.path.isfile(source):
            raise MonitorError(f"no source image {source}", 404)
        directory, filename = os.path.split(source)
        holder = self._active_dir_pool(conn, directory)
        transient = None
        if holder is None:
            pool_xml = _dir_pool_xml(f"{SOURCE_POOL_PREFIX}{uuid.uuid4().hex[:12]}", directory)
            with self._errors(conn, f"open the directory of source image {source} as a pool"):
                transient = holder = conn.storagePoolCreateXML(pool_xml, 0)
        else:
            self._refresh(conn, holder)
        try:
            try:
                with self._errors(conn, f"look up source image {source}"):
                    found = holder.storageVolLookupByName(filename)
            except MonitorError as e:
                if not _has_code(e.__cause__, libvirt.VIR_ERR_NO_STORAGE_VOL):
                    raise
                raise MonitorError(
                    f"libvirt does not see source image {source} as a disk image", 404
                ) from e
            yield found
        finally:
            if transient is not None:
                try:
                    with self._errors(conn, f"destroy transient storage pool for {source}"):
                        transient.destroy()
                except MonitorError as e:
                    log.warning("%s", e)

    def _active_dir_pool(
        self, conn: libvirt.virConnect, directory: str
    ) -> libvirt.virStoragePool | None:
        """The active pool whose target is `directory`, if any: libvirt refuses a second
        `dir` pool on the same directory."""
        wanted = os.path.normpath(directory)
        with self._errors(conn, "list storage pools"):
            for pool in conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE):
                path = ET.fromstring(pool.XMLDesc(0)).findtext("target/path")
                if path and os.path.normpath(path) == wanted:
                    return pool
        return None

    def _volumes_backed_by(
        self, conn: libvirt.virConnect, pool: libvirt.virStoragePool, path: str
    ) -> list[str]:
        """Names of the pool's volumes whose backing file is `path`, sorted."""
        with self._errors(conn, f"list volumes of {self.storage_pool}"):
            volumes = pool.listAllVolumes(0)
        users = []
        for other in volumes:
            try:
                with self._errors(conn, f"read volume {other.name()}"):
                    backing = ET.fromstring(other.XMLDesc(0)).findtext("backingStore/path")
            except MonitorError as e:
                if _has_code(e.__cause__, libvirt.VIR_ERR_NO_STORAGE_VOL):
                    continue  # deleted meanwhile
                raise
            if backing and os.path.normpath(backing) == path:
                users.append(other.name())
        return sorted(users)

    def _delete_new_volume(
        self, conn: libvirt.virConnect, volume: libvirt.virStorageVol, name: str
    ) -> None:
        """Undo a volume this call created, logging (not raising) when that fails."""
        try:
            with self._errors(conn, f"delete the new image volume {name}"):
                volume.delete(0)
        except MonitorError as e:
            if not _has_code(e.__cause__, libvirt.VIR_ERR_NO_STORAGE_VOL):
                log.warning("%s", e)


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


def _overlay_volume_xml(name: str, capacity: int, backing: str, backing_format: str) -> str:
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


def _image_volume_xml(name: str, capacity: int) -> str:
    volume = ET.Element("volume")
    ET.SubElement(volume, "name").text = name
    ET.SubElement(volume, "capacity", unit="bytes").text = str(capacity)
    target = ET.SubElement(volume, "target")
    ET.SubElement(target, "format", type="qcow2")
    ET.SubElement(target, "compat").text = "1.1"  # as _overlay_volume_xml
    return ET.tostring(volume, encoding="unicode")


def _dir_pool_xml(name: str, directory: str) -> str:
    pool = ET.Element("pool", type="dir")
    ET.SubElement(pool, "name").text = name
    ET.SubElement(ET.SubElement(pool, "target"), "path").text = directory
    return ET.tostring(pool, encoding="unicode")


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


def _has_code(error: BaseException | None, *codes: int) -> bool:
    return isinstance(error, libvirt.libvirtError) and error.get_error_code() in codes


def _is_no_domain(error: BaseException | None) -> bool:
    return _has_code(error, libvirt.VIR_ERR_NO_DOMAIN)


def _is_busy_pool(error: BaseException | None) -> bool:
    # "internal error: pool 'x' has asynchronous jobs running." (libvirt 9.0 storage driver)
    return _has_code(error, libvirt.VIR_ERR_INTERNAL_ERROR) and "asynchronous jobs" in str(error)


def _is_lost(conn: libvirt.virConnect, error: libvirt.libvirtError) -> bool:
    if error.get_error_code() in _LOST_CODES or error.get_error_domain() in _LOST_DOMAINS:
        return True
    try:
        return not conn.isAlive()
    except libvirt.libvirtError:
        return True


def _uri_name(uri: str | None) -> str:
    return uri or "the default URI"


def _close_quietly(conn: libvirt.virConnect | None) -> None:
    if conn is None:
        return
    try:
        conn.close()
    except libvirt.libvirtError as e:
        log.debug("closing libvirt connection: %s", e)


def _abort_quietly(stream: libvirt.virStream) -> None:
    try:
        stream.abort()
    except libvirt.libvirtError:
        pass


def _collect(_stream: libvirt.virStream, data: bytes, chunks: list[bytes]) -> int:
    chunks.append(data)
    return 0


def _ignore_libvirt_error(_ctx: object, _error: object) -> None:
    pass
