"""Per-guest single-use tokens (the default `guest_auth = "token"`): how the token reaches the
guest (domain XML), that a JIT config is served once even to racing requests, and the guest
routes with the hand-written fakes of tests/fakes.py. On libvirt's test driver:
test_api_e2e.py; on real QEMU guests that read it from SMBIOS: test_e2e_vms.py."""

from __future__ import annotations

import hashlib
import threading
import xml.etree.ElementTree as ET
from datetime import UTC
from datetime import datetime

import pytest

from monitor import models
from monitor.hypervisor import GUEST_TOKEN_CMDLINE_PREFIX
from monitor.hypervisor import GUEST_TOKEN_OEM_PREFIX
from monitor.hypervisor.domain_xml import runner_domain_xml
from tests.support.constants import AUTH
from tests.support.constants import TEST_GUEST_XML
from tests.support.rigs import assert_error
from tests.support.rigs import guest_rig

BOOT_SCRIPT = "#!/bin/sh\necho booting linux\n"


def oem_strings(root: ET.Element) -> list[str]:
    return [e.text for e in root.findall("sysinfo[@type='smbios']/oemStrings/entry")]


# The domain XML ------------------------------------------------------------------------------


def test_the_token_is_an_smbios_oem_string():
    xml = runner_domain_xml(
        TEST_GUEST_XML.format(profile="linux"), "ci-runner-linux.0", "/d.qcow2", guest_token="t0k"
    )
    root = ET.fromstring(xml)
    assert oem_strings(root) == [GUEST_TOKEN_OEM_PREFIX + "t0k"]
    assert root.find("os/smbios").get("mode") == "sysinfo"
    assert root.find("os/cmdline") is None  # no directly loaded kernel: no command line
    assert "t0k" not in runner_domain_xml(
        TEST_GUEST_XML.format(profile="linux"), "ci-runner-linux.0", "/d.qcow2"
    )


def test_a_template_s_own_smbios_data_is_kept_and_a_stale_token_replaced():
    template = TEST_GUEST_XML.format(profile="linux").replace(
        "<os>",
        "<sysinfo type='smbios'><system><entry name='manufacturer'>Servo</entry></system>"
        "<oemStrings><entry>keep-me</entry>"
        f"<entry>{GUEST_TOKEN_OEM_PREFIX}old</entry></oemStrings></sysinfo>"
        "<os><kernel>/boot/vmlinuz</kernel>"
        f"<cmdline>console=ttyS0 {GUEST_TOKEN_CMDLINE_PREFIX}old quiet</cmdline>",
    )
    root = ET.fromstring(runner_domain_xml(template, "r", "/d.qcow2", guest_token="new"))
    assert len(root.findall("sysinfo")) == 1
    assert root.findtext("sysinfo/system/entry") == "Servo"
    assert oem_strings(root) == ["keep-me", GUEST_TOKEN_OEM_PREFIX + "new"]
    # A guest whose kernel libvirt loads directly also finds it on its command line.
    assert root.findtext("os/cmdline") == f"console=ttyS0 quiet {GUEST_TOKEN_CMDLINE_PREFIX}new"


# Served once -------------------------------------------------------------------------------


def test_racing_requests_for_a_jit_config_get_it_once(store):
    models.create_runner(7, "linux", "ci-runner-linux.7", datetime.now(UTC))
    barrier = threading.Barrier(8)
    wins = []

    def claim() -> None:
        barrier.wait()
        wins.append(models.claim_jit_config(7, datetime.now(UTC)))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(wins) == [False] * 7 + [True]


# The guest routes (fakes) ----------------------------------------------------------------------


@pytest.fixture
def rig(make_rig):
    rig = make_rig()  # token mode: the default
    rig.converge()
    rig.config.profiles["linux"].config_dir.joinpath("boot-script").write_text(BOOT_SCRIPT)
    return rig


def token_of(rig, runner_id: int) -> str:
    return rig.hypervisor.guest_tokens[models.get_runner(runner_id).guest_name]


