"""Runner guests and rebuild guests as libvirt domains: listing, defining (with their disk
volume), starting, stopping and undefining them, their state and their screens.

A runner guest is a domain cloned from its profile's complete domain XML (the upstream
`guest.xml`) plus a qcow2 overlay volume, named `<guest>.qcow2`, in the storage pool, backed by
the profile's base image. This replaces upstream's copy + `virt-clone` (spec §7.5) and `virsh
destroy` + `undefine --storage` (§7.6). A rebuild guest's first disk is a base-image volume
itself, which outlives the guest.

`Guests` is thread-safe: the monitor thread's workers create and destroy, the rebuild pool
makes rebuild guests, the scheduler's screenshot job takes screenshots, web threads ask for
addresses.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import libvirt

from monitor.errors import MonitorError
from monitor.errors import TransientError
from monitor.hypervisor import Guest
from monitor.hypervisor.addresses import GuestAddresses
from monitor.hypervisor.connection import Connection
from monitor.hypervisor.connection import has_code
from monitor.hypervisor.connection import is_no_domain
from monitor.hypervisor.domain_xml import image_guest_domain_xml
from monitor.hypervisor.domain_xml import overlay_volume_xml
from monitor.hypervisor.domain_xml import runner_domain_xml
from monitor.hypervisor.storage import StoragePool
from monitor.screenshots import to_png

log = logging.getLogger(__name__)

# libvirt's domain states as `guest_state` reports them; any other state is "other".
_GUEST_STATES = {
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "running",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
}


class Guests:
    """The domains, with their disks in `storage`.

    `connect` returns the libvirt connection to call (see `LibvirtHypervisor._connection`);
    `connection` turns the errors of those calls into `MonitorError`s.
    """

    def __init__(
        self,
        connection: Connection,
        connect: Callable[[], libvirt.virConnect],
        storage: StoragePool,
    ) -> None:
        self.connection = connection
        self._connect = connect
        self.storage = storage
        self.addresses = GuestAddresses(connection)

    def list_guests(self, prefix: str) -> list[Guest]:
        """Return every guest (defined or running) whose name starts with `prefix`."""
        conn = self._connect()
        with self.connection.calling(conn, "list guests"):
            domains = conn.listAllDomains(0)
        guests = []
        for dom in domains:
            try:
                with self.connection.calling(conn, "list guests"):
                    name = dom.name()
                    if name.startswith(prefix):
                        guests.append(Guest(name, bool(dom.isActive())))
            except MonitorError as e:
                if not is_no_domain(e.__cause__):
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
        conn = self._connect()
        if self._lookup(conn, name) is not None:
            raise MonitorError(f"cannot create guest {name}: it already exists", status=409)
        pool = self.storage.lookup(conn)
        base = os.path.abspath(base_image)
        base_format, capacity = self.storage.base_image_info(conn, base)
        volume_xml = overlay_volume_xml(f"{name}.qcow2", capacity, base, base_format)

        volume = self.storage.create_runner_volume(conn, pool, name, volume_xml)
        try:
            with self.connection.calling(conn, f"define guest {name}"):
                domain_xml = runner_domain_xml(
                    template_xml, name, volume.path(), guest_token=guest_token
                )
                conn.defineXML(domain_xml)
        except BaseException:
            try:
                self.storage.delete_guest_volume(conn, volume, name)
            except MonitorError as cleanup:
                log.warning("guest %s: cannot delete its new volume: %s", name, cleanup)
            raise
        log.info("defined guest %s on %s (%s)", name, base, base_format)

    def start_guest(self, name: str) -> None:
        """Start a defined guest, first noting the DHCP leases its MACs already have (see
        `monitor.hypervisor.addresses`)."""
        conn = self._connect()
        dom = self._domain(conn, name)
        self.addresses.note_leases_before_start(conn, dom, name)
        with self.connection.calling(conn, f"start guest {name}"):
            dom.create()

    def destroy_guest(self, name: str) -> None:
        """Stop and undefine guest `name`, then delete its volume `<name>.qcow2`.

        Idempotent: a missing domain, a stopped one, or a missing volume is fine. Only the
        runner's own volume is deleted; base images are shared and never touched.
        """
        conn = self._connect()
        dom = self._lookup(conn, name)
        if dom is not None:
            self._stop_and_undefine(conn, dom, name)
        self.storage.delete_runner_volume(conn, self.storage.lookup(conn), name)

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

        conn = self._connect()
        if self._lookup(conn, name) is not None:
            raise MonitorError(f"cannot create guest {name}: it already exists", 409)
        pool = self.storage.lookup(conn)
        self.storage.refresh(conn, pool)
        if self.storage.find_volume(conn, pool, volume) is not None:
            raise MonitorError(f"cannot create image volume {volume}: it already exists", 409)

        image = self.storage.create_image_volume(conn, pool, volume, size, source_path)
        try:
            with self.connection.calling(conn, f"grow image volume {volume} to {size} bytes"):
                if image.info()[1] < size:  # qemu-img convert keeps the source's size
                    image.resize(size, 0)
                path = image.path()
            with self.connection.calling(conn, f"define guest {name}"):
                conn.defineXML(
                    image_guest_domain_xml(template_xml, name, path, seed, guest_token)
                )
        except BaseException:
            self.storage.delete_new_volume(conn, image, volume)
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
        conn = self._connect()
        dom = self._lookup(conn, name)
        if dom is None:
            return None
        try:
            with self.connection.calling(conn, f"get the state of guest {name}"):
                state = dom.state(0)[0]
        except MonitorError as e:
            if is_no_domain(e.__cause__):
                return None  # undefined meanwhile
            raise
        return _GUEST_STATES.get(state, "other")

    def remove_image_guest(self, name: str) -> None:
        """Stop (if running) and undefine rebuild guest `name`, with its NVRAM but without
        any storage: its disk is the base-image volume, the product of the rebuild, and
        `delete_volume` removes it when that is wanted. Idempotent."""
        conn = self._connect()
        dom = self._lookup(conn, name)
        if dom is not None:
            self._stop_and_undefine(conn, dom, name)

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
        """Return the guest's first usable IPv4 address, or None (see
        `GuestAddresses.ipv4_address`)."""
        conn = self._connect()
        return self.addresses.ipv4_address(conn, self._domain(conn, name), name)

    def _screenshot(self, name: str) -> tuple[str, bytes]:
        """(MIME type, bytes) of the running guest's screen, as libvirt streams it."""
        conn = self._connect()
        dom = self._domain(conn, name)
        with self.connection.calling(conn, f"take a screenshot of guest {name}"):
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

    def _lookup(self, conn: libvirt.virConnect, name: str) -> libvirt.virDomain | None:
        try:
            with self.connection.calling(conn, f"look up guest {name}"):
                return conn.lookupByName(name)
        except MonitorError as e:
            if is_no_domain(e.__cause__):
                return None
            raise

    def _domain(self, conn: libvirt.virConnect, name: str) -> libvirt.virDomain:
        dom = self._lookup(conn, name)
        if dom is None:
            raise MonitorError(f"guest {name} does not exist", status=404)
        return dom

    def _stop_and_undefine(
        self, conn: libvirt.virConnect, dom: libvirt.virDomain, name: str
    ) -> None:
        gone_or_stopped = (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID)
        try:
            with self.connection.calling(conn, f"stop guest {name}"):
                if dom.isActive():
                    dom.destroy()
        except MonitorError as e:
            if not has_code(e.__cause__, *gone_or_stopped):
                raise
        flags = (
            libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
            | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        )
        for with_flags in (True, False):
            try:
                with self.connection.calling(conn, f"undefine guest {name}"):
                    if with_flags:
                        dom.undefineFlags(flags)
                    else:
                        dom.undefine()
                log.info("destroyed guest %s", name)
                return
            except TransientError:
                raise
            except MonitorError as e:
                if is_no_domain(e.__cause__):
                    return
                if not with_flags:
                    raise
                # Drivers without NVRAM or snapshot support reject the flags.
                log.debug("%s; retrying without flags", e)


def _abort_quietly(stream: libvirt.virStream) -> None:
    try:
        stream.abort()
    except libvirt.libvirtError:
        pass


def _collect(_stream: libvirt.virStream, data: bytes, chunks: list[bytes]) -> int:
    chunks.append(data)
    return 0
