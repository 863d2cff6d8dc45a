"""`monitor check-config --host` and the libvirt checks under it, on libvirt's test driver
(in-process) and the GitHub stand-in: the report's shape and exit status, each libvirt
finding with its fix, the `default` pool made only by `monitor run`, and the loop's
`creation_blocker` on the same checks. The real-libvirtd cases are in
test_host_preflight.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import libvirt
import pytest

from monitor import doctor
from monitor import preflight
from monitor.config import load
from monitor.hypervisor.libvirt_hypervisor import LibvirtHypervisor
from monitor.hypervisor.preflight import HostPreflight
from monitor.main import check_config
from monitor.preflight import Check
from monitor.preflight import Status
from tests.support.configs import set_settings
from tests.support.configs import write_config
from tests.support.constants import GITHUB_TOKEN
from tests.support.constants import ROOT
from tests.support.daemons import free_port
from tests.support.under_pytest import standin_fixtures

server, standin = standin_fixtures(GITHUB_TOKEN)

UPSTREAM_GUEST_XML = ROOT / "tests/fixtures/upstream/profiles/servo-ubuntu2204/guest.xml"


@pytest.fixture
def config_path(tmp_path: Path, standin) -> Path:
    path = write_config(tmp_path, github_api_url=standin.base_url)
    # A port nothing holds: the check tries to listen on it.
    set_settings(path, {"listen_port": str(free_port())})
    return path


def test_the_report_prints_one_line_a_check_with_the_fix_under_a_failure():
    checks = [
        Check.ok("libvirt", "9.0.0 at qemu:///system"),
        Check.warn("config", "no boot-script"),
        Check.fail("qemu-img", "not found on PATH", "apt-get install qemu-utils"),
    ]
    assert preflight.render_text(checks).splitlines() == [
        "ok    libvirt: 9.0.0 at qemu:///system",
        "warn  config: no boot-script",
        "FAIL  qemu-img: not found on PATH",
        "      fix: apt-get install qemu-utils",
    ]
    report = json.loads(preflight.render_json(checks))
    assert (report["ok"], report["failures"], report["warnings"]) == (False, 1, 1)
    assert report["checks"][2] == {
        "subject": "qemu-img",
        "status": "FAIL",
        "detail": "not found on PATH",
        "fix": "apt-get install qemu-utils",
    }
    assert preflight.exit_status(checks) == 2
    assert preflight.exit_status(checks[:2]) == 0  # warnings do not fail


def test_a_sound_host_passes_and_says_what_it_found(config_path: Path, standin, capsys):
    assert check_config(config_path, host=True) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if re.match(r"^(ok  |warn|FAIL)", line)]
    assert lines[1] == "ok    libvirt: 9.0.0 at test:///default (TEST 0.0.2)"
    pool = "ok    storage pool default-pool: running, target /default-pool, libvirt writes qcow2"
    assert f"{pool} volumes" in lines
    assert "ok    profile linux: libvirt accepts its guest.xml" in lines
    assert "ok    GitHub JIT runners: can create JIT runner configs" in lines
    assert out.rstrip().endswith("0 failure(s), 0 warning(s)")
    assert standin.runners() == []  # the throwaway registration is gone


def test_json_output_and_a_bad_config_as_a_check(config_path: Path, capsys):
    assert check_config(config_path, host=True, as_json=True) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["failures"] == 0
    assert {"subject", "status", "detail", "fix"} <= set(report["checks"][0])

    config_path.write_text(config_path.read_text().replace("github_api_suffix", "nope"))
    assert check_config(config_path, host=True, as_json=True) == 2
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    assert report["checks"][0]["subject"] == "config"
    assert "github_api_suffix" in report["checks"][0]["detail"]


def test_libvirt_out_of_reach_is_one_failure_naming_the_uri(config_path: Path):
    set_settings(config_path, {"libvirt_uri": '"qemu+tcp://127.0.0.1:9/system"'})
    checks = doctor.libvirt_checks(load(config_path, environ={}))
    assert len(checks) == 1 and checks[0].status is Status.FAIL
    assert checks[0].subject == "libvirt"
    assert "qemu+tcp://127.0.0.1:9/system" in checks[0].detail + checks[0].fix


def test_upstreams_guest_xml_is_named_with_libvirts_message(config_path: Path):
    (config_path.parent / "profiles/windows/guest.xml").write_text(UPSTREAM_GUEST_XML.read_text())
    checks = doctor.libvirt_checks(load(config_path, environ={}))
    failures = [c for c in checks if c.status is Status.FAIL]
    assert [(c.subject, c.detail) for c in failures] == [
        (
            "profile windows",
            "libvirt refuses its guest.xml: unsupported configuration: unknown watchdog "
            "model 'itco'",
        ),
        ("profile windows", "its network 'cinet' does not exist"),
    ]
    assert "virsh net-define" in failures[1].fix


def hypervisor_preflight(*, pool: str, create_default_pool: bool) -> tuple[HostPreflight, object]:
    hypervisor = LibvirtHypervisor("test:///default", pool, create_default_pool=create_default_pool)
    return hypervisor.preflight, hypervisor._connection()


def test_a_pool_named_by_the_key_that_libvirt_lacks_fails_listing_the_pools():
    checks, _ = hypervisor_preflight(pool="ci", create_default_pool=False)
    (check,) = checks.storage_pool_checks()
    assert check.status is Status.FAIL
    assert check.detail == (
        "libvirt has no pool 'ci' (named by libvirt_storage_pool; pools: default-pool)"
    )
    assert check.fix.startswith("virsh pool-define-as ci dir --target /var/lib/libvirt/images/ci")
    assert checks.missing_pool() == "libvirt has no storage pool 'ci' (pools: default-pool)"


def test_without_the_key_the_check_warns_and_only_the_monitor_makes_default():
    checks, conn = hypervisor_preflight(pool="default", create_default_pool=True)
    (check,) = checks.storage_pool_checks()
    assert check.status is Status.WARN
    assert "`monitor run` will define a dir pool 'default' at /var/lib/libvirt/images" in (
        check.detail
    )
    assert "default" not in {p.name() for p in conn.listAllStoragePools(0)}
    assert checks.ensure_pool() is True
    pool = conn.storagePoolLookupByName("default")
    assert pool.isActive() and pool.autostart()
    assert "<path>/var/lib/libvirt/images</path>" in pool.XMLDesc(0)
    assert checks.ensure_pool() is False  # there now: nothing to do
    (check,) = checks.storage_pool_checks()
    assert check.status is Status.OK


def test_an_inactive_pool_blocks_creation_until_it_runs(config_path: Path):
    checks, conn = hypervisor_preflight(pool="default-pool", create_default_pool=False)
    template = (config_path.parent / "profiles/linux/guest.xml").read_text()
    base = config_path.parent / "base.img"
    assert checks.creation_blocker(template, base) is None
    pool = conn.storagePoolLookupByName("default-pool")
    pool.destroy()
    blocker = checks.creation_blocker(template, base)
    assert blocker is not None and blocker.subject == "storage pool default-pool"
    assert blocker.fix == "virsh pool-start default-pool && virsh pool-autostart default-pool"
    pool.create(0)
    assert checks.creation_blocker(template, base) is None
    blocker = checks.creation_blocker(template, config_path.parent / "missing.img")
    assert blocker is not None and "cannot read base image" in blocker.detail
    # Nothing left behind by the checks: no throwaway domain, no probe volume.
    assert not [d for d in conn.listAllDomains(0) if d.name().startswith("monitor-preflight-")]
    assert not [v for v in pool.listVolumes() if v.startswith("monitor-preflight-")]


def test_a_libvirt_fault_is_raised_not_blamed_on_the_profile(config_path: Path):
    checks, conn = hypervisor_preflight(pool="default-pool", create_default_pool=False)
    template = (config_path.parent / "profiles/linux/guest.xml").read_text()
    real_define = conn.defineXML

    def failing(xml: str):
        libvirt.virResetLastError()
        raise libvirt.libvirtError("injected fault: defineXML failed")

    conn.defineXML = failing
    try:
        with pytest.raises(Exception, match="injected fault"):
            checks.creation_blocker(template, None)
    finally:
        conn.defineXML = real_define


def test_qemu_img_is_looked_for_only_where_libvirt_runs_qemu_here():
    checks, _ = hypervisor_preflight(pool="default-pool", create_default_pool=False)
    checks.which = lambda name: None
    check = checks.qemu_img_check()
    assert check.status is Status.OK and check.detail.startswith("not needed here (TEST")


def test_a_profile_with_target_0_warns_where_one_in_use_fails(config_path: Path):
    config_path.write_text(config_path.read_text().replace("target_count = 1", "target_count = 0"))
    (config_path.parent / "profiles/windows/guest.xml").unlink()
    checks = [
        c for c in doctor.libvirt_checks(load(config_path, environ={})) if "windows" in c.subject
    ]
    assert [c.status for c in checks] == [Status.WARN]
    assert checks[0].detail.endswith(
        "No such file or directory (target 0: matters once it is raised)"
    )
    (config_path.parent / "profiles/linux/guest.xml").unlink()
    checks = [
        c for c in doctor.libvirt_checks(load(config_path, environ={})) if "linux" in c.subject
    ]
    assert [c.status for c in checks] == [Status.FAIL]
