"""`monitor.host_checks`: memory against made-up /proc and /sys trees; listen addresses and
ports with real sockets (free, held by a plain socket, held by a real monitor, not this host's
address); external_base_url; the queue's members as real HTTP servers on loopback (a real
monitor, something else, nothing)."""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Iterator
from pathlib import Path

import bottle
import pytest

from monitor import config as config_module
from monitor import host_checks
from monitor.config import Config
from monitor.config import QueueConfig
from monitor.preflight import Check
from monitor.preflight import Status
from monitor.preflight import render_text
from monitor.serving import BackgroundServer
from tests.support.configs import write_config
from tests.support.constants import GITHUB_TOKEN
from tests.support.daemons import free_port
from tests.support.under_pytest import standin_fixtures

server, standin = standin_fixtures(GITHUB_TOKEN)
GIB = 2**30
# TEST-NET-2 (RFC 5737): documentation only, on no host's interface.
NOT_OURS = "198.51.100.1"


@pytest.fixture
def config(tmp_path: Path) -> Config:
    """write_config's: profiles linux (target 2) and windows (target 1), 1 GiB each, no 1G
    hugepages; 16 GiB of normal memory configured; listening on 127.0.0.1."""
    return config_module.load(write_config(tmp_path / "host"), environ={})


def statuses(checks: list[Check]) -> list[Status]:
    return [check.status for check in checks]


# Memory --------------------------------------------------------------------------------------


def fake_host(
    root: Path,
    *,
    hugepages: tuple[int, int] | None = (0, 0),
    total: int = 32 * GIB,
    available: int = 30 * GIB,
    hugetlb: int = 0,
) -> Path:
    """A /sys and /proc under `root` with `hugepages` (reserved, free) 1G pages (None: the
    kernel has none) and /proc/meminfo's sizes (bytes)."""
    if hugepages is not None:
        directory = root / host_checks.HUGEPAGES_1G_DIR
        directory.mkdir(parents=True)
        (directory / "nr_hugepages").write_text(f"{hugepages[0]}\n")
        (directory / "free_hugepages").write_text(f"{hugepages[1]}\n")
    meminfo = root / host_checks.MEMINFO
    meminfo.parent.mkdir(parents=True)
    meminfo.write_text(
        f"MemTotal:       {total // 1024} kB\n"
        "MemFree:         1024 kB\n"
        f"MemAvailable:   {available // 1024} kB\n"
        "HugePages_Total:       0\n"
        "Hugepagesize:       2048 kB\n"
        f"Hugetlb:        {hugetlb // 1024} kB\n"
    )
    return root


def with_hugepages(config: Config, configured: int, per_runner: int) -> Config:
    profiles = {
        key: dataclasses.replace(profile, requires_1g_hugepages=per_runner)
        for key, profile in config.profiles.items()
    }
    return dataclasses.replace(config, available_1g_hugepages=configured, profiles=profiles)


def test_memory_that_fits_states_the_numbers(config: Config, tmp_path: Path) -> None:
    checks = host_checks.memory_checks(config, fake_host(tmp_path / "root"))

    assert render_text(checks) == (
        "ok    1G hugepages: profiles need 0 of 0 configured; host has 0 (0 free)\n"
        "ok    normal memory: profiles need 3 GiB of 16 GiB configured; host has 32 GiB,"
        " 30 GiB available now"
    )


def test_more_hugepages_configured_than_reserved_fails(config: Config, tmp_path: Path) -> None:
    config = with_hugepages(config, configured=8, per_runner=2)  # the targets need 6

    hugepages, _ = host_checks.memory_checks(config, fake_host(tmp_path, hugepages=(4, 4)))

    assert hugepages.status is Status.FAIL
    assert hugepages.detail == (
        "available_1g_hugepages is 8 but the host has only 4 (4 free); profiles need 6"
    )
    assert "hugepagesz=1G hugepages=8" in hugepages.fix
    assert "lower available_1g_hugepages to 4" in hugepages.fix


def test_hugepages_in_use_warn(config: Config, tmp_path: Path) -> None:
    config = with_hugepages(config, configured=8, per_runner=2)

    hugepages, _ = host_checks.memory_checks(config, fake_host(tmp_path, hugepages=(8, 5)))

    assert hugepages.status is Status.WARN
    assert "profiles need 6 of 8 configured; host has 8 (5 free)" in hugepages.detail
    assert "expected while the monitor runs" in hugepages.fix


