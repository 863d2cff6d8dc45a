"""`LibvirtHypervisor`: the `Hypervisor` role on libvirt-python, the object `main` builds.

A facade over the package's parts: one `Connection` (opened lazily, re-opened after it is
lost), the `StoragePool` holding runner disks and base images, and the `Guests` (domains) on
them. Every libvirt failure leaves it as a `MonitorError` (status 503), or a `TransientError`
when the connection itself was lost. Thread-safe; see `Hypervisor` for who calls it.
"""

from __future__ import annotations

from pathlib import Path

import libvirt

from monitor.hypervisor import Guest
from monitor.hypervisor.connection import OPEN_TIMEOUT
from monitor.hypervisor.connection import Connection
from monitor.hypervisor.guests import Guests
from monitor.hypervisor.preflight import DEFAULT_POOL_NAME
from monitor.hypervisor.preflight import HostPreflight
from monitor.hypervisor.storage import StoragePool
from monitor.preflight import Check


class LibvirtHypervisor:
    """`Hypervisor` on the libvirt at `uri` (None: libvirt's default URI), with runner disks
    and base images as volumes in `storage_pool`. A call that finds no connection waits at
    most `open_timeout` seconds for one (`TransientError` after that)."""

    def __init__(
        self,
        uri: str | None,
        storage_pool: str = DEFAULT_POOL_NAME,
        *,
        create_default_pool: bool = False,
        open_timeout: float = OPEN_TIMEOUT,
    ) -> None:
        self.connection = Connection(uri, open_timeout)
        # Every call of the parts goes through `_connection`, so a subclass can wrap the
        # connection they use (the fault-injection tests make its methods fail).
        self.storage = StoragePool(self.connection, self._connection, storage_pool)
        self.guests = Guests(self.connection, self._connection, self.storage)
        # `create_default_pool`: the config names no pool, so a missing `default` is made.
        self.preflight = HostPreflight(
            self.connection,
            self._connection,
            self.storage,
            create_default_pool=create_default_pool and storage_pool == DEFAULT_POOL_NAME,
        )

    @property
    def errors(self) -> int:
        """libvirt calls that failed so far (/metrics)."""
        return self.connection.errors

    def list_guests(self, prefix: str) -> list[Guest]:
        """Return every guest (defined or running) whose name starts with `prefix`."""
        return self.guests.list_guests(prefix)

    def create_guest(
        self, name: str, template_xml: str, base_image: Path, guest_token: str | None = None
    ) -> None:
        """Define runner guest `name` on an overlay of `base_image` (`Guests.create_guest`)."""
        self.guests.create_guest(name, template_xml, base_image, guest_token)

    def start_guest(self, name: str) -> None:
        """Start a defined guest."""
        self.guests.start_guest(name)

    def destroy_guest(self, name: str) -> None:
        """Stop and undefine guest `name` and delete its volume `<name>.qcow2`. Idempotent."""
        self.guests.destroy_guest(name)

    def list_volumes(self, prefix: str) -> list[str]:
        """Names of the runner disks (`<prefix>...qcow2`) in the pool, refreshed first, sorted."""
        return self.storage.list_volumes(prefix)

    def volume_names(self) -> list[str]:
        """Names of all the volumes in the runner storage pool, sorted (for leak checks)."""
        return self.storage.volume_names()

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
        """Create base-image volume `volume` and define rebuild guest `name` writing into it
        (`Guests.create_image_guest`); return the volume's path."""
        return self.guests.create_image_guest(
            name, template_xml, volume, size, source, seed_iso, guest_token
        )

    def guest_state(self, name: str) -> str | None:
        """Return "running", "shutoff", "paused" or "other"; None when there is no such guest."""
        return self.guests.guest_state(name)

    def remove_image_guest(self, name: str) -> None:
        """Stop and undefine rebuild guest `name`, keeping its volume. Idempotent."""
        self.guests.remove_image_guest(name)

    def volume_path(self, volume: str) -> Path | None:
        """Return the path of `volume` in the storage pool, or None if there is none."""
        return self.storage.volume_path(volume)

    def list_image_volumes(self, prefix: str) -> list[str]:
        """Names of the volumes in the pool (refreshed first) starting with `prefix`, sorted."""
        return self.storage.list_image_volumes(prefix)

    def delete_volume(self, volume: str) -> None:
        """Delete `volume` from the pool, refusing (409) one that backs another volume."""
        self.storage.delete_volume(volume)

    def screenshot_raw(self, name: str) -> bytes:
        """Return the running guest's screen as libvirt produced it (PNG or PPM)."""
        return self.guests.screenshot_raw(name)

    def screenshot_png(self, name: str) -> bytes:
        """Return a PNG of the running guest's screen."""
        return self.guests.screenshot_png(name)

    def ipv4_address(self, name: str) -> str | None:
        """Return the guest's IPv4 address, or None while it has none."""
        return self.guests.ipv4_address(name)

    def creation_blocker(self, template_xml: str, base_image: Path | None) -> Check | None:
        """What makes creating a runner of this profile impossible now (`HostPreflight`)."""
        return self.preflight.creation_blocker(template_xml, base_image)

    def close(self) -> None:
        """Close the connection (and give up an open in progress); the next call opens a new
        one."""
        self.connection.close()

    def _connection(self) -> libvirt.virConnect:
        """The libvirt connection every call uses, opened if need be (`Connection.get`)."""
        return self.connection.get()
