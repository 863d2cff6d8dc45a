"""The host's own part of `monitor check-config --host`: what this machine offers the config,
without libvirt or GitHub.

- `memory_checks`: the 1G hugepages and normal memory the config promises, and the profiles'
  targets need, against what the kernel has (`/sys/kernel/mm/hugepages`, `/proc/meminfo`);
- `listen_checks`: each `listen_on` address is this host's and `listen_port` (and the queue's
  port) can be listened on there, or is held by a monitor already running;
- `external_url_check`: `external_base_url` is a URL others can follow;
- `queue_member_checks`: each `[queue] servers` member answers `/dashboard.json`.

Each returns a list of `preflight.Check` and raises nothing for what it finds. Run once, on
the thread of `monitor check-config` (`monitor.doctor` calls them in turn).
"""

from __future__ import annotations

import errno
import http.client
import ipaddress
import json
import socket
from collections.abc import Iterator
from contextlib import ExitStack
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from monitor import policy
from monitor.config import Config
from monitor.config import human_size
from monitor.config import is_loopback_host
from monitor.errors import MonitorError
from monitor.errors import TransientError
from monitor.preflight import Check
from monitor.queue.members import HttpMembers

# Under the root given to `memory_checks` ("/" on a real host, a made-up tree in tests).
HUGEPAGES_1G_DIR = Path("sys/kernel/mm/hugepages/hugepages-1048576kB")
MEMINFO = Path("proc/meminfo")
# How long a port's current holder has to answer GET /healthz (it is on this host).
PROBE_TIMEOUT = 2.0
# More than any /healthz or /dashboard.json of ours says; a bigger body is not a monitor's.
_PROBE_BODY_LIMIT = 1 << 20


# Memory --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostMemory:
    """What the kernel says. `hugepages_1g`/`free_hugepages_1g` are None when it has no 1G
    hugepages at all (no such directory in sysfs); sizes are bytes, None when unreadable."""

    hugepages_1g: int | None
    free_hugepages_1g: int | None
    total: int | None  # MemTotal
    available: int | None  # MemAvailable: what can be used now without swapping
    hugetlb: int  # Hugetlb: held as hugepages of every size, so not normal memory


def read_host_memory(root: Path = Path("/")) -> HostMemory:
    directory = root / HUGEPAGES_1G_DIR
    meminfo = _read_meminfo(root / MEMINFO)
    return HostMemory(
        hugepages_1g=_read_count(directory / "nr_hugepages"),
        free_hugepages_1g=_read_count(directory / "free_hugepages"),
        total=meminfo.get("MemTotal"),
        available=meminfo.get("MemAvailable"),
        hugetlb=meminfo.get("Hugetlb", 0),
    )


def memory_checks(config: Config, root: Path = Path("/")) -> list[Check]:
    """The 1G hugepages and normal memory that the profiles' targets need (as the budget
    check counts them) and that the config says are available, against the host's. A config
    promising more than the host has fails; targets needing more than is free now warn."""
    needs = policy.resource_needs(policy.static_counts(config.profiles), config.profiles)
    host = read_host_memory(root)
    return [
        _hugepages_check(needs.hugepages_1g, config.available_1g_hugepages, host),
        _normal_memory_check(needs.normal_memory, config.available_normal_memory, host, root),
    ]