def test_a_kernel_without_1g_hugepages(config: Config, tmp_path: Path) -> None:
    root = fake_host(tmp_path, hugepages=None)

    none, _ = host_checks.memory_checks(config, root)
    promised, _ = host_checks.memory_checks(with_hugepages(config, 2, 1), root)

    assert none.status is Status.OK
    assert none.detail == "profiles need 0 of 0 configured; the kernel offers none"
    assert promised.status is Status.FAIL and "the kernel offers none" in promised.detail
    assert "pdpe1gb" in promised.fix


def test_more_normal_memory_configured_than_the_host_has_fails(
    config: Config, tmp_path: Path
) -> None:
    # 20 GiB in all, 8 of them held as hugepages: 12 GiB can back guests' normal memory.
    root = fake_host(tmp_path, total=20 * GIB, available=10 * GIB, hugetlb=8 * GIB)

    _, memory = host_checks.memory_checks(config, root)

    assert memory.status is Status.FAIL
    assert memory.detail == (
        "available_normal_memory is 16 GiB but the host has 20 GiB of which 8 GiB is held as"
        " hugepages, 10 GiB available now"
    )
    assert "lower available_normal_memory to at most 12 GiB" in memory.fix


def test_normal_memory_in_use_warns(config: Config, tmp_path: Path) -> None:
    _, memory = host_checks.memory_checks(config, fake_host(tmp_path, available=2 * GIB))

    assert memory.status is Status.WARN
    assert "profiles need 3 GiB of 16 GiB configured" in memory.detail
    assert "2 GiB available now" in memory.detail


def test_no_meminfo_warns(config: Config, tmp_path: Path) -> None:
    _, memory = host_checks.memory_checks(config, tmp_path)

    assert memory.status is Status.WARN
    assert f"cannot read MemTotal and MemAvailable from {tmp_path}/proc/meminfo" in memory.detail


def test_this_host_is_read_by_default(config: Config) -> None:
    """The real /proc/meminfo parses (whatever the machine's numbers)."""
    assert host_checks.read_host_memory().total is not None


# Addresses and ports -------------------------------------------------------------------------


def listening(config: Config, addresses: tuple[str, ...], port: int) -> Config:
    return dataclasses.replace(config, listen_on=addresses, listen_port=port)


def test_a_free_port_is_ok(config: Config) -> None:
    port = free_port()

    checks = host_checks.listen_checks(listening(config, ("127.0.0.1",), port))

    assert checks == [Check.ok(f"listen 127.0.0.1:{port}", "free (listen_port)")]


def test_a_port_held_by_another_program_fails(config: Config) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]

        (check,) = host_checks.listen_checks(listening(config, ("127.0.0.1",), port))

    assert check.status is Status.FAIL
    assert check.detail == "listen_port: in use by another program"
    assert f"ss -ltnp 'sport = :{port}'" in check.fix


def test_a_port_held_by_a_running_monitor_warns(config: Config, make_served_rig) -> None:
    rig = make_served_rig(1)
    port = int(rig.port)  # waitress' effective_port is the text it was given

    (check,) = host_checks.listen_checks(listening(config, ("127.0.0.1",), port))

    assert check == Check.warn(
        f"listen 127.0.0.1:{port}",
        "listen_port: in use by a running monitor (the service?)",
        f"nothing to do if that is the service; else stop it (ss -ltnp 'sport = :{port}'"
        " names its process)",
    )


def test_an_address_not_on_this_host_fails_once(config: Config) -> None:
    config = dataclasses.replace(
        listening(config, (NOT_OURS,), free_port()),
        queue=QueueConfig(servers=(), store_url="sqlite:///unused"),
    )

    checks = host_checks.listen_checks(config)

    assert checks == [
        Check.fail(
            f"listen {NOT_OURS}",
            f"{NOT_OURS} (in listen_on) is not an address of this host",
            "use this host's addresses in listen_on (ip -brief address), or give an interface"
            " that address first",
        )
    ]


def test_the_queue_port_is_checked_on_every_address(config: Config) -> None:
    port, queue_port = free_port(), free_port()
    config = dataclasses.replace(
        listening(config, ("127.0.0.1", "127.0.0.2"), port),
        queue=QueueConfig(servers=(), store_url="sqlite:///unused", listen_port=queue_port),
    )

    checks = host_checks.listen_checks(config)

    assert [(check.subject, check.detail) for check in checks] == [
        (f"listen 127.0.0.1:{port}", "free (listen_port)"),
        (f"listen 127.0.0.1:{queue_port}", "free ([queue] listen_port)"),
        (f"listen 127.0.0.2:{port}", "free (listen_port)"),
        (f"listen 127.0.0.2:{queue_port}", "free ([queue] listen_port)"),
    ]


