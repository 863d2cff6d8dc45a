"""Config files written for a test or a benchmark: a monitor.toml with its .env, profiles and
base image (`write_config`), and its variants."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

from monitor import config as config_module
from tests.support.constants import API_TOKEN
from tests.support.constants import GITHUB_TOKEN
from tests.support.constants import NODE_XML
from tests.support.constants import TEST_GUEST_XML

# The least a monitor.toml needs: its required top-level keys and one profile (top-level keys
# a test adds go before it, tables after).
MINIMAL_CONFIG = """\
github_api_scope = "/orgs/servo"
github_api_suffix = "ci9"
available_1g_hugepages = 96
available_normal_memory = "16G"

[profiles.linux]
profile_name = "linux"
github_runner_label = "self-hosted-image:linux"
target_count = 2
requires_1g_hugepages = 24
requires_normal_memory = "1G"
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
    root: Path, github_api_url: str, targets: dict[str, int], extra: str = "", **settings: str
):
    """A loaded config for the GitHub stand-in at `github_api_url` and libvirt's test driver on
    a private node file under `root` (its own state: other tests' guests are not in it);
    `settings` are more of write_config's keyword arguments."""
    node = root / "node.xml"
    node.write_text(NODE_XML)
    path = write_config(
        root,
        github_api_url=github_api_url,
        libvirt_uri=f"test://{node}",
        targets=targets,
        extra=extra,
        **settings,
    )
    return config_module.load(path, environ={})


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
