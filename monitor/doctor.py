"""`monitor check-config --host`: the config checks, then everything this host needs before
its first runner, looked at live: libvirt, its storage pool and `qemu-img`, each profile's
guest.xml, networks and base image, GitHub (the token, its budget, JIT configs), the host's
memory and hugepages, the addresses and ports to listen on, and the queue's members.

Runs on the CLI's thread. The parts live beside what they touch (`hypervisor.preflight`,
`github_checks`, `host_checks`); this module only orders them and keeps one failure from
hiding the rest. Nothing is left changed on the host: what the checks make they remove.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from monitor import config as config_module
from monitor import host_checks
from monitor.config import Config
from monitor.config import Profile
from monitor.errors import MonitorError
from monitor.errors import TransientError
from monitor.github_checks import github_checks
from monitor.preflight import Check
from monitor.preflight import Status

if TYPE_CHECKING:
    from monitor.github import GitHub
    from monitor.hypervisor.preflight import HostPreflight

# A check waits this long for libvirt to answer (the daemon waits longer, and keeps trying).
LIBVIRT_OPEN_TIMEOUT = 10.0


def config_checks(config: Config) -> list[Check]:
    """What `load` accepted, and what it warned about."""
    checks = [
        Check.ok("config", f"{config.path}: valid, {len(config.profiles)} profile(s)"),
    ]
    for warning in (*config.warnings, *config_module.file_warnings(config)):
        checks.append(Check.warn("config", warning))
    return checks


def host_report(
    config: Config,
    *,
    github: GitHub | None = None,
    root: Path = Path("/"),
    which: Callable[[str], str | None] | None = None,
) -> list[Check]:
    """Every check, in the order a sysadmin fixes things. `github` defaults to the REST
    client of the config; `root` and `which` let tests give a made-up host."""
    from monitor.github import RestGitHub

    if github is None:
        github = RestGitHub(config.github_api_url, config.github_api_scope, config.github_token)
    checks = config_checks(config)
    checks += libvirt_checks(config, which=which)
    checks += github_checks(github, config)
    checks += host_checks.memory_checks(config, root=root)
    checks += host_checks.listen_checks(config)
    checks += host_checks.external_url_check(config)
    checks += host_checks.queue_member_checks(config)
    return checks


def libvirt_checks(
    config: Config, *, which: Callable[[str], str | None] | None = None
) -> list[Check]:
    """libvirt, the pool, qemu-img and every profile; when libvirt cannot be reached, that
    one FAIL (the rest would only repeat it)."""
    from monitor.hypervisor.libvirt_hypervisor import LibvirtHypervisor

    hypervisor = LibvirtHypervisor(
        config.libvirt_uri,
        config.libvirt_storage_pool,
        create_default_pool=not config.libvirt_storage_pool_set,
        open_timeout=LIBVIRT_OPEN_TIMEOUT,
    )
    preflight = hypervisor.preflight
    if which is not None:
        preflight.which = which
    try:
        try:
            checks = [preflight.libvirt_check()]
        except MonitorError as error:
            uri = config.libvirt_uri or "libvirt's default URI"
            return [
                Check.fail(
                    "libvirt",
                    str(error),
                    f"start libvirtd (systemctl enable --now libvirtd), check libvirt_uri "
                    f"({uri}), and run as a user in the libvirt group",
                )
            ]
        checks += _guarded("storage pool", preflight.storage_pool_checks)
        checks += _guarded("qemu-img", lambda: [preflight.qemu_img_check()])
        for profile in config.profiles.values():
            checks += _guarded(
                f"profile {profile.profile_name}", functools.partial(_profile, preflight, profile)
            )
        return checks
    finally:
        hypervisor.close()


def _profile(preflight: HostPreflight, profile: Profile) -> list[Check]:
    """A profile's checks; for one with target 0 (kept for an override or later), what would
    fail is a warning: nothing is created for it until its target is raised."""
    subject = f"profile {profile.profile_name}"
    try:
        template = profile.guest_xml.read_text()
    except OSError as error:
        checks = [
            Check.fail(
                subject,
                f"cannot read {profile.guest_xml}: {error.strerror or error}",
                f"put the profile's libvirt domain XML at {profile.guest_xml}",
            )
        ]
    else:
        checks = preflight.profile_checks(subject, template, profile.base_image)
        if profile.base_image is None:
            checks.append(
                Check.ok(subject, "its image is built by the monitor (rebuild_*), not checked")
            )
    if profile.target_count == 0:
        checks = [
            Check.warn(c.subject, f"{c.detail} (target 0: matters once it is raised)", c.fix)
            if c.status is Status.FAIL
            else c
            for c in checks
        ]
    return checks


def _guarded(subject: str, run: Callable[[], list[Check]]) -> list[Check]:
    """`run()`, with a libvirt failure that is not a finding (a lost connection, a daemon
    error) reported as this subject's FAIL instead of ending the report."""
    try:
        return run()
    except TransientError as error:
        return [Check.fail(subject, str(error), "check that libvirtd is running, then again")]
    except MonitorError as error:
        return [Check.fail(subject, str(error), "see libvirtd's log (journalctl -u libvirtd)")]
