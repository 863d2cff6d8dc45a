"""Shared fixtures: a real config file written per test, a real SQLite store per test."""

from __future__ import annotations

import os
import re
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from monitor import config as config_module
from monitor import models
from monitor.standin import GitHubStandIn

FIXTURES = Path(__file__).parent / "fixtures"
# The tokens write_config puts in .env.
API_TOKEN = "test-api-token"
GITHUB_TOKEN = "test-gh-token"

TEST_GUEST_XML = """\
<domain type='test'>
  <name>{profile}.init</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/dev/null'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='network'><source network='default'/><model type='virtio'/></interface>
    <graphics type='vnc' autoport='yes'/>
  </devices>
</domain>
"""


# A private libvirt test-driver node: the network and storage pool the test guests use.
NODE_XML = """\
<node>
  <network>
    <name>default</name>
    <bridge name='virbr0'/>
    <forward/>
    <ip address='192.168.122.1' netmask='255.255.255.0'>
      <dhcp><range start='192.168.122.2' end='192.168.122.254'/></dhcp>
    </ip>
  </network>
  <pool type='dir'>
    <name>default-pool</name>
    <target><path>/default-pool</path></target>
  </pool>
</node>
"""


def write_config(
    root: Path,
    *,
    github_api_url: str = "http://127.0.0.1:9/",
    targets: dict[str, int] | None = None,
    extra: str = "",
    guest_xml: str = TEST_GUEST_XML,
    libvirt_uri: str = "test:///default",
    storage_pool: str = "default-pool",
    available_memory: str = "16G",
) -> Path:
    """A monitor.toml (+ .env, profiles, base image) for profiles linux and windows."""
    targets = {"linux": 2, "windows": 1} if targets is None else targets
    root.mkdir(parents=True, exist_ok=True)
    base = root / "base.img"
    if not base.exists():
        with open(base, "wb") as image:
            image.truncate(16 * 1024 * 1024)
    profiles = []
    for name, target in targets.items():
        directory = root / "profiles" / name
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "guest.xml").write_text(guest_xml.format(profile=name))
        profiles.append(
            textwrap.dedent(
                f"""
                [profiles.{name}]
                profile_name = "{name}"
                github_runner_label = "self-hosted-image:{name}"
                target_count = {target}
                requires_1g_hugepages = 0
                requires_normal_memory = "1G"
                base_image = "base.img"
                """
            )
        )
    text = textwrap.dedent(
        f"""
        listen_on = ["127.0.0.1"]
        external_base_url = "http://127.0.0.1:8000/"
        github_api_url = "{github_api_url}"
        github_api_scope = "/repos/test/servo"
        github_api_suffix = "host"
        allowed_qualified_repo_prefix = "test/"
        libvirt_uri = "{libvirt_uri}"
        libvirt_storage_pool = "{storage_pool}"
        data_path = "data"
        profiles_path = "profiles"
        monitor_poll_interval = 5
        api_cache_timeout = 30
        monitor_start_timeout = 120
        monitor_reserve_timeout = 60
        available_1g_hugepages = 0
        available_normal_memory = "{available_memory}"
        """
    )
    path = root / "monitor.toml"
    path.write_text(text + extra + "".join(profiles))
    (root / ".env").write_text(
        f"SERVO_CI_MONITOR_API_TOKEN={API_TOKEN}\nGITHUB_TOKEN={GITHUB_TOKEN}\n"
    )
    return path


def config_for_test_driver(
    root: Path, github_api_url: str, targets: dict[str, int], extra: str = ""
):
    """A loaded config for the GitHub stand-in at `github_api_url` and libvirt's test driver on
    a private node file under `root` (its own state: other tests' guests are not in it)."""
    node = root / "node.xml"
    node.write_text(NODE_XML)
    path = write_config(
        root,
        github_api_url=github_api_url,
        libvirt_uri=f"test://{node}",
        targets=targets,
        extra=extra,
    )
    return config_module.load(path, environ={})


@pytest.fixture
def make_config(tmp_path):
    def make(**kwargs):
        path = write_config(tmp_path, **kwargs)
        return config_module.load(path, environ={})

    return make


@pytest.fixture
def store(tmp_path):
    models.open_store(tmp_path / "data")
    yield models
    models.close_store()


def standin_fixtures(token: str):
    """A module-scoped GitHub stand-in (`server`) and a per-test view of it (`standin`) that
    starts from a clean state. Use as: `server, standin = standin_fixtures(TOKEN)`."""

    @pytest.fixture(scope="module")
    def server():
        standin = GitHubStandIn(token=token)
        standin.start()
        yield standin
        standin.stop()

    @pytest.fixture
    def standin(server: GitHubStandIn):
        server.reset()
        server.agent_online_after = None
        yield server
        server.stop_job_simulation()
        server.clear_faults()

    return server, standin


def require_libvirtd(reason: str, hint: str = "run `bash tests/libvirtd.sh` as root") -> None:
    """Skip a test that needs the real libvirtd, or fail it under MONITOR_REQUIRE_LIBVIRTD=1
    (CI), where a missing daemon is a broken set-up rather than a machine without one."""
    message = f"{reason}; {hint}"
    if os.environ.get("MONITOR_REQUIRE_LIBVIRTD") == "1":
        pytest.fail(message)
    pytest.skip(message)


def wait_until(
    condition: Callable[[], Any], what: str, timeout: float, interval: float = 0.05
) -> Any:
    """Poll `condition` until it is truthy and return it; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(interval)


def rebuilt_profile(
    *, mode: str, target: int, timeout: int, disk_size: str, name: str = "built"
) -> str:
    """A `[profiles.<name>]` table without `base_image`: its image is rebuilt by the monitor
    (to append to a config with `write_config(extra=...)`)."""
    return textwrap.dedent(
        f"""
        [profiles.{name}]
        profile_name = "{name}"
        github_runner_label = "self-hosted-image:{name}"
        target_count = {target}
        requires_1g_hugepages = 0
        requires_normal_memory = "1G"
        rebuild_mode = "{mode}"
        rebuild_timeout = {timeout}
        rebuild_disk_size = "{disk_size}"
        """
    )


def set_settings(path: Path, settings: dict[str, str]) -> None:
    """Give top-level keys of a config that write_config wrote these values (TOML text, e.g.
    `"1"` or `'"name"'`): a key it wrote has its line replaced, another is added on top."""
    text = path.read_text()
    for key, value in settings.items():
        text, replaced = re.subn(rf"(?m)^{re.escape(key)} = .*$", f"{key} = {value}", text)
        if not replaced:
            text = f"{key} = {value}\n{text}"  # top-level keys come before the tables
    path.write_text(text)