def _hugepages_check(needed: int, configured: int, host: HostMemory) -> Check:
    subject = "1G hugepages"
    promised = f"profiles need {needed} of {configured} configured"
    if host.hugepages_1g is None or host.free_hugepages_1g is None:
        if configured == 0:
            return Check.ok(subject, f"{promised}; the kernel offers none")
        return Check.fail(
            subject,
            f"{promised}; the kernel offers none (no {Path('/') / HUGEPAGES_1G_DIR})",
            "1G pages need a CPU with pdpe1gb (grep -c pdpe1gb /proc/cpuinfo) and"
            f" 'hugepagesz=1G hugepages={configured}' on the kernel command line; or set"
            " available_1g_hugepages = 0 (and requires_1g_hugepages = 0 in every profile)",
        )
    total, free = host.hugepages_1g, host.free_hugepages_1g
    found = f"host has {total} ({free} free)"
    if configured > total:
        return Check.fail(
            subject,
            f"available_1g_hugepages is {configured} but the host has only {total}"
            f" ({free} free); profiles need {needed}",
            f"reserve them at boot: 'hugepagesz=1G hugepages={configured}' on the kernel command"
            " line (GRUB_CMDLINE_LINUX in /etc/default/grub, update-grub, reboot), or now with"
            f" 'echo {configured} > {Path('/') / HUGEPAGES_1G_DIR / 'nr_hugepages'}' (it may"
            f" get fewer once memory is fragmented); or lower available_1g_hugepages to {total}",
        )
    if needed > free:
        return Check.warn(
            subject,
            f"{promised}; {found}: the targets need more than is free now",
            "runners already running hold theirs (expected while the monitor runs);"
            " otherwise see what holds them: grep -i huge /proc/meminfo",
        )
    return Check.ok(subject, f"{promised}; {found}")


def _normal_memory_check(needed: int, configured: int, host: HostMemory, root: Path) -> Check:
    subject = "normal memory"
    if host.total is None or host.available is None:
        return Check.warn(
            subject,
            f"cannot read MemTotal and MemAvailable from {root / MEMINFO}",
            "run the check on the hypervisor host itself (Linux 3.14 or later)",
        )
    promised = f"profiles need {human_size(needed)} of {human_size(configured)} configured"
    # Memory held as hugepages counts in MemTotal but cannot back a guest's normal memory.
    usable = host.total - host.hugetlb
    found = f"host has {human_size(host.total)}"
    if host.hugetlb:
        found += f" of which {human_size(host.hugetlb)} is held as hugepages"
    found += f", {human_size(host.available)} available now"
    if configured > usable:
        return Check.fail(
            subject,
            f"available_normal_memory is {human_size(configured)} but the {found}",
            f"lower available_normal_memory to at most {human_size(usable)}, leaving room for"
            " the host itself (libvirt, QEMU, the page cache)",
        )
    if needed > host.available:
        return Check.warn(
            subject,
            f"{promised}; {found}: the targets need more than is available now",
            "runners already running use theirs (expected while the monitor runs);"
            " otherwise see what else uses memory: ps aux --sort=-rss | head",
        )
    return Check.ok(subject, f"{promised}; {found}")


def _read_count(file: Path) -> int | None:
    try:
        return int(file.read_text().strip())
    except (OSError, ValueError):
        return None


def _read_meminfo(file: Path) -> dict[str, int]:
    """`/proc/meminfo`'s `Name: <n> kB` lines, in bytes; empty when unreadable."""
    try:
        text = file.read_text()
    except OSError:
        return {}
    values = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        fields = rest.split()
        if len(fields) == 2 and fields[1] == "kB" and fields[0].isdigit():
            values[name] = int(fields[0]) * 1024
    return values


# Addresses and ports -------------------------------------------------------------------------


def listen_checks(config: Config) -> list[Check]:
    """Each `listen_on` address, with `listen_port` and (with a `[queue]` table) the queue's
    `listen_port`: bound and listened on as waitress does, all held until the last is tried,
    so two addresses that overlap (`0.0.0.0` and `127.0.0.1`) fail as the monitor would."""
    ports = [("listen_port", config.listen_port)]
    if config.queue is not None:
        ports.append(("[queue] listen_port", config.queue.listen_port))
    checks: list[Check] = []
    bound: list[tuple[str, int]] = []
    with ExitStack() as held:
        for address in config.listen_on:
            checks += _address_checks(address, ports, bound, held)
    return checks


