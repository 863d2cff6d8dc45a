"""A guest's IPv4 address, from its DHCP lease, guest agent or ARP entry, without believing a
lease that a destroyed guest with the same MAC left behind.

DHCP leases outlive their guests (dnsmasq keeps them for the lease time, 1 h by default), so
a guest started with a MAC that had one reports that old address at once, before it has even
booted. `GuestAddresses.note_leases_before_start` therefore notes, in the domain's metadata,
the leases its MACs had just before the start; `ipv4_address` ignores a lease that is still
exactly one of those (same MAC, address and expiry time: a new lease or a renewal changes the
expiry).

Used by `guests` from any thread (web threads ask for addresses while the monitor thread
starts guests).
"""

from __future__ import annotations

import ipaddress
import logging
import xml.etree.ElementTree as ET
from typing import Any

import libvirt

from monitor.errors import MonitorError
from monitor.errors import TransientError
from monitor.hypervisor.connection import Connection
from monitor.hypervisor.connection import has_code

log = logging.getLogger(__name__)

# The order upstream's domifaddr fallback uses is lease, arp, agent (§8.2); ARP is broken on
# libvirt 9.0 with recent kernels ("wrong nlmsg len"), so it goes last here.
ADDRESS_SOURCES = (
    ("lease", libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE),
    ("agent", libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT),
    ("arp", libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP),
)
STALE_LEASES_URI = "urn:monitor:leases-before-start"
STALE_LEASES_KEY = "monitor"


class GuestAddresses:
    """Addresses of the domains on `connection`, and the lease notes that make them right."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def ipv4_address(
        self, conn: libvirt.virConnect, dom: libvirt.virDomain, name: str
    ) -> str | None:
        """Return the guest's first usable IPv4 address from its DHCP lease, guest agent or
        ARP entry (in that order), or None. A source that fails is skipped, and so is a
        lease the guest's MAC already had before `start_guest` started it (a destroyed
        guest's, not this one's). When there was such a lease, the host's ARP table is not
        asked either: it may still map that MAC to the destroyed guest's address."""
        stale = False
        for source_name, source in ADDRESS_SOURCES:
            if stale and source == libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP:
                continue
            try:
                asking = f"get the {source_name} addresses of guest {name}"
                with self.connection.calling(conn, asking):
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

    def note_leases_before_start(
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
            with self.connection.calling(conn, f"note the leases of guest {name}"):
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
            with self.connection.calling(conn, f"read the metadata of guest {name}"):
                text = dom.metadata(
                    libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                    STALE_LEASES_URI,
                    libvirt.VIR_DOMAIN_AFFECT_CURRENT,
                )
        except TransientError:
            raise
        except MonitorError as e:
            if not has_code(e.__cause__, libvirt.VIR_ERR_NO_DOMAIN_METADATA):
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
        with self.connection.calling(conn, f"read the interfaces of guest {name}"):
            devices = ET.fromstring(dom.XMLDesc(0)).find("devices")
        macs_by_network: dict[str, set[str]] = {}
        interfaces = [] if devices is None else devices.findall("interface[@type='network']")
        for interface in interfaces:
            source, mac_element = interface.find("source"), interface.find("mac")
            if source is not None and mac_element is not None and source.get("network"):
                macs = macs_by_network.setdefault(source.get("network", ""), set())
                macs.add(mac_element.get("address", "").lower())
        leases: set[tuple[str, str, int]] = set()
        for network_name, macs in sorted(macs_by_network.items()):
            with self.connection.calling(conn, f"read the DHCP leases of network {network_name}"):
                found = conn.networkLookupByName(network_name).DHCPLeases(None, 0)
            for lease in found:
                mac = str(lease.get("mac", "")).lower()
                if mac in macs and lease.get("type") == libvirt.VIR_IP_ADDR_TYPE_IPV4:
                    leases.add((mac, str(lease.get("ipaddr")), int(lease.get("expirytime", 0))))
        return leases


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
