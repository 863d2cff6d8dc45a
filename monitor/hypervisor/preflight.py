"""Live checks of the libvirt side of a host, before any runner is made: libvirt answers, the
storage pool is there and libvirt can write qcow2 overlays into it, `qemu-img` is installed,
and each profile's domain XML is one this host's libvirt accepts, on networks that exist.

`HostPreflight` runs on whichever thread calls it: the CLI's (`monitor check-config --host`),
or the monitor's worker pool, where `creation_blocker` decides whether a profile can create
runners at all. It changes nothing it does not undo: a throwaway domain is defined and
undefined again, a 1 MiB probe volume created and deleted; only `ensure_pool` makes something
lasting, the `default` pool a fresh libvirtd lacks.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import libvirt

from monitor.errors import MonitorError
from monitor.hypervisor.connection import Connection
from monitor.hypervisor.connection import has_code
from monitor.hypervisor.domain_xml import dir_pool_xml
from monitor.hypervisor.domain_xml import probe_volume_xml
from monitor.hypervisor.domain_xml import runner_domain_xml
from monitor.hypervisor.domain_xml import sniff_image
from monitor.hypervisor.domain_xml import template_networks
from monitor.hypervisor.storage import StoragePool
from monitor.preflight import Check
from monitor.preflight import Status

log = logging.getLogger(__name__)

# Where virt-manager puts the `default` pool, and so where a sysadmin expects images.
DEFAULT_POOL_NAME = "default"
DEFAULT_POOL_DIR = "/var/lib/libvirt/images"
# Names of what the checks make and remove again; they start with no runner, rebuild or
# template prefix, so the loop never takes them for its own.
PROBE_PREFIX = "monitor-preflight-"
QEMU_IMG_FIX = "install qemu-img: apt-get install qemu-utils (Debian's package for it)"
# libvirt's codes for "this host will not take that document": a guest.xml refused with one
# of these stays refused until someone changes it or the host. Any other failure (a lost
# connection, a daemon error) may pass, so it is raised, not reported as the profile's fault.
_REFUSED_CODES = (
    libvirt.VIR_ERR_CONFIG_UNSUPPORTED,
    libvirt.VIR_ERR_XML_ERROR,
    libvirt.VIR_ERR_XML_DETAIL,
    libvirt.VIR_ERR_XML_INVALID_SCHEMA,
    libvirt.VIR_ERR_INVALID_ARG,
    libvirt.VIR_ERR_NO_SUPPORT,
    libvirt.VIR_ERR_OPERATION_UNSUPPORTED,
)
# And for "libvirt cannot write a qcow2 volume there": no qemu-img, a directory it may not
# write, a full disk.
_CANNOT_WRITE_CODES = (
    libvirt.VIR_ERR_NO_SUPPORT,
    libvirt.VIR_ERR_OPERATION_FAILED,
    libvirt.VIR_ERR_OPERATION_UNSUPPORTED,
    libvirt.VIR_ERR_SYSTEM_ERROR,
    libvirt.VIR_ERR_INTERNAL_ERROR,
)


def libvirt_version(number: int) -> str:
    """libvirt's packed version number (major * 1,000,000 + minor * 1,000 + micro) as text."""
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"


