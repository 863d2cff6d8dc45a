"""Real runner VMs end to end: the monitor, its scheduler and its web app, a real libvirtd +
QEMU (TCG) on the `monitor-test` network, the GitHub stand-in, and tiny guests that boot the
way upstream's runners do (docs/e2e.md):

    DHCP lease -> GET /boot from the monitor on the bridge address -> the boot script ->
    GET /github-jitconfig -> the runner agent (tests/guest/agent.sh) tells the stand-in it is
    online -> takes the job it was reserved for -> finishes it -> powers off.

No fakes: every guest is a QEMU process, every address comes from dnsmasq's leases, every
request crosses the bridge. Needs root, `bash tests/libvirtd.sh` (pool and network
`monitor-test`) and Debian's package lists (the guest's kernel comes from apt). Skipped when
libvirtd is not reachable, unless MONITOR_REQUIRE_LIBVIRTD=1 makes that a failure.
"""

from __future__ import annotations

import base64
import http.client
import io
import ipaddress
import json
import logging
import os
import re
import subprocess
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import pytest

libvirt = pytest.importorskip("libvirt")

from PIL import Image  # noqa: E402
from PIL import ImageStat  # noqa: E402

from monitor import config as config_module  # noqa: E402
from monitor import loop  # noqa: E402
from monitor import models  # noqa: E402
from monitor import scheduler as scheduler_module  # noqa: E402
from monitor import web  # noqa: E402
from monitor.errors import TransientError  # noqa: E402
from monitor.github import RestGitHub  # noqa: E402
from monitor.hypervisor import GUEST_TOKEN_OEM_PREFIX  # noqa: E402
from monitor.hypervisor.libvirt_hypervisor import LibvirtHypervisor  # noqa: E402
from monitor.serving import BackgroundServer  # noqa: E402
from monitor.standin import GitHubStandIn  # noqa: E402
from tests import conftest  # noqa: E402
from tests.conftest import API_TOKEN  # noqa: E402
from tests.conftest import GITHUB_TOKEN  # noqa: E402
from tests.conftest import require_libvirtd  # noqa: E402
from tests.conftest import set_settings  # noqa: E402
from tests.conftest import write_config  # noqa: E402

pytestmark = pytest.mark.libvirtd
log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
GUEST_SOURCES = ROOT / "tests" / "guest"
URI = "qemu:///system"
POOL = "monitor-test"
NETWORK = "monitor-test"
BRIDGE_IP = "192.168.151.1"  # tests/libvirtd.sh; guests reach the monitor and stand-in here
SUBNET = ipaddress.IPv4Network("192.168.151.0/24")
REPO = "test/servo"  # write_config allows the prefix "test/"
# Generous: a guest boots in 3-6 s under TCG, a job takes JOB_SECONDS; waits end early.
WAIT = 30.0
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


@pytest.fixture(scope="module")
def conn():
    """A connection of the test's own, to look at libvirtd from outside the monitor."""
    try:
        connection = libvirt.open(URI)
    except libvirt.libvirtError as e:
        require_libvirtd(f"cannot connect to {URI}: {e}")
    try:
        if not connection.storagePoolLookupByName(POOL).isActive():
            require_libvirtd(f"storage pool {POOL} is not active")
        if not connection.networkLookupByName(NETWORK).isActive():
            require_libvirtd(f"network {NETWORK} is not active")
    except libvirt.libvirtError as e:
        require_libvirtd(f"no pool or network {POOL}: {e}")
    free = free_addresses(connection)
    if free < MIN_FREE_ADDRESSES:
        # Each guest gets a fresh MAC, and dnsmasq keeps its lease for the lease time after
        # it is gone (an hour on a network made by an older tests/libvirtd.sh): runs in
        # quick succession use the range up, and guests then boot to no address (a timeout
        # that says nothing about the cause).
        require_libvirtd(
            f"only {free} addresses of network {NETWORK}'s DHCP range are free (a lease "
            "outlives its guest)",
            "wait for some to expire, or run `bash tests/libvirtd.sh` again",
        )
    yield connection
    connection.close()