def test_overlapping_addresses_fail_as_the_monitor_would(config: Config) -> None:
    port = free_port()

    checks = host_checks.listen_checks(listening(config, ("0.0.0.0", "127.0.0.1"), port))

    assert statuses(checks) == [Status.OK, Status.FAIL]
    assert checks[1].detail == (
        "listen_port: 127.0.0.1 overlaps 0.0.0.0 (both in listen_on), the monitor cannot"
        " listen on both"
    )


# external_base_url ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("ftp://ci0.example.org/", "not http:// or https://"),
        ("http:///", "no host"),
        ("https://ci0.example.org/?a=1", "no '?' query or '#' fragment"),
        ("https://ci0.example.org/#top", "no '?' query or '#' fragment"),
        ("https://ci0.example.org", "does not end with '/'"),
        ("http://ci0.example.org:http/", "not a URL (Port could not be cast"),
    ],
)
def test_a_malformed_external_base_url_fails(config: Config, url: str, problem: str) -> None:
    (check,) = host_checks.external_url_check(dataclasses.replace(config, external_base_url=url))

    assert check.status is Status.FAIL
    assert check.detail.startswith(f"{url}: ") and problem in check.detail
    assert "e.g. https://ci0.example.org/" in check.fix


def test_an_external_base_url_others_can_follow_is_ok(config: Config) -> None:
    config = dataclasses.replace(
        config, external_base_url="https://ci0.example.org/", listen_on=("::1", "192.0.2.1")
    )

    assert statuses(host_checks.external_url_check(config)) == [Status.OK]


def test_a_loopback_external_base_url_warns_when_others_reach_the_monitor(config: Config) -> None:
    only_here = dataclasses.replace(config, external_base_url="http://localhost:8000/")
    also_elsewhere = dataclasses.replace(only_here, listen_on=("::1", "192.0.2.1"))

    assert statuses(host_checks.external_url_check(only_here)) == [Status.OK]
    (check,) = host_checks.external_url_check(also_elsewhere)
    assert check.status is Status.WARN
    assert check.detail == (
        "http://localhost:8000/ is this host's loopback, but the monitor also listens on"
        " 192.0.2.1: the screenshot links in /dashboard.json work only in a browser on this host"
    )


# The queue's members -------------------------------------------------------------------------


@pytest.fixture
def not_a_monitor() -> Iterator[tuple[str, dict[str, object]]]:
    """A web server on loopback; `answers["dashboard"]` is what its /dashboard.json says."""
    answers: dict[str, object] = {"dashboard": "<html>a router's login page</html>"}
    app = bottle.Bottle()

    @app.get("/dashboard.json")
    def dashboard() -> object:
        return answers["dashboard"]

    served = BackgroundServer(app, name="not-a-monitor")
    yield served.url, answers
    served.close()


def with_members(config: Config, *servers: str) -> Config:
    return dataclasses.replace(
        config, queue=QueueConfig(servers=servers, store_url="sqlite:///unused")
    )


def test_no_queue_no_member_checks(config: Config) -> None:
    assert host_checks.queue_member_checks(config) == []


def test_a_member_that_answers_is_ok_with_its_profiles(config: Config, make_served_rig) -> None:
    rig = make_served_rig(1)

    checks = host_checks.queue_member_checks(with_members(config, rig.http.url))

    assert checks == [
        Check.ok(
            f"queue member {rig.http.url}", "answers: linux (1 idle, 1 healthy, target 1)"
        )
    ]


def test_members_that_do_not_answer_fail(config: Config, not_a_monitor) -> None:
    other, _ = not_a_monitor
    down = f"http://127.0.0.1:{free_port()}"

    checks = host_checks.queue_member_checks(with_members(config, down, other))

    assert render_text(checks) == (
        f"FAIL  queue member {down}: GET /dashboard.json: NewConnectionError (Connection refused)\n"
        "      fix: start the monitor there (or let this host reach it), or correct [queue]"
        f" servers; from this host, curl -sS {down}/dashboard.json should show"
        " profile_runner_counts\n"
        f"FAIL  queue member {other}: GET /dashboard.json: the answer is not JSON\n"
        "      fix: [queue] servers lists each monitor's base URL (as http://host:8000); from"
        f" this host, curl -sS {other}/dashboard.json should show profile_runner_counts"
    )


def test_a_member_without_profiles_warns(config: Config, not_a_monitor) -> None:
    url, answers = not_a_monitor
    answers["dashboard"] = {"profile_runner_counts": {}}

    (check,) = host_checks.queue_member_checks(with_members(config, url))

    assert check.status is Status.WARN
    assert check.detail == "answers, but has no profiles: the queue can take no runner there"
