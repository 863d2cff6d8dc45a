"""A real host, first time right, against the real libvirtd of tests/libvirtd.sh: the
`default` pool a fresh libvirtd lacks is made, a pool the config names but libvirt lacks
stops `monitor run` (exit 2), a profile that cannot create runners is a notice and spends no
runner id until it is mended, and `monitor check-config --host` names each problem (a
guest.xml this libvirt refuses, no qemu-img, a GitHub token refused or without the JIT
permission) with its fix."""

from __future__ import annotations

import html
import json
import re
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from monitor import models
from monitor.hypervisor.libvirt_hypervisor import LibvirtHypervisor
from tests.support.configs import set_settings
from tests.support.configs import write_config
from tests.support.constants import GITHUB_TOKEN
from tests.support.constants import ROOT
from tests.support.daemons import Daemon
from tests.support.daemons import free_port
from tests.support.daemons import get_json
from tests.support.daemons import monitor as monitor_cli
from tests.support.libvirtd import POOL
from tests.support.libvirtd import QEMU_GUEST_XML
from tests.support.libvirtd import URI
from tests.support.under_pytest import standin_fixtures
from tests.support.waiting import wait_until

pytestmark = pytest.mark.libvirtd

server, standin = standin_fixtures(GITHUB_TOKEN)

UPSTREAM_GUEST_XML = ROOT / "tests/fixtures/upstream/profiles/servo-ubuntu2204/guest.xml"
DEFAULT_POOL_DIR = "/var/lib/libvirt/images"


def host_config(tmp_path: Path, github_url: str, *, pool: str | None) -> tuple[Path, str, int]:
    """A config for the real libvirtd, one linux runner of QEMU guests that need not boot,
    a guest prefix and port of its own; `pool` None leaves the key out. Returns (path,
    prefix, port)."""
    prefix = f"ci-pre{uuid.uuid4().hex[:6]}"
    path = write_config(
        tmp_path,
        github_api_url=github_url,
        targets={"linux": 1},
        guest_xml=QEMU_GUEST_XML,
        libvirt_uri=URI,
        storage_pool=pool or "",
        extra=f'libvirt_runner_guest_prefix = "{prefix}"\n',
    )
    port = free_port()
    set_settings(path, {"listen_port": str(port), "profile_check_interval": "5"})
    if pool is None:
        path.write_text(re.sub(r"(?m)^libvirt_storage_pool = .*\n", "", path.read_text()))
    return path, prefix, port


def active_guests(conn, prefix: str) -> list[str]:
    return sorted(d.name() for d in conn.listAllDomains(0) if d.name().startswith(prefix))


def pool_names(conn) -> set[str]:
    return {pool.name() for pool in conn.listAllStoragePools(0)}


def remove_pool(conn, name: str) -> None:
    """Stop and undefine pool `name` (its directory and files stay: the tests' guests'
    volumes are deleted before, by `remove_runners`)."""
    if name not in pool_names(conn):
        return
    pool = conn.storagePoolLookupByName(name)
    if pool.isActive():
        pool.destroy()
    pool.undefine()


def remove_runners(pool: str, prefix: str) -> None:
    hypervisor = LibvirtHypervisor(URI, pool)
    try:
        for guest in hypervisor.list_guests(prefix):
            hypervisor.destroy_guest(guest.name)
        for volume in hypervisor.list_volumes(prefix):
            hypervisor.destroy_guest(volume.removesuffix(".qcow2"))
    finally:
        hypervisor.close()


