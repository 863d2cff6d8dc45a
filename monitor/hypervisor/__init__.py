"""The hypervisor role: what the monitor asks of the machine its runner guests live on.

`Hypervisor` is the one Protocol every other module types a hypervisor with; `Guest` and the
constants here are what callers and tests share with the implementation. This module imports
no libvirt, so the role can be imported (and faked) without the binding. The libvirt
implementation is `monitor.hypervisor.libvirt_hypervisor.LibvirtHypervisor`, built from:

- `domain_xml`: the XML documents libvirt is given (pure, no libvirt);
- `connection`: the shared connection, its event loop thread and libvirt error handling;
- `storage`: the storage pool's volumes (runner overlays and base-image volumes);
- `guests` and `addresses`: the domains, and the addresses their DHCP leases report.

Only this package imports libvirt; nothing in it imports the loop, models or web layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from monitor.preflight import Check

# How a guest finds its token (see `domain_xml.runner_domain_xml`): an SMBIOS OEM string, and,
# for a guest whose kernel libvirt loads directly, a kernel command line word.
GUEST_TOKEN_OEM_PREFIX = "monitor-guest-token="
GUEST_TOKEN_CMDLINE_PREFIX = "monitor.guest_token="

# Transient `dir` pools opened over a source image's directory, for the time of one copy.
SOURCE_POOL_PREFIX = "monitor-source-"

# The daemon thread that runs libvirt's event loop (one per process).
EVENT_LOOP_THREAD_NAME = "libvirt-event-loop"


@dataclass(frozen=True)
class Guest:
    """A guest (a libvirt domain) as the loop sees it."""

    name: str
    active: bool


class Hypervisor(Protocol):
    """The guest and volume operations the monitor needs.

    Every method may raise `MonitorError`, or `TransientError` when the hypervisor cannot be
    reached. Implementations are thread-safe: the monitor thread, its worker and rebuild
    pools, the scheduler's screenshot job and web threads all call them.
    """

    @property
    def errors(self) -> int:
        """How many hypervisor calls have failed so far (for /metrics)."""
        ...

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

    def creation_blocker(self, template_xml: str, base_image: Path | None) -> Check | None:
        """What makes creating a runner from this domain XML and base image impossible now
        (no storage pool, no `qemu-img`, XML this libvirt refuses, a missing network or base
        image), as a FAIL `Check` with its fix; None when nothing does. `TransientError`
        when libvirt cannot be reached (that says nothing about the profile)."""
        ...

    def close(self) -> None:
        """Release the hypervisor connection; a later call opens a new one."""
        ...