def as_guest(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_each_guest_gets_its_own_token_and_the_store_only_its_hash(rig):
    tokens = {runner_id: token_of(rig, runner_id) for runner_id in (0, 1, 2)}
    assert len(set(tokens.values())) == 3 and all(len(t) >= 40 for t in tokens.values())
    for runner_id, token in tokens.items():
        row = models.get_runner(runner_id)
        assert row.guest_token_sha256 == hashlib.sha256(token.encode()).hexdigest()


def test_boot_then_jit_config_once_then_gone(rig):
    token = token_of(rig, 1)
    boot = rig.client.get("/boot", headers=as_guest(token))
    assert boot.text == BOOT_SCRIPT
    assert rig.client.get("/boot", headers=as_guest(token)).text == BOOT_SCRIPT  # until spent
    jit = rig.client.get("/github-jitconfig", headers=as_guest(token))
    assert jit.json == models.get_runner(1).jit_config
    again = rig.client.get("/github-jitconfig", headers=as_guest(token), status=410)
    assert "already been served" in assert_error(again, 410)
    spent = rig.client.get("/boot", headers=as_guest(token), status=410)
    assert "spent" in assert_error(spent, 410)
    # Other guests are not affected.
    other = rig.client.get("/github-jitconfig", headers=as_guest(token_of(rig, 0)))
    assert other.json == models.get_runner(0).jit_config


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer "}, 401),
        ({"Authorization": "Bearer not-a-guest-token"}, 403),
        ({"Authorization": "Bearer caf\u00e9"}, 400),  # not UTF-8 on the wire: not a crash
    ],
)
def test_guest_routes_refuse_a_missing_or_wrong_token(rig, headers, status):
    for path in ("/boot", "/github-jitconfig"):
        response = rig.client.get(path, headers=headers, status=status)
        assert_error(response, status)
    response = rig.client.post("/boot-log", params=b"x", headers=headers, status=status)
    assert_error(response, status)


def test_an_address_alone_opens_nothing_in_token_mode(rig):
    rig.hypervisor.addresses = {"ci-runner-linux.0": "192.168.100.10"}
    rig.client.get("/github-jitconfig", extra_environ={"REMOTE_ADDR": "192.168.100.10"}, status=401)


def test_a_destroyed_runner_s_token_is_dead(rig):
    token = token_of(rig, 0)
    rig.client.post("/runner/0/destroy", headers=AUTH)
    rig.converge(2)
    assert models.get_runner(0).destroyed_at is not None
    rig.client.get("/boot", headers=as_guest(token), status=403)


def test_a_spent_guest_token_no_longer_opens_the_boot_log(rig):
    """Once the JIT config is served, the job's code runs in the guest and may read the token:
    the log the guest sent before that stays, and nothing more is taken."""
    token = token_of(rig, 2)
    upload = {"content_type": "application/x-www-form-urlencoded", "headers": as_guest(token)}
    response = rig.client.post("/boot-log", params=b"booting\n", **upload)
    assert response.json == {"bytes": 8}
    rig.client.get("/github-jitconfig", headers=as_guest(token))
    refused = rig.client.post("/boot-log", params=b"forged line\n", status=410, **upload)
    assert "the guest token of runner 2 is spent" in assert_error(refused, 410)
    assert rig.client.get("/runner/2/boot.log").body == b"booting\n"


def test_address_mode_ignores_tokens(make_rig):
    rig = guest_rig(make_rig)  # guest_auth = "address"
    guest = {"REMOTE_ADDR": "192.168.100.11"}
    assert rig.hypervisor.guest_tokens["ci-runner-linux.1"] is None  # none given
    first = rig.client.get("/github-jitconfig", extra_environ=guest)
    again = rig.client.get("/github-jitconfig", extra_environ=guest)  # upstream serves it again
    assert first.json == again.json == models.get_runner(1).jit_config