def test_without_a_pool_key_the_missing_default_pool_is_made_and_runners_come_up(
    conn, tmp_path: Path, standin
):
    if "default" in pool_names(conn):
        pytest.skip("this libvirtd has a pool named 'default' already (CI's has none)")
    path, prefix, port = host_config(tmp_path, standin.base_url, pool=None)
    try:
        with Daemon("run", "--config", str(path), cwd=tmp_path) as daemon:
            wait_until(
                lambda: active_guests(conn, prefix) == [f"{prefix}-linux.0"],
                "the runner's guest on the new pool",
                90,
                0.2,
            )
            pool = conn.storagePoolLookupByName("default")
            assert pool.isActive() and pool.autostart()
            assert ET.fromstring(pool.XMLDesc(0)).findtext("target/path") == DEFAULT_POOL_DIR
            volume = pool.storageVolLookupByName(f"{prefix}-linux.0.qcow2")
            assert volume.path() == f"{DEFAULT_POOL_DIR}/{prefix}-linux.0.qcow2"
            code, output = daemon.terminate()
        assert code == 0, output
        assert f"defined a dir pool 'default' at {DEFAULT_POOL_DIR}" in output
    finally:
        if "default" in pool_names(conn):
            remove_runners("default", prefix)
        remove_pool(conn, "default")


