"""The real libvirtd the e2e tests and benchmarks share (started by tests/libvirtd.sh): its
URI, pool and network, a QEMU guest that need not boot, and clean-up that survives libvirtd
being restarted by another test."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from monitor.errors import TransientError
from monitor.hypervisor.libvirt_hypervisor import LibvirtHypervisor

URI = "qemu:///system"
POOL = "monitor-test"
NETWORK = "monitor-test"
BRIDGE_IP = "192.168.151.1"  # tests/libvirtd.sh; guests reach the monitor and stand-in here
SUBNET = ipaddress.IPv4Network("192.168.151.0/24")
LIBVIRTD_PID = Path("/run/libvirtd.pid")

QEMU_GUEST_XML = """\
<domain type='qemu'>
  <name>{profile}.init</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <features><acpi/><apic/></features>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/dev/null'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='network'><source network='monitor-test'/><model type='virtio'/></interface>
    <graphics type='vnc' listen='127.0.0.1' autoport='yes'/>
    <video><model type='vga'/></video>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def remove_guests(hypervisor: LibvirtHypervisor, prefix: str) -> list[str]:
    """Destroy every guest and volume named `prefix`...; return what is still there."""
    for guest in hypervisor.list_guests(prefix):
        hypervisor.destroy_guest(guest.name)
    for volume in hypervisor.list_volumes(prefix):
        hypervisor.destroy_guest(volume.removesuffix(".qcow2"))
    return [g.name for g in hypervisor.list_guests(prefix)] + hypervisor.list_volumes(prefix)


def retry_transient(action: Callable[[], Any], timeout: float = 90) -> Any:
    """`action()`, again while libvirt's connection is lost (another test may hold libvirtd
    stopped for 20 s; the hypervisor reconnects by itself)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return action()
        except TransientError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