def _address_checks(
    address: str, ports: list[tuple[str, int]], bound: list[tuple[str, int]], held: ExitStack
) -> Iterator[Check]:
    for key, port in ports:
        subject = f"listen {_host_port(address, port)}"
        try:
            held.enter_context(_listening(address, port))
        except OSError as error:
            if error.errno == errno.EADDRNOTAVAIL:
                yield Check.fail(
                    f"listen {address}",
                    f"{address} (in listen_on) is not an address of this host",
                    "use this host's addresses in listen_on (ip -brief address), or give an"
                    " interface that address first",
                )
                return  # every port there fails the same way
            yield _bind_failure(subject, address, port, key, error, bound)
            continue
        bound.append((address, port))
        yield Check.ok(subject, f"free ({key})")


def _bind_failure(
    subject: str,
    address: str,
    port: int,
    key: str,
    error: OSError,
    bound: list[tuple[str, int]],
) -> Check:
    if error.errno == errno.EADDRINUSE:
        ours = [other for other, at in bound if at == port and _overlap(address, other)]
        if ours:
            return Check.fail(
                subject,
                f"{key}: {address} overlaps {ours[0]} (both in listen_on), the monitor"
                " cannot listen on both",
                "list each address once, and either a wildcard (0.0.0.0, ::) or specific"
                " addresses of the same family, not both",
            )
        holder = _what_answers(address, port)
        if holder is not None:
            return Check.warn(
                subject,
                f"{key}: in use by {holder} (the service?)",
                "nothing to do if that is the service; else stop it (ss -ltnp"
                f" 'sport = :{port}' names its process)",
            )
        return Check.fail(
            subject,
            f"{key}: in use by another program",
            f"find it with ss -ltnp 'sport = :{port}' and stop it, or choose another {key}",
        )
    if error.errno == errno.EACCES:
        return Check.warn(
            subject,
            f"{key}: this user may not listen on a port below 1024",
            "the service needs CAP_NET_BIND_SERVICE (AmbientCapabilities= in its unit), or"
            f" choose a {key} of 1024 or more behind nginx",
        )
    return Check.fail(
        subject,
        f"{key}: cannot listen there: {error.strerror or error}",
        "check listen_on and the host's network set-up (ip -brief address)",
    )


@contextmanager
def _listening(address: str, port: int) -> Iterator[socket.socket]:
    """A TCP socket bound and listening at `address`:`port` as waitress makes it
    (SO_REUSEADDR, IPv6 only on IPv6), closed on exit."""
    family = socket.AF_INET6 if _family(address) == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        listener.bind((address, port))
        # Listening, not only bound: Linux lets two SO_REUSEADDR sockets bind one port until
        # one of them listens, so a bind alone would miss an overlap that waitress meets.
        listener.listen(1)
        yield listener


def _overlap(address: str, other: str) -> bool:
    """Whether the two cannot both listen on one port: the same address, or one of them the
    wildcard of the other's family."""
    if _family(address) != _family(other):
        return False
    a, b = ipaddress.ip_address(address), ipaddress.ip_address(other)
    return a == b or a.is_unspecified or b.is_unspecified


def _family(address: str) -> int:
    return ipaddress.ip_address(address).version


