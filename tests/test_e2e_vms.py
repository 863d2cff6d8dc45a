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
import io
import ipaddress
import json
import logging
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

libvirt = pytest.importorskip("libvirt")

from PIL import Image  # noqa: E402
from PIL import ImageStat  # noqa: E402

from monitor import models  # noqa: E402
from monitor.hypervisor import GUEST_TOKEN_OEM_PREFIX  # noqa: E402
from monitor.hypervisor.libvirt_hypervisor import LibvirtHypervisor  # noqa: E402
from tests.support.libvirtd import NETWORK  # noqa: E402
from tests.support.libvirtd import POOL  # noqa: E402
from tests.support.libvirtd import SUBNET  # noqa: E402
from tests.support.libvirtd import URI  # noqa: E402
from tests.support.libvirtd import retry_transient  # noqa: E402
from tests.support.vms import DESTROYING  # noqa: E402
from tests.support.vms import GUEST_SOURCES  # noqa: E402
from tests.support.vms import Rig  # noqa: E402
from tests.support.vms import booted  # noqa: E402
from tests.support.vms import call  # noqa: E402
from tests.support.vms import full_width_rows  # noqa: E402
from tests.support.vms import guest_xml  # noqa: E402
from tests.support.vms import running_rig  # noqa: E402
from tests.support.vms import take  # noqa: E402
from tests.support.waiting import wait_until  # noqa: E402

pytestmark = pytest.mark.libvirtd
log = logging.getLogger(__name__)


@pytest.fixture
def rig(tmp_path: Path, conn, guest_image) -> Iterator[Rig]:
    """`monitor run` on the bridge address with one profile of tiny runner guests."""
    boot_script = (GUEST_SOURCES / "boot-script").read_text()
    with running_rig(
        tmp_path, guest_image, targets={"linux": 2}, boot_scripts={"linux": boot_script}
    ) as built:
        yield built


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

    # The guests uploaded their boot logs up to asking for the JIT config; the dashboard links
    # to them. After that the token is spent: the job's code could use it, and the monitor
    # takes no more (410), so the guest stops sending.
    def boot_log(runner_id: int) -> str:
        reply = call(rig.port, "GET", f"/runner/{runner_id}/boot.log")
        return reply.body.decode(errors="replace") if reply.status == 200 else ""

    asking = "boot-script: sending the boot log, then asking for the JIT config"
    wait_until(lambda: asking in boot_log(a.id), "runner a's boot log")
    log_a = boot_log(a.id)
    assert "Linux version" in log_a  # the kernel's messages start it
    assert f"monitor-guest: booted {ip_a}" in log_a
    assert "monitor-guest: guest token from an SMBIOS OEM string" in log_a
    assert "got a JIT config" not in log_a and "agent:" not in log_a
    spent = call(rig.port, "POST", "/boot-log", {"Authorization": f"Bearer {token_a}"})
    assert spent.status == 410
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
    # Nothing the guest printed after it asked for its JIT config reached its log.
    assert boot_log(taken) == log_a

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
