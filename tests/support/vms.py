"""Real runner VMs (docs/e2e.md): `monitor run` on the libvirt bridge address with the
monitor thread, the scheduler's jobs and the web app, the GitHub stand-in, and tiny guests
built by tests/guest/build.sh that boot the way upstream's runners do. A sampler thread records
every runner's statuses as the monitor's observations show them."""

from __future__ import annotations

import io
import ipaddress
import logging
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

from PIL import Image

from monitor import config as config_module
from monitor import models
from monitor import scheduler as scheduler_module
from monitor import web
from monitor.serving import BackgroundServer
from monitor.standin import GitHubStandIn
from tests.support import served
from tests.support.configs import set_settings
from tests.support.configs import write_config
from tests.support.constants import API_TOKEN
from tests.support.constants import GITHUB_TOKEN
from tests.support.constants import REPO
from tests.support.constants import ROOT
from tests.support.libvirtd import BRIDGE_IP
from tests.support.libvirtd import NETWORK
from tests.support.libvirtd import POOL
from tests.support.libvirtd import URI
from tests.support.libvirtd import remove_guests
from tests.support.libvirtd import retry_transient
from tests.support.served import Reply
from tests.support.served import request

log = logging.getLogger(__name__)

GUEST_SOURCES = ROOT / "tests" / "guest"
# Generous: a guest boots in 3-6 s under TCG, a job takes JOB_SECONDS; waits end early.
JOB_SECONDS = 6
CREATING = "(being created)"
DESTROYING = "(being destroyed)"
# Fewer free addresses in the network's DHCP range than this, and a test module is skipped
# (failed with MONITOR_REQUIRE_LIBVIRTD=1): its guests could not all get a lease.
MIN_FREE_ADDRESSES = 10

# The tiny guest, as a profile's complete domain XML. TCG ('qemu'): KVM hangs on these
# machines. The disk is required by runner_domain_xml (it becomes the runner's overlay, or a
# rebuild guest's new image); the runner boot script never looks at it, the rebuild tests'
# does (/dev/vda). No option ROM: the kernel is loaded directly, iPXE is not needed.
GUEST_XML = """\
<domain type='qemu'>
  <name>e2e.template</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=tty0 panic=-1 loglevel=4 {ports}</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <on_reboot>destroy</on_reboot>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/dev/null'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='network'>
      {mac}<source network='{network}'/>
      <model type='virtio'/>
      <rom enabled='no'/>
    </interface>
    <graphics type='vnc' listen='127.0.0.1' autoport='yes'/>
    <video><model type='vga'/></video>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def free_addresses(connection) -> int:
    """Addresses of the network's DHCP range that no live lease holds."""
    network = connection.networkLookupByName(NETWORK)
    dhcp_range = ET.fromstring(network.XMLDesc()).find("ip/dhcp/range")
    first, last = (ipaddress.IPv4Address(dhcp_range.get(end)) for end in ("start", "end"))
    leased = {ipaddress.IPv4Address(lease["ipaddr"]) for lease in network.DHCPLeases()}
    return int(last) - int(first) + 1 - sum(1 for a in leased if first <= a <= last)


def guest_xml(image: dict[str, Path], ports: str, mac: str | None = None) -> str:
    return GUEST_XML.format(
        kernel=image["kernel"],
        initrd=image["initrd"],
        ports=ports,
        mac=f"<mac address='{mac}'/>" if mac else "",
        network=NETWORK,
    )


def call(
    port: int, method: str, path: str, headers: dict[str, str] | None = None, timeout: float = 30
) -> Reply:
    """One request to the monitor on the bridge address, as a guest or the host makes it."""
    return request(port, method, path, headers, timeout, host=BRIDGE_IP)


@dataclass
class StatusLog:
    """Every runner's statuses in the order the monitor's observations showed them (repeats
    dropped), sampled from a thread every 50 ms, and when each was first seen.

    A runner that a worker is creating or destroying and that lacks its guest or its
    registration is recorded as CREATING or DESTROYING, not as its status: the monitor's
    statuses do not tell those moments apart from real ones. A new runner's guest may be
    listed before GitHub's runner list has its JIT registration (DoneOrUnregistered for a
    moment), and a runner whose guest was just undefined, before the worker reports, reads
    as StartedOrCrashed (spec §4.4's precedence for a runner with no guest yet). Harmless:
    a runner in flight is never destroyed or counted as missing."""

    history: dict[int, list[str]] = field(default_factory=dict)
    seen_at: dict[tuple[int, str], float] = field(default_factory=dict)
    gone: set[int] = field(default_factory=set)

    def record(self, observation: Any) -> None:
        present = set()
        for runner in observation.runners if observation is not None else []:
            present.add(runner.id)
            statuses = self.history.setdefault(runner.id, [])
            status = runner.status.value
            if runner.in_flight and (runner.guest_name is None or runner.registration is None):
                status = CREATING if set(statuses) <= {CREATING} else DESTROYING
            if not statuses or statuses[-1] != status:
                statuses.append(status)
                self.seen_at.setdefault((runner.id, status), time.monotonic())
        self.gone |= set(self.history) - present


@dataclass
class Rig(served.Rig):
    """A served rig on the bridge address, with the statuses sampled and the test's own
    guest-name prefix."""

    statuses: StatusLog
    prefix: str

    def runners(self, status: str | None = None) -> list[Any]:
        observation = self.monitor.observation
        runners = observation.runners if observation is not None else []
        return [r for r in runners if status is None or r.status.value == status]

    def idle_and_sampled(self) -> list[Any]:
        """The Idle runners, once the status log has caught up with them too."""
        idle = self.runners("Idle")
        return [r for r in idle if "Idle" in self.statuses.history.get(r.id, [])]

    def guest_names(self) -> list[str]:
        return [guest.name for guest in self.hypervisor.list_guests(self.prefix)]