def _what_answers(address: str, port: int) -> str | None:
    """"a running monitor" or "a running queue" when one answers at `address`:`port` (our
    /healthz, or a /dashboard.json with runner counts as upstream's monitor has), else None."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(address, address)
    try:
        health = _get_json(host, port, "/healthz")
        if isinstance(health, dict) and "observed_at" in health:
            return "a running monitor"
        if isinstance(health, dict) and "taken_at" in health:
            return "a running queue"
        dashboard = _get_json(host, port, "/dashboard.json")
    except (OSError, http.client.HTTPException):
        return None  # nothing that speaks HTTP in time
    if isinstance(dashboard, dict) and "profile_runner_counts" in dashboard:
        return "a running monitor"
    return None


def _get_json(host: str, port: int, path: str) -> object:
    """The JSON of a 200 answer to GET `path`, or None for another answer; raises OSError or
    HTTPException when nothing answers in HTTP within `PROBE_TIMEOUT`."""
    connection = http.client.HTTPConnection(host, port, timeout=PROBE_TIMEOUT)
    try:
        connection.request("GET", path, headers={"Accept": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            return None
        try:
            return json.loads(response.read(_PROBE_BODY_LIMIT))
        except ValueError:
            return None
    finally:
        connection.close()


def _host_port(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


# external_base_url ---------------------------------------------------------------------------


def external_url_check(config: Config) -> list[Check]:
    """`external_base_url` is the prefix of the links the monitor hands out (`screenshot_url`
    in /dashboard.json): an http(s) URL with a host, ending in '/', no query or fragment; a
    warning when it names this host's loopback while the monitor also listens elsewhere, so
    the links work only in a browser on this host."""
    subject = "external_base_url"
    url = config.external_base_url
    fix = (
        "set it to the URL others reach this monitor at, ending in '/'"
        " (nginx's when it sits in front), e.g. https://ci0.example.org/"
    )
    problems = _url_problems(url)
    if problems:
        return [Check.fail(subject, f"{url}: {'; '.join(problems)}", fix)]
    host = urlsplit(url).hostname or ""
    elsewhere = [address for address in config.listen_on if not is_loopback_host(address)]
    if is_loopback_host(host) and elsewhere:
        return [
            Check.warn(
                subject,
                f"{url} is this host's loopback, but the monitor also listens on"
                f" {', '.join(elsewhere)}: the screenshot links in /dashboard.json work only"
                " in a browser on this host",
                fix,
            )
        ]
    return [Check.ok(subject, f"{url} (the prefix of screenshot links in /dashboard.json)")]


def _url_problems(url: str) -> list[str]:
    try:
        parts = urlsplit(url)
        _port = parts.port  # raises ValueError for a port that is not a number
    except ValueError as error:
        return [f"not a URL ({error})"]
    problems = []
    if parts.scheme not in ("http", "https"):
        problems.append("not http:// or https://")
    if not parts.hostname:
        problems.append("no host")
    if parts.query or parts.fragment:
        problems.append("links are made by appending to it: no '?' query or '#' fragment")
    elif not url.endswith("/"):
        problems.append("does not end with '/'")
    return problems


# The queue's members -------------------------------------------------------------------------


def queue_member_checks(config: Config) -> list[Check]:
    """With a `[queue]` table, each of its `servers` asked for /dashboard.json as the queue
    asks it (`HttpMembers.poll`, with its timeout): ok with the profiles it reports, a
    failure with the error. None without a `[queue]` table."""
    if config.queue is None:
        return []
    members = HttpMembers(config.api_token)
    checks = []
    for url in config.queue.servers:
        subject = f"queue member {url}"
        curl = f"from this host, curl -sS {url}/dashboard.json should show profile_runner_counts"
        try:
            counts = members.poll(url).counts
        except TransientError as error:  # no answer, or a 5xx
            fix = "start the monitor there (or let this host reach it), or correct [queue] servers"
            checks.append(Check.fail(subject, _member_error(url, error), f"{fix}; {curl}"))
            continue
        except MonitorError as error:  # an answer, not a monitor's
            fix = "[queue] servers lists each monitor's base URL (as http://host:8000)"
            checks.append(Check.fail(subject, _member_error(url, error), f"{fix}; {curl}"))
            continue
        if not counts:
            checks.append(
                Check.warn(
                    subject,
                    "answers, but has no profiles: the queue can take no runner there",
                    "give that monitor [profiles.<name>] tables, or leave it out of servers",
                )
            )
            continue
        profiles = ", ".join(
            f"{key} ({c.idle} idle, {c.healthy} healthy, target {c.target})"
            for key, c in sorted(counts.items())
        )
        checks.append(Check.ok(subject, f"answers: {profiles}"))
    return checks



def _member_error(url: str, error: MonitorError) -> str:
    """The error without its "member <url>: " (the subject names it), with the operating
    system's reason for a connection that failed ("Connection refused"): `HttpMembers`
    names only the exception's class."""
    message = str(error).removeprefix(f"member {url}: ")
    reason = _os_reason(error)
    return f"{message} ({reason})" if reason else message


def _os_reason(error: BaseException) -> str | None:
    seen: set[int] = set()
    cause = error.__cause__ or error.__context__
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        cause = cause.__cause__ or cause.__context__
    return None
