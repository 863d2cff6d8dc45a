"""The storage pool that holds the runners' disks and the base images: runner overlay volumes
(`<guest>.qcow2`, backed by a base image), and base-image volumes made by rebuilds, empty or
copied from a source image by libvirt.

Only this package imports this module; `StoragePool` is used by `guests` and by the
`LibvirtHypervisor` facade, from any thread.
"""

from __future__ import annotations

import logging
import os
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import libvirt

from monitor.errors import MonitorError
from monitor.errors import TransientError
from monitor.hypervisor import SOURCE_POOL_PREFIX
from monitor.hypervisor.connection import Connection
from monitor.hypervisor.connection import close_quietly
from monitor.hypervisor.connection import has_code
from monitor.hypervisor.connection import is_busy_pool
from monitor.hypervisor.domain_xml import dir_pool_xml
from monitor.hypervisor.domain_xml import image_volume_xml
from monitor.hypervisor.domain_xml import sniff_image

log = logging.getLogger(__name__)


class StoragePool:
    """The libvirt storage pool `name`: its runner and base-image volumes.

    `connect` returns the libvirt connection to call (see `LibvirtHypervisor._connection`);
    `connection` turns the errors of those calls into `MonitorError`s.
    """

    def __init__(
        self, connection: Connection, connect: Callable[[], libvirt.virConnect], name: str
    ) -> None:
        self.connection = connection
        self._connect = connect
        self.name = name

    def volume_names(self) -> list[str]:
        """Names of all the volumes in the pool (refreshed first), sorted."""
        conn = self._connect()
        pool = self.lookup(conn)
        self.refresh(conn, pool)
        with self.connection.calling(conn, f"list volumes of {self.name}"):
            return sorted(pool.listVolumes())

    def list_volumes(self, prefix: str) -> list[str]:
        """Names of the volumes in the pool (refreshed first) that start with `prefix` and
        end with `.qcow2`, sorted: runner disks, with or without a guest."""
        return [n for n in self.volume_names() if n.startswith(prefix) and n.endswith(".qcow2")]

    def list_image_volumes(self, prefix: str) -> list[str]:
        """Names of the volumes in the storage pool (refreshed first) that start with
        `prefix`, whatever their suffix, sorted."""
        return [n for n in self.volume_names() if n.startswith(prefix)]

    def volume_path(self, volume: str) -> Path | None:
        """Return the path of `volume` in the storage pool, or None if the pool has no such
        volume (as libvirt knows it: no refresh, so this is cheap)."""
        conn = self._connect()
        pool = self.lookup(conn)
        found = self.find_volume(conn, pool, volume)
        if found is None:
            return None
        with self.connection.calling(conn, f"get the path of volume {volume}"):
            return Path(found.path())

    def delete_volume(self, volume: str) -> None:
        """Delete `volume` from the storage pool; one that is gone already is fine.

        Refused (409, nothing deleted) while `volume` is the backing file of another volume
        in the pool, as every runner overlay is of its base image: deleting it would break
        those runners' disks. The check reads each volume's `<backingStore><path>` after a
        pool refresh; the caller (the monitor thread) must not create overlays on `volume`
        meanwhile.
        """
        conn = self._connect()
        pool = self.lookup(conn)
        self.refresh(conn, pool)
        found = self.find_volume(conn, pool, volume)
        if found is None:
            return
        with self.connection.calling(conn, f"get the path of volume {volume}"):
            path = os.path.normpath(found.path())
        users = self._volumes_backed_by(conn, pool, path)
        if users:
            shown = ", ".join(users[:5]) + (f" and {len(users) - 5} more" if len(users) > 5 else "")
            raise MonitorError(
                f"cannot delete volume {volume}: it is the backing file of {shown}", 409
            )
        try:
            with self.connection.calling(conn, f"delete volume {volume}"):
                found.delete(0)
        except MonitorError as e:
            if not has_code(e.__cause__, libvirt.VIR_ERR_NO_STORAGE_VOL):
                raise
            return
        log.info("deleted volume %s", volume)

    def lookup(self, conn: libvirt.virConnect) -> libvirt.virStoragePool:
        """The pool on `conn`; a pool that is missing or inactive is a 503 naming it."""
        try:
            with self.connection.calling(conn, f"look up storage pool {self.name}"):
                pool = conn.storagePoolLookupByName(self.name)
                active = pool.isActive()
        except MonitorError as e:
            if not has_code(e.__cause__, libvirt.VIR_ERR_NO_STORAGE_POOL):
                raise
            raise MonitorError(
                f"libvirt storage pool {self.name!r} does not exist; create it or set "
                "the libvirt_storage_pool config key to an existing pool",
                status=503,
            ) from e
        if not active:
            raise MonitorError(f"libvirt storage pool {self.name!r} is not active", 503)
        return pool

    def refresh(self, conn: libvirt.virConnect, pool: libvirt.virStoragePool) -> None:
        """Refresh the pool, so that files made or removed behind libvirt's back count.

        libvirt refuses while a volume is being built in the pool ("has asynchronous jobs
        running"), and a base-image copy takes as long as `qemu-img convert` does; then the
        volumes libvirt knows are used as they are, rather than failing every listing.
        """
        try:
            with self.connection.calling(conn, f"refresh storage pool {pool.name()}"):
                pool.refresh(0)
        except TransientError:
            raise
        except MonitorError as e:
            if not is_busy_pool(e.__cause__):
                raise
            log.debug("%s; using the volumes libvirt knows", e)

    def find_volume(
        self, conn: libvirt.virConnect, pool: libvirt.virStoragePool, volume: str
    ) -> libvirt.virStorageVol | None:
        """Volume `volume` of `pool`, or None if libvirt knows no such volume."""
        try:
            with self.connection.calling(conn, f"look up volume {volume}"):
                return pool.storageVolLookupByName(volume)
        except MonitorError as e:
            if has_code(e.__cause__, libvirt.VIR_ERR_NO_STORAGE_VOL):
                return None
            raise

    def base_image_info(self, conn: libvirt.virConnect, base: str) -> tuple[str, int]:
        """Return (format, virtual size) of the base image: from its volume if some pool has
        it, else from the file (qcow2 header, or raw with the file's size)."""
        try:
            with self.connection.calling(conn, f"look up base image {base}"):
                volume = conn.storageVolLookupByPath(base)
                fmt = ET.fromstring(volume.XMLDesc(0)).find("target/format")
                capacity = volume.info()[1]
            if fmt is not None and fmt.get("type"):
                return fmt.get("type", "raw"), capacity
        except MonitorError as e:
            if not has_code(e.__cause__, libvirt.VIR_ERR_NO_STORAGE_VOL):
                raise
        return sniff_image(Path(base))

    def create_runner_volume(
        self,
        conn: libvirt.virConnect,
        pool: libvirt.virStoragePool,
        name: str,
        volume_xml: str,
    ) -> libvirt.virStorageVol:
        """Create runner guest `name`'s volume `<name>.qcow2` from `volume_xml`, deleting a
        left-over volume of that name first (also one the pool did not know yet)."""
        volume_name = f"{name}.qcow2"
        for attempt in range(2):
            try:
                with self.connection.calling(conn, f"look up the volume of guest {name}"):
                    old = pool.storageVolLookupByName(volume_name)
                log.warning("deleting left-over volume %s", volume_name)
                self.delete_guest_volume(conn, old, name)
            except MonitorError as e:
                if not has_code(e.__cause__, libvirt.VIR_ERR_NO_STORAGE_VOL):
                    raise
            try:
                with self.connection.calling(conn, f"create the volume of guest {name}"):
                    return pool.createXML(volume_xml, 0)
            except MonitorError as e:
                # A file the pool does not know yet ("volume target path ... already
                # exists"): refresh the pool so the next round finds and deletes it.
                if attempt or not has_code(e.__cause__, libvirt.VIR_ERR_OPERATION_INVALID):
                    raise
                with self.connection.calling(conn, f"refresh storage pool {self.name}"):
                    pool.refresh(0)
        raise AssertionError("unreachable")

    def delete_runner_volume(
        self, conn: libvirt.virConnect, pool: libvirt.virStoragePool, name: str
    ) -> None:
        """Delete runner guest `name`'s volume `<name>.qcow2`; one that is gone is fine."""
        try:
            with self.connection.calling(conn, f"look up the volume of guest {name}"):
                volume = pool.storageVolLookupByName(f"{name}.qcow2")
        except MonitorError as e:
            if not has_code(e.__cause__, libvirt.VIR_ERR_NO_STORAGE_VOL):
                raise
            return
        self.delete_guest_volume(conn, volume, name)

    def delete_guest_volume(
        self, conn: libvirt.virConnect, volume: libvirt.virStorageVol, name: str
    ) -> None:
        """Delete `volume`, guest `name`'s own disk; one that is gone already is fine."""
        try:
            with self.connection.calling(conn, f"delete the volume of guest {name}"):
                volume.delete(0)
        except MonitorError as e:
            if not has_code(e.__cause__, libvirt.VIR_ERR_NO_STORAGE_VOL):
                raise

    def create_image_volume(
        self,
        conn: libvirt.virConnect,
        pool: libvirt.virStoragePool,
        volume: str,
        size: int,
        source: str | None,
    ) -> libvirt.virStorageVol:
        """Create base-image volume `volume` in `pool`: an empty qcow2 disk of `size` bytes,
        or, from `source`, a copy of that image file (see `_copy_into_new_volume`) that may
        still be smaller than `size`."""
        volume_xml = image_volume_xml(volume, size)
        if source is None:
            with self.connection.calling(conn, f"create image volume {volume}"):
                return pool.createXML(volume_xml, 0)
        return self._copy_into_new_volume(conn, pool, volume_xml, volume, size, source)

    def delete_new_volume(
        self, conn: libvirt.virConnect, volume: libvirt.virStorageVol, name: str
    ) -> None:
        """Undo a volume this call created, logging (not raising) when that fails."""
        try:
            with self.connection.calling(conn, f"delete the new image volume {name}"):
                volume.delete(0)
        except MonitorError as e:
            if not has_code(e.__cause__, libvirt.VIR_ERR_NO_STORAGE_VOL):
                log.warning("%s", e)

    def _volumes_backed_by(
        self, conn: libvirt.virConnect, pool: libvirt.virStoragePool, path: str
    ) -> list[str]:
        """Names of the pool's volumes whose backing file is `path`, sorted."""
        with self.connection.calling(conn, f"list volumes of {self.name}"):
            volumes = pool.listAllVolumes(0)
        users = []
        for other in volumes:
            try:
                with self.connection.calling(conn, f"read volume {other.name()}"):
                    backing = ET.fromstring(other.XMLDesc(0)).findtext("backingStore/path")
            except MonitorError as e:
                if has_code(e.__cause__, libvirt.VIR_ERR_NO_STORAGE_VOL):
                    continue  # deleted meanwhile
                raise
            if backing and os.path.normpath(backing) == path:
                users.append(other.name())
        return sorted(users)

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
        copier = self.connection.open_another(conn, "a copy")
        try:
            copy_pool = pool if copier is conn else self.lookup(copier)
            with self._source_volume(copier, source) as original:
                with self.connection.calling(copier, f"read source image {source}"):
                    capacity = original.info()[1]
                if capacity > size:
                    raise MonitorError(
                        f"cannot create image volume {volume}: source image {source} is "
                        f"{capacity} bytes, more than the image size of {size} bytes",
                        400,
                    )
                copying = f"copy {source} into image volume {volume}"
                with self.connection.calling(copier, copying):
                    copy = copy_pool.createXMLFrom(volume_xml, original, 0)
            if copier is conn:
                return copy
            try:
                with self.connection.calling(conn, f"look up the new image volume {volume}"):
                    return pool.storageVolLookupByName(volume)
            except BaseException:
                self.delete_new_volume(copier, copy, volume)
                raise
        finally:
            if copier is not conn:
                close_quietly(copier)

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
            with self.connection.calling(conn, f"look up source image {source}"):
                found = conn.storageVolLookupByPath(source)
        except MonitorError as e:
            if not has_code(e.__cause__, libvirt.VIR_ERR_NO_STORAGE_VOL):
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
            pool_xml = dir_pool_xml(f"{SOURCE_POOL_PREFIX}{uuid.uuid4().hex[:12]}", directory)
            opening = f"open the directory of source image {source} as a pool"
            with self.connection.calling(conn, opening):
                transient = holder = conn.storagePoolCreateXML(pool_xml, 0)
        else:
            self.refresh(conn, holder)
        try:
            try:
                with self.connection.calling(conn, f"look up source image {source}"):
                    found = holder.storageVolLookupByName(filename)
            except MonitorError as e:
                if not has_code(e.__cause__, libvirt.VIR_ERR_NO_STORAGE_VOL):
                    raise
                raise MonitorError(
                    f"libvirt does not see source image {source} as a disk image", 404
                ) from e
            yield found
        finally:
            if transient is not None:
                try:
                    destroying = f"destroy transient storage pool for {source}"
                    with self.connection.calling(conn, destroying):
                        transient.destroy()
                except MonitorError as e:
                    log.warning("%s", e)

    def _active_dir_pool(
        self, conn: libvirt.virConnect, directory: str
    ) -> libvirt.virStoragePool | None:
        """The active pool whose target is `directory`, if any: libvirt refuses a second
        `dir` pool on the same directory."""
        wanted = os.path.normpath(directory)
        with self.connection.calling(conn, "list storage pools"):
            for pool in conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE):
                path = ET.fromstring(pool.XMLDesc(0)).findtext("target/path")
                if path and os.path.normpath(path) == wanted:
                    return pool
        return None