def test_a_pool_the_key_names_but_libvirt_lacks_stops_the_start_naming_the_key(
    conn, tmp_path: Path, standin
):
    missing = f"monitor-no-such-pool-{uuid.uuid4().hex[:6]}"
    path, _, _ = host_config(tmp_path, standin.base_url, pool=missing)
    result = monitor_cli("run", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    said = result.stdout + result.stderr
    assert f"{path}: libvirt_storage_pool: libvirt has no storage pool '{missing}'" in said
    assert POOL in said  # the pools it has
    assert missing not in pool_names(conn)


def test_an_impossible_profile_spends_no_runner_id_and_comes_up_once_mended(
    conn, tmp_path: Path, standin
):
    """The pool is defined but not running: the profile is reported once (log, event,
    dashboard notice) and looked at every profile_check_interval (5 s here); once someone
    starts the pool, the runner comes up without a restart, as runner 0."""
    late = f"monitor-late-{uuid.uuid4().hex[:6]}"
    pool = conn.storagePoolDefineXML(
        f"<pool type='dir'><name>{late}</name>"
        f"<target><path>{DEFAULT_POOL_DIR}/{late}</path></target></pool>",
        0,
    )
    pool.build(0)
    path, prefix, port = host_config(tmp_path, standin.base_url, pool=late)
    notice = f"Profile linux cannot create runners: storage pool {late}: defined"
    try:
        with Daemon("run", "--config", str(path), cwd=tmp_path) as daemon:
            page = f"http://127.0.0.1:{port}/"
            wait_until(
                lambda: notice in html.unescape(_get_text(page)), "the dashboard's notice", 60
            )
            assert f"virsh pool-start {late}" in html.unescape(_get_text(page))
            status = monitor_cli("status", "--config", str(path), cwd=tmp_path)
            assert status.returncode == 0, status.stderr
            assert f"blocked      linux: storage pool {late}: defined" in status.stdout
            assert f"fix: virsh pool-start {late}" in status.stdout
            time.sleep(12)  # two more looks at the profile
            dashboard = get_json(f"{page}dashboard.json")
            assert dashboard["runners"] == []
            assert active_guests(conn, prefix) == []
            pool.create(0)
            wait_until(
                lambda: active_guests(conn, prefix) == [f"{prefix}-linux.0"],
                "the runner, within a minute of the fix",
                60,
                0.2,
            )
            assert notice not in html.unescape(_get_text(page))
            code, output = daemon.terminate()
        assert code == 0, output
        assert output.count("profile linux cannot create runners") == 1, output
        models.open_store(tmp_path / "data")
        try:
            kinds = [e.kind for e in models.recent_events(200)]
            assert kinds.count("profile-failed") == 1 and kinds.count("profile-ok") == 1
            assert models.last_runner_id() == 0  # no id spent while it was impossible
        finally:
            models.close_store()
    finally:
        remove_runners(late, prefix)
        remove_pool(conn, late)


def test_the_host_check_names_each_problem_with_libvirts_own_words(conn, tmp_path: Path, standin):
    """check-config --host on a config with upstream's verbatim Servo guest.xml (which this
    libvirt cannot define: no 'itco' watchdog), no qemu-img on PATH, and GitHub refusing
    first the token, then the JIT permission."""
    path, _, port = host_config(tmp_path, standin.base_url, pool=POOL)
    servo = tmp_path / "profiles" / "servo-ubuntu2204"
    servo.mkdir()
    (servo / "guest.xml").write_text(UPSTREAM_GUEST_XML.read_text())
    path.write_text(
        path.read_text() + '\n[profiles.servo-ubuntu2204]\nprofile_name = "servo-ubuntu2204"\n'
        'github_runner_label = "self-hosted-image:servo-ubuntu2204"\ntarget_count = 1\n'
        'requires_1g_hugepages = 0\nrequires_normal_memory = "1G"\nbase_image = "base.img"\n'
    )
    with pytest.raises(Exception) as refused:
        conn.defineXML(UPSTREAM_GUEST_XML.read_text())
    libvirts_words = str(refused.value)

    report = host_check(path, tmp_path)
    lines = [(c["subject"], c["status"], c["detail"]) for c in report["checks"]]
    assert report["ok"] is False
    assert report["failures"] == 2, lines
    assert (
        "profile servo-ubuntu2204",
        "FAIL",
        f"libvirt refuses its guest.xml: {libvirts_words}",
    ) in lines
    # Upstream's guest is on upstream's network, which this libvirtd has not.
    assert ("profile servo-ubuntu2204", "FAIL", "its network 'cinet' does not exist") in lines
    fixes = {c["detail"]: c["fix"] for c in report["checks"]}
    assert "cinet.xml" in fixes["its network 'cinet' does not exist"]
    # The other profile passes, and so does the rest.
    assert ("profile linux", "ok", "libvirt accepts its guest.xml") in lines
    assert ("profile linux", "ok", "network monitor-test is running") in lines
    assert [
        line for line in lines if line[1] == "FAIL" and line[0] != "profile servo-ubuntu2204"
    ] == []
    assert any(
        s == "libvirt" and st == "ok" and "at qemu:///system (QEMU " in d for s, st, d in lines
    )
    assert any(s == "qemu-img" and st == "ok" for s, st, _ in lines)

    empty_bin = tmp_path / "empty-bin"
    empty_bin.mkdir()
    text = host_check(path, tmp_path, as_json=False, path_env=str(empty_bin))
    assert "FAIL  qemu-img: not found on PATH" in text
    assert "apt-get install qemu-utils" in text

    (tmp_path / ".env").write_text(
        (tmp_path / ".env").read_text().replace(GITHUB_TOKEN, "not-the-token")
    )
    text = host_check(path, tmp_path, as_json=False)
    github_lines = [line for line in text.splitlines() if "GitHub" in line or "401" in line]
    assert any(line.startswith("FAIL") and "401" in line for line in github_lines), text

    (tmp_path / ".env").write_text(
        (tmp_path / ".env").read_text().replace("not-the-token", GITHUB_TOKEN)
    )
    standin.jit_permission = False
    try:
        text = host_check(path, tmp_path, as_json=False)
    finally:
        standin.jit_permission = True
    fails = [line for line in text.splitlines() if line.startswith("FAIL")]
    assert any("403" in line for line in fails), text
    assert "Administration" in text  # the fine-grained permission a repository scope needs


def host_check(
    path: Path, cwd: Path, *, as_json: bool = True, path_env: str | None = None
) -> dict | str:
    """`monitor check-config --host` as a sysadmin runs it; exit 2 (something failed)."""
    result = monitor_cli(
        "check-config",
        "--host",
        "--config",
        str(path),
        *(["--json"] if as_json else []),
        cwd=cwd,
        timeout=120,
        env=None if path_env is None else {"PATH": path_env},
    )
    assert result.returncode == 2, result.stdout + result.stderr
    return json.loads(result.stdout) if as_json else result.stdout


def _get_text(url: str) -> str:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode()
    except OSError:
        return ""