def free_addresses(connection) -> int:
    """Addresses of the network's DHCP range that no live lease holds."""
    network = connection.networkLookupByName(NETWORK)
    dhcp_range = ET.fromstring(network.XMLDesc()).find("ip/dhcp/range")
    first, last = (ipaddress.IPv4Address(dhcp_range.get(end)) for end in ("start", "end"))
    leased = {ipaddress.IPv4Address(lease["ipaddr"]) for lease in network.DHCPLeases()}
    return int(last) - int(first) + 1 - sum(1 for a in leased if first <= a <= last)


@pytest.fixture(scope="module")
def guest_image(conn) -> dict[str, Path]:
    """The kernel and initramfs from tests/guest/build.sh (cached between runs)."""
    work = Path(os.environ.get("MONITOR_GUEST_DIR", "/var/tmp/monitor-guest"))
    started = time.monotonic()
    result = subprocess.run(
        ["bash", str(GUEST_SOURCES / "build.sh"), str(work)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    log.warning("guest image ready in %.2f s: %s", time.monotonic() - started, result.stderr)
    return {"kernel": work / "vmlinuz", "initrd": work / "initrd.gz"}


def guest_xml(image: dict[str, Path], ports: str, mac: str | None = None) -> str:
    return GUEST_XML.format(
        kernel=image["kernel"],
        initrd=image["initrd"],
        ports=ports,
        mac=f"<mac address='{mac}'/>" if mac else "",
        network=NETWORK,
    )


# HTTP ----------------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


def call(
    port: int, method: str, path: str, headers: dict[str, str] | None = None, timeout: float = 30
) -> Reply:
    """One request to the monitor on the bridge address, as a guest or the host makes it."""
    connection = http.client.HTTPConnection(BRIDGE_IP, port, timeout=timeout)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        found = {name.lower(): value for name, value in response.getheaders()}
        return Reply(response.status, found, response.read())
    finally:
        connection.close()


# The rig -------------------------------------------------------------------------------------


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
class Rig:
    config: Any
    standin: GitHubStandIn
    hypervisor: LibvirtHypervisor
    monitor: loop.Monitor
    http: BackgroundServer
    statuses: StatusLog
    prefix: str

    @property
    def port(self) -> int:
        return self.http.port

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


def wait_until(condition: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    return conftest.wait_until(condition, what, timeout, interval=0.1)


@pytest.fixture
def rig(tmp_path: Path, conn, guest_image) -> Iterator[Rig]:
    """`monitor run` on the bridge address with one profile of tiny runner guests."""
    boot_script = (GUEST_SOURCES / "boot-script").read_text()
    with running_rig(
        tmp_path, guest_image, targets={"linux": 2}, boot_scripts={"linux": boot_script}
    ) as built:
        yield built


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
    standin.start(host=BRIDGE_IP)
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
        github_api_url=standin.base_url,
        targets=targets,
        libvirt_uri=URI,
        storage_pool=POOL,
        extra=extra,
    )
    # GitHub's runner list every second, so that each status lasts long enough to be seen.
    set_settings(path, {"api_cache_timeout": "1", **(settings or {})})
    path.write_text(path.read_text() + profiles)
    config = config_module.load(path, environ={})
    models.open_store(config.data_path)
    github = RestGitHub(config.github_api_url, config.github_api_scope, config.github_token)
    hypervisor = LibvirtHypervisor(config.libvirt_uri, config.libvirt_storage_pool)
    monitor = loop.Monitor(config, github, hypervisor)
    http = BackgroundServer(web.make_app(config, monitor), host=BRIDGE_IP, name="monitor-e2e-vms")
    # Guests learn both ports from their kernel command line.
    ports = f"monitor_port={http.port} standin_port={standin.base_url.rsplit(':', 1)[1]}"
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


def lease_of(conn, guest_name: str) -> str | None:
    """The address dnsmasq leased to the guest's MAC, read from libvirt by the test itself."""
    mac = ET.fromstring(conn.lookupByName(guest_name).XMLDesc()).find("devices/interface/mac")
    leases = conn.networkLookupByName(NETWORK).DHCPLeases(mac.get("address"))
    return leases[0]["ipaddr"] if leases else None


def agent_id(jit_config: str) -> int:
    """The runner id a JIT config names (as GitHub's runner reads it from `.runner`)."""
    files = json.loads(base64.b64decode(jit_config))
    return int(json.loads(base64.b64decode(files[".runner"]))["AgentId"])


def online_from(rig: Rig, registration_id: int) -> str | None:
    """The address the runner's agent connected from (the stand-in saw it)."""
    calls = [c for c in rig.standin.agent_calls if c.runner_id == registration_id]
    return next((c.address for c in calls if c.call == "online"), None)


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


# The tests -----------------------------------------------------------------------------------


def test_runner_lifecycle_on_real_vms(rig: Rig, conn):
    timings: dict[str, float] = {}
    started = time.monotonic()
    # Hold GitHub's job queue: the taken runner stays Reserved until released below.
    rig.standin.hold_jobs = True

    # Two guests boot: DHCP, /boot, the boot script, /github-jitconfig, the agent online.
    first_two = wait_until(lambda: len(idle := rig.idle_and_sampled()) == 2 and idle, "Idle")
    timings["two guests booted to Idle"] = time.monotonic() - started
    for runner in first_two:
        assert booted(rig.statuses.history[runner.id])
        # The monitor found each guest by its DHCP lease, the same one libvirt's network has.
        address = address_of(rig, runner.guest_name)
        assert ipaddress.IPv4Address(address) in SUBNET
        assert address == lease_of(conn, runner.guest_name)
        # ...and it is the address the guest itself came from: the agent that brought this
        # registration online ran in this guest, with the JIT config it was served.
        assert online_from(rig, runner.registration.id) == address
        assert agent_id(models.get_runner(runner.id).jit_config) == runner.registration.id

    # Each guest read its own token from the SMBIOS OEM string libvirt gave it and fetched its
    # own JIT config with it, once: the token is spent now, and an address is no key at all.
    a, b = first_two
    ip_a, ip_b = address_of(rig, a.guest_name), address_of(rig, b.guest_name)
    jit_a, jit_b = (models.get_runner(r.id).jit_config for r in (a, b))
    assert jit_a != jit_b
    token_a, token_b = (guest_token(conn, r.guest_name) for r in (a, b))
    assert token_a != token_b
    for token in (token_a, token_b):
        again = call(rig.port, "GET", "/github-jitconfig", {"Authorization": f"Bearer {token}"})
        assert again.status == 410 and b"already been served" in again.body
    as_b = call(rig.port, "GET", "/github-jitconfig", {"X-Real-IP": ip_b})  # the host: trusted
    assert as_b.status == 401
    forged = call(rig.port, "GET", "/boot", {"Authorization": "Bearer forged"})
    assert forged.status == 403

    # A screenshot of a real guest: QEMU's VGA text console, showing the guest's marker bar.
    shot = call(rig.port, "GET", f"/runner/{a.id}/screenshot/now")
    assert shot.status == 200 and shot.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(shot.body)) as image:
        assert image.format == "PNG" and image.size[0] >= 640 and image.size[1] >= 350
        assert max(ImageStat.Stat(image.convert("L")).stddev) > 10  # not a blank screen
    assert full_width_rows(shot.body) >= 8  # one text row of the bar is 16 pixels high

    # The guests uploaded their boot logs; the dashboard links to them.
    def boot_log(runner_id: int) -> str:
        reply = call(rig.port, "GET", f"/runner/{runner_id}/boot.log")
        return reply.body.decode(errors="replace") if reply.status == 200 else ""

    wait_until(lambda: "is online" in boot_log(a.id), "runner a's boot log")
    log_a = boot_log(a.id)
    assert "Linux version" in log_a  # the kernel's messages start it
    assert f"monitor-guest: booted {ip_a}" in log_a
    assert "monitor-guest: guest token from an SMBIOS OEM string" in log_a
    assert "boot-script: got a JIT config" in log_a
    page = call(rig.port, "GET", "/dashboard.html").body.decode()
    assert f'href="/runner/{a.id}/boot.log"' in page

    # A take reserves the lowest idle runner; its agent gets the job once GitHub lets it go.
    taken = take(rig)
    assert taken == a.id
    wait_until(lambda: "Reserved" in rig.statuses.history[taken], "Reserved")
    rig.standin.hold_jobs = False
    wait_until(lambda: "Busy" in rig.statuses.history[taken], "Busy")
    timings["take to Busy"] = time.monotonic() - rig.statuses.seen_at[(taken, "Reserved")]

    # The job ends: the agent finishes it (the ephemeral registration goes) and powers off;
    # the monitor destroys the guest and boots a replacement, which comes online too.
    wait_until(lambda: taken in rig.statuses.gone, "the taken runner to be destroyed")
    assert a.registration.id not in {r["id"] for r in rig.standin.runners()}
    assert a.guest_name not in rig.guest_names()
    assert f"{a.guest_name}.qcow2" not in rig.hypervisor.list_volumes(rig.prefix)
    history = rig.statuses.history[taken]
    assert booted(history)
    after = history[history.index("Idle") :]
    assert after[:3] == ["Idle", "Reserved", "Busy"], history
    assert set(after[3:]) <= {"DoneOrUnregistered", DESTROYING}, history
    assert [c.call for c in rig.standin.agent_calls if c.runner_id == a.registration.id] == [
        "online",
        "job",
        "finish",
    ]
    # The guest sent the end of its log before finishing the job (it powers off after).
    assert re.search(r"agent: job \d+ done", boot_log(taken)), boot_log(taken)[-500:]

    replaced = time.monotonic()
    (replacement,) = wait_until(
        lambda: [r for r in rig.idle_and_sampled() if r.id not in (a.id, b.id)], "a replacement"
    )
    timings["replacement booted to Idle"] = time.monotonic() - replaced
    assert booted(rig.statuses.history[replacement.id])
    address = address_of(rig, replacement.guest_name)
    assert address == lease_of(conn, replacement.guest_name)
    assert online_from(rig, replacement.registration.id) == address
    assert sorted(r.id for r in rig.runners("Idle")) == sorted([b.id, replacement.id])
    timings["whole lifecycle"] = time.monotonic() - started
    log.warning("e2e VM timings: %s", {k: round(v, 2) for k, v in timings.items()})


def test_address_only_mode_on_real_vms(tmp_path: Path, conn, guest_image):
    """Upstream's mode (`guest_auth = "address"`, for images that send no token): a guest is
    known by its DHCP lease, and the host (a trusted proxy) may ask for it in X-Real-IP."""
    boot_script = (GUEST_SOURCES / "boot-script").read_text()
    with running_rig(
        tmp_path,
        guest_image,
        targets={"linux": 1},
        boot_scripts={"linux": boot_script},
        settings={"guest_auth": '"address"'},
    ) as rig:
        (runner,) = wait_until(lambda: rig.idle_and_sampled(), "Idle")
        address = address_of(rig, runner.guest_name)
        assert online_from(rig, runner.registration.id) == address
        jit = models.get_runner(runner.id).jit_config
        assert guest_token(conn, runner.guest_name) is None
        as_guest = call(rig.port, "GET", "/github-jitconfig", {"X-Real-IP": address})
        assert as_guest.status == 200 and as_guest.json == jit  # served again: upstream's way
        # .254: on the bridge's subnet, outside its DHCP range (tests/libvirtd.sh): nobody's.
        nobody = call(rig.port, "GET", "/github-jitconfig", {"X-Real-IP": "192.168.151.254"})
        assert nobody.status == 503 and b"192.168.151.254" in nobody.body
        from_host = call(rig.port, "GET", "/github-jitconfig")  # the bridge address: no guest
        assert from_host.status == 503
        log_text = wait_until(
            lambda: (r := call(rig.port, "GET", f"/runner/{runner.id}/boot.log")).status == 200
            and b"is online" in r.body
            and r.body.decode(errors="replace"),
            "the boot log",
        )
        assert "monitor-guest: no guest token" in log_text


def address_of(rig: Rig, guest_name: str) -> str:
    """The guest's address as the monitor knows it. A guest that shows its token may be Idle
    before the monitor's periodic look at addresses (every 5 s) has found it."""
    guests = rig.monitor.guests
    return wait_until(lambda: guests.addresses.get(guest_name), f"{guest_name}'s address")


def guest_token(conn, guest_name: str) -> str | None:
    """The token the monitor gave a guest (its SMBIOS OEM string), as root can read it."""
    root = ET.fromstring(conn.lookupByName(guest_name).XMLDesc(0))
    for entry in root.findall("sysinfo[@type='smbios']/oemStrings/entry"):
        if (entry.text or "").startswith(GUEST_TOKEN_OEM_PREFIX):
            return entry.text.removeprefix(GUEST_TOKEN_OEM_PREFIX)
    return None


def test_stale_lease_of_a_destroyed_guest_is_not_taken_as_live(conn, guest_image):
    """dnsmasq keeps a lease for an hour after its guest is gone, and libvirt reports it for
    any new guest with the same MAC at once. The adapter must not: the monitor would take a
    guest that has not even booted for one that has an address."""
    hypervisor = LibvirtHypervisor(URI, POOL)
    name = f"e2e{uuid.uuid4().hex[:6]}-stale"
    mac = "52:54:00:e2:" + ":".join(f"{byte:02x}" for byte in uuid.uuid4().bytes[:2])
    booting = guest_xml(guest_image, "monitor_port=9", mac).replace("e2e.template", name)
    # Defined here, not by create_guest (which gives every guest a fresh MAC): no disk.
    root = ET.fromstring(booting)
    root.find("devices").remove(root.find("devices/disk"))
    booting = ET.tostring(root, encoding="unicode")
    for element in ("os/kernel", "os/initrd", "os/cmdline"):
        root.find("os").remove(root.find(element))
    ET.SubElement(root.find("os"), "boot", dev="hd")  # no disk: SeaBIOS finds nothing to boot
    not_booting = ET.tostring(root, encoding="unicode")
    try:
        # 1. A guest boots and gets a lease for the MAC; then it is destroyed.
        conn.defineXML(booting)
        hypervisor.start_guest(name)
        old_address = wait_until(lambda: hypervisor.ipv4_address(name), "the first lease")
        hypervisor.destroy_guest(name)

        # 2. A guest with the same MAC that never boots, let alone asks for a lease.
        conn.defineXML(not_booting)
        hypervisor.start_guest(name)
        domain = conn.lookupByName(name)
        # What libvirt reports for it: the dead guest's lease (that is the trap)...
        reported = domain.interfaceAddresses(libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE)
        assert [a["addr"] for i in reported.values() for a in i["addrs"]] == [old_address]
        # ...and what the adapter reports: nothing, however long it is asked.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            assert hypervisor.ipv4_address(name) is None
            time.sleep(0.5)
        hypervisor.destroy_guest(name)

        # 3. The same MAC booting again gets a new lease (dnsmasq renews the same address),
        #    and that one is believed.
        conn.defineXML(booting)
        hypervisor.start_guest(name)
        assert wait_until(lambda: hypervisor.ipv4_address(name), "the new lease") == old_address
    finally:
        retry_transient(lambda: hypervisor.destroy_guest(name))
        hypervisor.close()