class HostPreflight:
    """The checks, on the connection and storage pool of a `LibvirtHypervisor`.

    `create_default_pool`: the config names no pool, so a missing `default` pool is one the
    monitor makes itself (`ensure_pool`) rather than a failure. `which` finds a program on
    PATH (replaceable so a test can take `qemu-img` away).
    """

    def __init__(
        self,
        connection: Connection,
        connect: Callable[[], libvirt.virConnect],
        storage: StoragePool,
        *,
        create_default_pool: bool,
        which: Callable[[str], str | None] = shutil.which,
    ) -> None:
        self.connection = connection
        self._connect = connect
        self.storage = storage
        self.create_default_pool = create_default_pool
        self.which = which

    # What the loop asks --------------------------------------------------------------------

    def creation_blocker(self, template_xml: str, base_image: Path | None) -> Check | None:
        """The first thing that makes creating a runner of this profile impossible now, as a
        FAIL `Check` with its fix; None when nothing does. Creates the `default` pool first
        where that is ours to do. A lost libvirt connection raises `TransientError`: that is
        not the profile's fault."""
        if self.create_default_pool:
            self.ensure_pool()
        checks = [*self.storage_pool_checks(), self.qemu_img_check()]
        checks += self.profile_checks("profile", template_xml, base_image)
        return next((check for check in checks if check.status is Status.FAIL), None)

    def ensure_pool(self) -> bool:
        """Define, build, start and autostart a `dir` pool `default` at `DEFAULT_POOL_DIR` if
        there is none (as virt-manager does on a new host); start it if it is defined but
        not running. Only for a config without `libvirt_storage_pool`. Returns whether it
        changed anything."""
        conn = self._connect()
        name = self.storage.name
        pool = self._find_pool(conn)
        if pool is None:
            with self.connection.calling(conn, f"define storage pool {name}"):
                pool = conn.storagePoolDefineXML(dir_pool_xml(name, DEFAULT_POOL_DIR), 0)
                pool.build(0)
                pool.setAutostart(1)
            log.warning(
                "libvirt had no storage pool %r: defined a dir pool %r at %s, started at boot "
                "(set libvirt_storage_pool to use another pool)",
                name,
                name,
                DEFAULT_POOL_DIR,
            )
        with self.connection.calling(conn, f"start storage pool {name}"):
            if pool.isActive():
                return pool is None
            pool.create(0)
        log.warning("started libvirt storage pool %r", name)
        return True

    def missing_pool(self) -> str | None:
        """None when the storage pool exists (running or not); else what libvirt has instead,
        for the start-up error that names the config key."""
        conn = self._connect()
        if self._find_pool(conn) is not None:
            return None
        return f"libvirt has no storage pool {self.storage.name!r} (pools: {self._pools(conn)})"

    # What `monitor check-config --host` prints ---------------------------------------------

    def libvirt_check(self) -> Check:
        conn = self._connect()
        with self.connection.calling(conn, "read libvirt's version"):
            library = libvirt_version(conn.getLibVersion())
            driver = conn.getType()
            uri = conn.getURI()
            hypervisor = conn.getVersion()
        return Check.ok("libvirt", f"{library} at {uri} ({driver} {libvirt_version(hypervisor)})")

    def storage_pool_checks(self) -> list[Check]:
        """The pool exists and runs; libvirt can create (and delete) a qcow2 volume in it."""
        subject = f"storage pool {self.storage.name}"
        conn = self._connect()
        pool = self._find_pool(conn)
        if pool is None:
            return [self._missing_pool(subject, conn)]
        with self.connection.calling(conn, f"read storage pool {self.storage.name}"):
            active = pool.isActive()
            target = ET.fromstring(pool.XMLDesc(0)).findtext("target/path") or "?"
        if not active:
            name = self.storage.name
            return [
                Check.fail(
                    subject,
                    f"defined (target {target}) but not running",
                    f"virsh pool-start {name} && virsh pool-autostart {name}",
                )
            ]
        probe = f"{PROBE_PREFIX}{uuid.uuid4().hex[:8]}.qcow2"
        try:
            with self.connection.calling(conn, f"create a qcow2 volume in {self.storage.name}"):
                volume = pool.createXML(probe_volume_xml(probe), 0)
        except MonitorError as e:
            if not has_code(e.__cause__, *_CANNOT_WRITE_CODES):
                raise
            cause = str(e.__cause__)
            fix = (
                QEMU_IMG_FIX + ", then restart libvirtd"
                if "qemu-img" in cause
                else f"make {target} writable by libvirtd, or use another pool"
            )
            return [Check.fail(subject, f"libvirt cannot create a qcow2 volume: {cause}", fix)]
        try:
            with self.connection.calling(conn, f"delete probe volume {probe}"):
                volume.delete(0)
        except MonitorError as e:
            return [
                Check.warn(
                    subject,
                    f"created a probe volume but could not delete it: {e}",
                    f"virsh vol-delete --pool {self.storage.name} {probe}",
                )
            ]
        return [Check.ok(subject, f"running, target {target}, libvirt writes qcow2 volumes")]

    def qemu_img_check(self) -> Check:
        """`qemu-img`, which libvirt runs to make every runner's qcow2 overlay. Only
        meaningful for QEMU on this machine; other drivers and remote hosts are skipped."""
        conn = self._connect()
        with self.connection.calling(conn, "read libvirt's driver"):
            driver = conn.getType()
            uri = conn.getURI()
        if driver != "QEMU" or urlsplit(uri).hostname not in (None, "", "localhost"):
            return Check.ok("qemu-img", f"not needed here ({driver} at {uri})")
        found = self.which("qemu-img")
        if found is None:
            return Check.fail(
                "qemu-img", "not found on PATH; libvirt needs it for qcow2 disks", QEMU_IMG_FIX
            )
        return Check.ok("qemu-img", found)

    def profile_checks(
        self, subject: str, template_xml: str, base_image: Path | None
    ) -> list[Check]:
        """The profile's domain XML is accepted by this libvirt (defined under a throwaway
        name with the changes a runner gets, then undefined; nothing started), its networks
        exist and run, and its base image (if it has a prebuilt one) is readable."""
        checks = [self._definable(subject, template_xml, base_image)]
        checks += self._networks(subject, template_xml)
        if base_image is not None:
            checks.append(self._base_image(subject, base_image))
        return checks

    # Parts ----------------------------------------------------------------------------------

    def _missing_pool(self, subject: str, conn: libvirt.virConnect) -> Check:
        name = self.storage.name
        if self.create_default_pool:
            return Check.warn(
                subject,
                f"libvirt has no pool {name!r}; `monitor run` will define a dir pool "
                f"{name!r} at {DEFAULT_POOL_DIR}",
                "nothing, or set libvirt_storage_pool to the pool to use",
            )
        return Check.fail(
            subject,
            f"libvirt has no pool {name!r} (named by libvirt_storage_pool; pools: "
            f"{self._pools(conn)})",
            self.missing_pool_fix(),
        )

    def missing_pool_fix(self) -> str:
        """What to do about a pool that `libvirt_storage_pool` names and libvirt lacks."""
        name = self.storage.name
        return (
            f"virsh pool-define-as {name} dir --target {DEFAULT_POOL_DIR}/{name} && "
            f"virsh pool-build {name} && virsh pool-start {name} && "
            f"virsh pool-autostart {name}, or set libvirt_storage_pool to an existing pool, "
            f"or leave it out to use {DEFAULT_POOL_NAME!r}"
        )

    def _find_pool(self, conn: libvirt.virConnect) -> libvirt.virStoragePool | None:
        """The storage pool, running or not; None when libvirt has none of that name."""
        try:
            with self.connection.calling(conn, f"look up storage pool {self.storage.name}"):
                return conn.storagePoolLookupByName(self.storage.name)
        except MonitorError as e:
            if has_code(e.__cause__, libvirt.VIR_ERR_NO_STORAGE_POOL):
                return None
            raise

    def _pools(self, conn: libvirt.virConnect) -> str:
        with self.connection.calling(conn, "list storage pools"):
            names = sorted(pool.name() for pool in conn.listAllStoragePools(0))
        return ", ".join(names) if names else "none"

    def _definable(self, subject: str, template_xml: str, base_image: Path | None) -> Check:
        conn = self._connect()
        name = f"{PROBE_PREFIX}{uuid.uuid4().hex[:8]}"
        disk = os.path.abspath(base_image) if base_image is not None else "/dev/null"
        try:
            xml = runner_domain_xml(template_xml, name, disk)
        except MonitorError as e:
            return Check.fail(subject, f"guest.xml: {e}", "fix the profile's guest.xml")
        try:
            with self.connection.calling(conn, "define the profile's guest.xml"):
                domain = conn.defineXML(xml)
        except MonitorError as e:
            if not has_code(e.__cause__, *_REFUSED_CODES):
                raise
            return Check.fail(
                subject,
                f"libvirt refuses its guest.xml: {e.__cause__}",
                "change the profile's guest.xml to what this host supports "
                "(virsh domcapabilities lists it), or move the profile to a host that has it",
            )
        try:
            with self.connection.calling(conn, f"undefine throwaway guest {name}"):
                domain.undefine()
        except MonitorError as e:
            return Check.warn(subject, f"guest.xml accepted, but {e}", f"virsh undefine {name}")
        return Check.ok(subject, "libvirt accepts its guest.xml")

    def _networks(self, subject: str, template_xml: str) -> list[Check]:
        conn = self._connect()
        checks = []
        for network in template_networks(template_xml):
            try:
                with self.connection.calling(conn, f"look up network {network}"):
                    active = conn.networkLookupByName(network).isActive()
            except MonitorError as e:
                if not has_code(e.__cause__, libvirt.VIR_ERR_NO_NETWORK):
                    raise
                checks.append(
                    Check.fail(
                        subject,
                        f"its network {network!r} does not exist",
                        f"virsh net-define <{network}.xml> && virsh net-start {network} && "
                        f"virsh net-autostart {network} (upstream's is cinet.xml)",
                    )
                )
                continue
            if not active:
                checks.append(
                    Check.fail(
                        subject,
                        f"its network {network!r} is not running",
                        f"virsh net-start {network} && virsh net-autostart {network}",
                    )
                )
            else:
                checks.append(Check.ok(subject, f"network {network} is running"))
        return checks

    def _base_image(self, subject: str, base_image: Path) -> Check:
        try:
            image_format, size = sniff_image(base_image)
        except MonitorError as e:
            return Check.fail(subject, str(e), f"put the profile's base image at {base_image}")
        return Check.ok(subject, f"base image {base_image}: {image_format}, {size} bytes")