@contextmanager
def running_rig(
    tmp_path: Path,
    guest_image: dict[str, Path],
    *,
    targets: dict[str, int],
    boot_scripts: dict[str, str],
    profiles: str = "",
    settings: dict[str, str] | None = None,
) -> Iterator[Rig]:
    """`monitor run` on the bridge address: the monitor thread, the scheduler's jobs and the
    web app. Its profiles are `targets` (as write_config makes them, on a prebuilt base
    image) and the `[profiles.<key>]` tables in `profiles`; each one's guest.xml is the tiny
    guest and its boot-script `boot_scripts[key]`. `settings` replace (or add) top-level
    values of the config. Everything it started is gone after."""
    standin = GitHubStandIn(token=GITHUB_TOKEN)
    # On every address: the guests' agents reach it on the bridge, the monitor on loopback
    # (check-config allows GitHub over plain http only to a loopback address).
    standin_port = standin.start(host="0.0.0.0").rsplit(":", 1)[1]
    standin.agent_job_seconds = JOB_SECONDS
    # Guest and volume names of this test only: libvirtd is shared with other tests.
    prefix = f"e2e{uuid.uuid4().hex[:6]}"
    extra = (
        f'libvirt_runner_guest_prefix = "{prefix}-runner"\n'
        f'libvirt_rebuild_guest_prefix = "{prefix}-rebuild"\n'
        f'libvirt_template_guest_prefix = "{prefix}-template"\n'
        # The host asks for other guests' JIT configs in X-Real-IP (test b).
        f'trusted_proxies = ["{BRIDGE_IP}/32"]\n'
    )
    path = write_config(
        tmp_path,
        github_api_url=f"http://127.0.0.1:{standin_port}",
        targets=targets,
        libvirt_uri=URI,
        storage_pool=POOL,
        extra=extra,
    )
    # GitHub's runner list every second, so that each status lasts long enough to be seen.
    set_settings(path, {"api_cache_timeout": "1", **(settings or {})})
    path.write_text(path.read_text() + profiles)
    config = config_module.load(path, environ={})
    _, hypervisor, monitor = served.monitor_for(config)
    http = BackgroundServer(web.make_app(config, monitor), host=BRIDGE_IP, name="monitor-e2e-vms")
    # Guests learn both ports from their kernel command line.
    ports = f"monitor_port={http.port} standin_port={standin_port}"
    for key, profile in config.profiles.items():
        profile.config_dir.mkdir(parents=True, exist_ok=True)
        profile.guest_xml.write_text(guest_xml(guest_image, ports))
        (profile.config_dir / "boot-script").write_text(boot_scripts[key])

    statuses = StatusLog()
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.05):
            statuses.record(monitor.observation)

    sampler = threading.Thread(target=sample, name="e2e-status-sampler", daemon=True)
    sampler.start()
    monitor.start()
    scheduler = scheduler_module.make_scheduler(monitor)
    scheduler.start()
    built = Rig(config, standin, hypervisor, monitor, http, statuses, prefix)
    try:
        yield built
    finally:
        # Shown only when the test failed: what the guests and the stand-in's agents said.
        for boot_log in sorted((config.data_path / "runners").glob("*/boot.log")):
            text = boot_log.read_text(errors="replace")
            log.warning("boot log of runner %s:\n%s", boot_log.parent.name, text[-3000:])
        log.warning("agent calls: %s", standin.agent_calls)
        log.warning("statuses: %s", statuses.history)
        events = reversed(models.recent_events(100))
        log.warning("events: %s", [f"{e.kind}: {e.message}" for e in events])
        scheduler.shutdown(wait=True)
        http.close()
        monitor.stop()
        sampling.set()
        sampler.join(5)
        try:
            # The monitor leaves its guests running when it stops; the test does not.
            left = retry_transient(lambda: remove_guests(hypervisor, prefix))
        finally:
            hypervisor.close()
            models.close_store()
            standin.stop()
        assert left == [], f"left behind in libvirt: {left}"


def take(rig: Rig, profile: str = "linux") -> int:
    query = f"unique_id={uuid.uuid4()}&qualified_repo={REPO}&run_id=1"
    reply = call(
        rig.port,
        "POST",
        f"/profile/{profile}/take?{query}",
        {"Authorization": f"Bearer {API_TOKEN}"},
    )
    assert reply.status == 200, reply.body
    (entry,) = reply.json
    return entry["id"]


def booted(history: list[str]) -> bool:
    """Whether a runner's statuses start as a new one's must: created, then StartedOrCrashed
    while its guest boots, then Idle once its agent is online."""
    without_create = history[1:] if history[:1] == [CREATING] else history
    return without_create[:2] == ["StartedOrCrashed", "Idle"]


def full_width_rows(png: bytes) -> int:
    """Pixel rows of the screen lit across at least 95 % of its width: the guest's bar of
    U+2588 FULL BLOCKs (tests/guest/init); text and the BIOS banner never come close."""
    with Image.open(io.BytesIO(png)) as image:
        gray = image.convert("L")
        width, height = gray.size
        pixels = gray.load()
        return sum(
            1 for y in range(height) if sum(pixels[x, y] > 64 for x in range(width)) >= 0.95 * width
        )
