"""Configuration: upstream's `monitor.toml` and `.env`, checked once into frozen dataclasses.

`load()` reads the two files and nothing else; it does not create directories or talk to
libvirt or GitHub. Every key upstream accepts is accepted with upstream's name and meaning
(durations as `timedelta`, memory sizes as bytes in real binary units), plus a few keys of our
own. Each key has a small converter that raises `ValueError`; `load()` turns that into a
`ConfigError` naming the file, the table and the key. Unknown keys are collected as warnings,
never rejected, because production configs carry keys for features we may not have.

Relative paths resolve against the config file's directory: upstream resolves them against
its working directory, which its systemd unit sets to that directory.

Imports only the standard library and `errors`.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Callable
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from monitor.errors import ConfigError

# Example values from upstream's `.env.example`, refused so an unedited copy cannot go live.
_PLACEHOLDER_TOKENS = {
    "SERVO_CI_MONITOR_API_TOKEN": ("ChangeMe",),
    "GITHUB_TOKEN": ("ChangeMe", "gho_" + "X" * 36),
}


@dataclass(frozen=True)
class Profile:
    """One `[profiles.<key>]` table: a kind of runner and how many of it to keep.

    `requires_normal_memory` is in bytes. `base_image`, when set, is a prebuilt disk image
    used as-is and never rebuilt. `config_dir` is `profiles_path / profile_name` (always set
    by `load()`), holding the profile's `guest.xml` and boot script.

    Without `base_image`, the monitor builds the image itself (spec §7): a rebuild guest made
    from `guest.xml` boots on a fresh disk of `rebuild_disk_size` (a copy of
    `rebuild_source_image` when set, with a cloud-init seed from `user-data`/`meta-data` in
    `config_dir` when present), is served `boot-script` at `/boot`, and powers off within
    `rebuild_timeout`. `rebuild_mode` "rolling" builds while the old image keeps serving and
    then replaces Idle runners one at a time; "drain" is upstream's (target 0 until no runner
    is left, then build).
    """

    profile_name: str
    github_runner_label: str
    target_count: int
    requires_1g_hugepages: int
    requires_normal_memory: int
    image_type: str = "Rust"
    base_image: Path | None = None
    rebuild_mode: str = "rolling"
    rebuild_timeout: timedelta = timedelta(seconds=2000)
    rebuild_disk_size: int = 20 * 2**30
    rebuild_source_image: Path | None = None
    config_dir: Path = Path(".")

    @property
    def guest_xml(self) -> Path:
        """The libvirt domain XML that runner guests of this profile are made from."""
        return self.config_dir / "guest.xml"


@dataclass(frozen=True)
class QueueConfig:
    """The `[queue]` table: this host also serves the global queue (`monitor run`, or
    `monitor queue` alone). `store_url` is where its entries live: `database_url` (PostgreSQL,
    shared by several queue processes) or, without it, SQLite at
    `<data_path>/queue.sqlite3` (as `sqlite:///<absolute path>`)."""

    servers: tuple[str, ...]
    store_url: str
    listen_port: int = 8002
    database_url: str | None = None
    # "owner/repo" -> its entries' priority (higher first); other repositories have 0.
    repository_priority: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Config:
    """The whole configuration. Field names are upstream's key names; the defaults here are
    the defaults for absent keys. Durations are `timedelta`, memory sizes bytes, paths
    absolute (when made by `load()`). The tokens, the HMAC secrets and the token hashes are
    kept out of `repr()`."""

    listen_on: tuple[str, ...] = ("127.0.0.1",)
    external_base_url: str = "http://127.0.0.1:8000/"
    github_api_scope: str
    allowed_qualified_repo_prefix: str | None = None
    github_api_suffix: str
    monitor_poll_interval: timedelta = timedelta(seconds=5)
    api_cache_timeout: timedelta = timedelta(seconds=30)
    tokenless_select_artifact_max_age: timedelta = timedelta(seconds=300)
    select_runner_rate_limit: int = 30
    tokenless_github_calls_per_hour: int = 1000
    monitor_start_timeout: timedelta = timedelta(seconds=120)
    monitor_reserve_timeout: timedelta = timedelta(seconds=60)
    # GitHub's `busy` flag reads false for up to this long after a job starts: a Reserved
    # runner is destroyed only this long after `monitor_reserve_timeout` (ours, not upstream's).
    github_busy_lag: timedelta = timedelta(seconds=60)
    monitor_thread_send_timeout: timedelta = timedelta(seconds=10)
    monitor_thread_recv_timeout: timedelta = timedelta(seconds=10)
    destroy_all_non_busy_runners: bool = False
    dont_register_runners: bool = False
    dont_create_runners: bool = False
    main_repo_path: Path | None = None
    base_image_max_age: timedelta = timedelta(seconds=86400)
    dont_update_cached_servo_repo: bool = False
    libvirt_template_guest_prefix: str = "ci-template"
    libvirt_rebuild_guest_prefix: str = "ci-rebuild"
    libvirt_runner_guest_prefix: str = "ci-runner"
    available_1g_hugepages: int
    available_normal_memory: int
    queue_member: bool = False
    queue_servers: tuple[str, ...] | None = None
    # The `[queue]` table; None without one (this host serves no queue).
    queue: QueueConfig | None = None
    profiles: dict[str, Profile]
    # Ours, not upstream's.
    listen_port: int = 8000
    github_api_url: str = "https://api.github.com"
    libvirt_uri: str | None = None
    libvirt_storage_pool: str = "default"
    # Whether the key was given: without it a missing `default` pool is made (virt-manager's).
    libvirt_storage_pool_set: bool = False
    # How often a profile that cannot create runners (no pool, no qemu-img, a guest.xml this
    # libvirt refuses) is looked at again.
    profile_check_interval: timedelta = timedelta(seconds=60)
    data_path: Path
    profiles_path: Path
    image_deps_dir: Path | None = None
    # Clients allowed to name the real client in X-Real-IP (a reverse proxy such as nginx).
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    # Largest count `take/<count>` accepts (and a select-runner artifact may ask for).
    take_max_count: int = 32
    # How guests prove who they are at /boot and /github-jitconfig: "token" (each guest's
    # own single-use token, given to it through libvirt) or upstream's "address" (its IP).
    guest_auth: str = "token"
    # More API tokens, by name: the SHA-256 (hex) of each, never the token itself.
    api_tokens: dict[str, str] = field(default_factory=dict, repr=False)
    # The scopes of the named tokens configured with some (the others have every scope).
    api_token_scopes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Shared secrets of callers that sign their requests (HMAC-SHA256), by name, from the
    # environment (MONITOR_HMAC_SECRET_<NAME>).
    hmac_secrets: dict[str, str] = field(default_factory=dict, repr=False)
    # Their scopes, where given (MONITOR_HMAC_SCOPES_<NAME>); the others have every scope.
    hmac_scopes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    api_token: str = field(repr=False)
    github_token: str = field(repr=False)
    path: Path = Path("monitor.toml")
    warnings: tuple[str, ...] = ()


# Converters: raw TOML value -> typed value, or ValueError with a message naming the problem.

_Converter = Callable[[Any], Any]
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_SCOPE = re.compile(r"/repos/[^/\s]+/[^/\s]+|/orgs/[^/\s]+")
_MEMORY = re.compile(r"([0-9]+) ?([BKMGTP])")
REBUILD_MODES = ("rolling", "drain")
GUEST_AUTH_MODES = ("token", "address")
HMAC_SECRET_PREFIX = "MONITOR_HMAC_SECRET_"
HMAC_SCOPES_PREFIX = "MONITOR_HMAC_SCOPES_"
# What an API credential may do (monitor/auth.py): takes; override, holds and destroy;
# everything, revocation included.
API_SCOPES = ("reserve", "operate", "admin")
# The SHA-256 of the empty string: as a token hash it would let an empty bearer token in.
_EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
_MEMORY_UNITS = {"B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}
_MAX_SECONDS = int(timedelta.max.total_seconds())
# `[queue] repository_priority` keys: GitHub's owner/repo (as the queue's clients send them).
_QUALIFIED_REPO = re.compile(r"[A-Za-z0-9_.-]{1,100}/[A-Za-z0-9_.-]{1,100}")
# Priorities are stored as 64-bit integers; anything near that is a typo.
_MAX_PRIORITY = 1_000_000


def _count(value: Any) -> int:
    # `type() is int` because a TOML bool is a Python int, and a float is never a count.
    if type(value) is not int or value < 0:
        raise ValueError(f"expected a non-negative integer, got {value!r}")
    return value


def _seconds(value: Any) -> timedelta:
    if type(value) is not int or not 0 <= value <= _MAX_SECONDS:
        raise ValueError(f"expected a non-negative integer number of seconds, got {value!r}")
    return timedelta(seconds=value)


def _port(value: Any) -> int:
    if type(value) is not int or not 1 <= value <= 65535:
        raise ValueError(f"expected a port number from 1 to 65535, got {value!r}")
    return value


def _bool(value: Any) -> bool:
    if type(value) is not bool:
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _nonempty(value: Any) -> str:
    text = _string(value)
    if not text:
        raise ValueError("expected a non-empty string, got ''")
    return text


def _name(value: Any) -> str:
    """A name that goes into libvirt guest names, runner names and file paths."""
    name = _string(value)
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"expected a name of letters, digits, '-', '_' and '.' (not starting with"
            f" '-', '_' or '.'), got {value!r}"
        )
    return name


def _suffix(value: Any) -> str:
    # Registrations are named `<guest>@<suffix>` and recognised by that ending.
    suffix = _nonempty(value)
    if "@" in suffix or any(c.isspace() for c in suffix):
        raise ValueError(f"expected a host name without '@' or spaces, got {value!r}")
    return suffix


def _scope(value: Any) -> str:
    scope = _string(value)
    if not _SCOPE.fullmatch(scope):
        raise ValueError(f"expected '/repos/<owner>/<repo>' or '/orgs/<org>', got {value!r}")
    return scope


def _memory(value: Any) -> int:
    """A memory size (spec §1.5): digits, an optional space, one of B K M G T P. Real binary
    units, where upstream read every suffix but B as KiB."""
    match = _MEMORY.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(
            f'expected a memory size like "16G" (a whole number, then one of'
            f" B K M G T P), got {value!r}"
        )
    return int(match[1]) * _MEMORY_UNITS[match[2]]


def _path(value: Any) -> Path:
    return Path(_nonempty(value))


def _http_url(value: Any) -> str:
    url = _no_userinfo(_string(value))
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed "[" of an IPv6 address
        parts = urlsplit("")
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
    return url.rstrip("/")


def _github_api_url(value: Any) -> str:
    """GitHub's API base: it is sent the GitHub token, so plain http only to this host (the
    GitHub stand-in of tests and the demo)."""
    url = _http_url(value)
    parts = urlsplit(url)
    if parts.scheme == "http" and not is_loopback_host(parts.hostname or ""):
        raise ValueError(
            f"plain http:// would send the GitHub token in the clear: use https://, or http://"
            f" only to a loopback address (127.0.0.1, ::1, localhost), got {value!r}"
        )
    return url


def is_loopback_host(host: str) -> bool:
    """Whether `host` (a URL's host name or address) is this host's loopback."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _no_userinfo(url: str) -> str:
    """`url`, refused if it carries a user name or password (`user:password@host`): config
    values are shown in summaries, errors and logs, and secrets belong in .env. The message
    leaves the URL out, since its user part may be a secret."""
    authority = url.partition("//")[2].split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    if "@" in authority:
        raise ValueError(
            "a URL with a user name or password (user:password@host) is refused: secrets go"
            " in .env, not in monitor.toml (URL not shown)"
        )
    return url


def _repo_prefix(value: Any) -> str:
    """`allowed_qualified_repo_prefix`: a plain prefix of "owner/repo". Without a '/' it
    would let in every owner whose name merely starts the same ("servo" takes
    "servo-evil/x"); empty, every repository on GitHub."""
    prefix = _string(value)
    if "/" not in prefix:
        raise ValueError(
            f'expected an owner and a slash, such as "servo/" (or "servo/servo"), got {value!r};'
            " leave the key out to refuse tokenless select"
        )
    return prefix


def _base_url(value: Any) -> str:
    # Upstream refuses to start too: "external_base_url setting must end with slash!".
    url = _no_userinfo(_string(value))
    if not url.endswith("/"):
        raise ValueError(f"must end with '/', got {value!r}")
    return url


def _addresses(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"expected a non-empty array of IP addresses, got {value!r}")
    for item in value:
        try:
            ipaddress.ip_address(_string(item))
        except ValueError:
            raise ValueError(f"expected an IP address, got {item!r}") from None
    return tuple(value)


def _networks(value: Any) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    if not isinstance(value, list):
        raise ValueError(f"expected an array of IP addresses or networks, got {value!r}")
    networks = []
    for item in value:
        try:
            networks.append(ipaddress.ip_network(_string(item), strict=False))
        except ValueError:
            raise ValueError(f"expected an IP address or network, got {item!r}") from None
    return tuple(networks)


def _positive(value: Any) -> int:
    number = _count(value)
    if number < 1:
        raise ValueError(f"expected a positive integer, got {value!r}")
    return number


def _urls(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(f"expected an array of URLs, got {value!r}")
    return tuple(_http_url(item) for item in value)


def _database_url(value: Any) -> str:
    """A PostgreSQL URL (libpq's form: `postgresql://[user@]host[:port]/dbname[?…]`). No
    password: config values are shown in summaries and logs; libpq reads it from
    `~/.pgpass`, `PGPASSFILE` or `PGPASSWORD` itself."""
    url = _string(value)
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        raise ValueError(
            f"expected a postgresql:// (or postgres://) URL, got {url.split('://')[0]!r}://…;"
            " leave the key out to keep the queue in SQLite under data_path"
        )
    authority = rest.split("/", 1)[0].split("?", 1)[0]
    if ":" in authority.rpartition("@")[0]:
        raise ValueError(
            "a password in the URL is refused: config values are shown in summaries and logs;"
            " give it to libpq in ~/.pgpass, PGPASSFILE or PGPASSWORD (URL not shown)"
        )
    if not rest.split("?", 1)[0].partition("/")[2]:
        raise ValueError(f"expected a database name after the host, got {url!r}")
    return url


def _repository_priority(value: Any) -> dict[str, int]:
    if not isinstance(value, dict):
        raise ValueError(f'expected a table of "owner/repo" = integer, got {value!r}')
    priorities = {}
    for repo, priority in value.items():
        if not _QUALIFIED_REPO.fullmatch(repo):
            raise ValueError(f'expected keys of the form "owner/repo", got {repo!r}')
        if type(priority) is not int or not -_MAX_PRIORITY <= priority <= _MAX_PRIORITY:
            raise ValueError(
                f"{repo}: expected an integer from {-_MAX_PRIORITY} to {_MAX_PRIORITY},"
                f" got {priority!r}"
            )
        priorities[repo] = priority
    return priorities


def _rebuild_mode(value: Any) -> str:
    if value not in REBUILD_MODES:
        raise ValueError(f'expected "rolling" or "drain", got {value!r}')
    return _string(value)


def _guest_auth(value: Any) -> str:
    if value not in GUEST_AUTH_MODES:
        raise ValueError(f'expected "token" or "address", got {value!r}')
    return _string(value)


def _sha256_hex(value: Any) -> str:
    if not isinstance(value, str) or not _SHA256_HEX.fullmatch(value):
        raise ValueError(
            "expected the token's SHA-256 as 64 hex digits "
            "(printf %s \"$TOKEN\" | sha256sum), not the token itself"
        )
    return value.lower()


def _positive_seconds(value: Any) -> timedelta:
    if _seconds(value) == timedelta(0):
        raise ValueError("expected a positive number of seconds, got 0")
    return timedelta(seconds=value)


def _image_type(value: Any) -> str:
    if value != "Rust":
        raise ValueError(f'expected "Rust" (the only image type), got {value!r}')
    return _string(value)


# Schemas: key -> (converter, required). An absent optional key takes the dataclass default
# or, where noted, a value load() derives.
_REQUIRED, _OPTIONAL = True, False

_TOP_LEVEL: dict[str, tuple[_Converter, bool]] = {
    "listen_on": (_addresses, _OPTIONAL),
    "external_base_url": (_base_url, _OPTIONAL),  # derived from listen_port
    "github_api_scope": (_scope, _REQUIRED),
    "allowed_qualified_repo_prefix": (_repo_prefix, _OPTIONAL),
    "github_api_suffix": (_suffix, _REQUIRED),
    "monitor_poll_interval": (_seconds, _OPTIONAL),
    "api_cache_timeout": (_seconds, _OPTIONAL),
    "tokenless_select_artifact_max_age": (_seconds, _OPTIONAL),
    "select_runner_rate_limit": (_count, _OPTIONAL),
    "tokenless_github_calls_per_hour": (_positive, _OPTIONAL),
    "monitor_start_timeout": (_seconds, _OPTIONAL),
    "monitor_reserve_timeout": (_seconds, _OPTIONAL),
    "github_busy_lag": (_seconds, _OPTIONAL),
    "monitor_thread_send_timeout": (_seconds, _OPTIONAL),
    "monitor_thread_recv_timeout": (_seconds, _OPTIONAL),
    "destroy_all_non_busy_runners": (_bool, _OPTIONAL),
    "dont_register_runners": (_bool, _OPTIONAL),
    "dont_create_runners": (_bool, _OPTIONAL),  # derived from destroy_all_non_busy_runners
    "main_repo_path": (_path, _OPTIONAL),
    "base_image_max_age": (_seconds, _OPTIONAL),
    "dont_update_cached_servo_repo": (_bool, _OPTIONAL),
    "libvirt_template_guest_prefix": (_name, _OPTIONAL),
    "libvirt_rebuild_guest_prefix": (_name, _OPTIONAL),
    "libvirt_runner_guest_prefix": (_name, _OPTIONAL),
    "available_1g_hugepages": (_count, _REQUIRED),
    "available_normal_memory": (_memory, _REQUIRED),
    "queue_member": (_bool, _OPTIONAL),
    "listen_port": (_port, _OPTIONAL),
    "github_api_url": (_github_api_url, _OPTIONAL),
    "libvirt_uri": (_nonempty, _OPTIONAL),  # derived from LIBVIRT_DEFAULT_URI
    "libvirt_storage_pool": (_nonempty, _OPTIONAL),
    "profile_check_interval": (_positive_seconds, _OPTIONAL),
    "data_path": (_path, _OPTIONAL),  # derived from SERVO_CI_MONITOR_DATA_PATH
    "profiles_path": (_path, _OPTIONAL),  # derived from LIB_MONITOR_DIR
    "trusted_proxies": (_networks, _OPTIONAL),
    "take_max_count": (_positive, _OPTIONAL),
    "guest_auth": (_guest_auth, _OPTIONAL),
}
# Tables read separately; listed so they are not reported as unknown keys.
_TABLES = ("queue", "profiles", "api_tokens")

_QUEUE: dict[str, tuple[_Converter, bool]] = {
    "servers": (_urls, _REQUIRED),
    "listen_port": (_port, _OPTIONAL),
    "database_url": (_database_url, _OPTIONAL),
    "repository_priority": (_repository_priority, _OPTIONAL),
}

_PROFILE: dict[str, tuple[_Converter, bool]] = {
    "profile_name": (_name, _REQUIRED),
    "github_runner_label": (_nonempty, _REQUIRED),
    "target_count": (_count, _REQUIRED),
    "requires_1g_hugepages": (_count, _REQUIRED),
    "requires_normal_memory": (_memory, _REQUIRED),
    "image_type": (_image_type, _OPTIONAL),
    "base_image": (_path, _OPTIONAL),
    "rebuild_mode": (_rebuild_mode, _OPTIONAL),
    "rebuild_timeout": (_positive_seconds, _OPTIONAL),
    "rebuild_disk_size": (_memory, _OPTIONAL),
    "rebuild_source_image": (_path, _OPTIONAL),
}


def load(path: Path, environ: Mapping[str, str] | None = None, cwd: Path | None = None) -> Config:
    """Reads `path` (monitor.toml) and `.env`, and returns the checked `Config`.

    Steps: read the TOML; read `.env` from the config's directory, else from `cwd`, with
    `environ` (default `os.environ`) winning over it; convert every key, collecting unknown
    keys as warnings; derive the defaults that depend on other keys or the environment; read
    the two tokens. Raises `ConfigError` naming the file, table and key of the first problem.
    """
    environ = os.environ if environ is None else environ
    cwd = Path.cwd() if cwd is None else cwd
    path = cwd / path
    config_dir = path.parent
    raw = _read_toml(path)
    env_file = _find_dotenv(config_dir, cwd)
    env = {**(_read_dotenv(env_file, environ) if env_file else {}), **environ}

    reader = _Reader(path)
    values = reader.table(raw, _TOP_LEVEL, "", known=_TABLES)
    queue = _subtable(path, raw, "queue", required=False)
    queue_values = None if queue is None else reader.table(queue, _QUEUE, "[queue] ")

    values.setdefault("external_base_url", f"http://127.0.0.1:{values.get('listen_port', 8000)}/")
    values.setdefault("dont_create_runners", values.get("destroy_all_non_busy_runners", False))
    values["libvirt_storage_pool_set"] = "libvirt_storage_pool" in values
    if "libvirt_uri" not in values and env.get("LIBVIRT_DEFAULT_URI"):
        values["libvirt_uri"] = env["LIBVIRT_DEFAULT_URI"]
    if "data_path" not in values:
        values["data_path"] = Path(env.get("SERVO_CI_MONITOR_DATA_PATH") or "data")
    if "profiles_path" not in values:
        values["profiles_path"] = Path(env.get("LIB_MONITOR_DIR") or "..") / "profiles"
    if env.get("IMAGE_DEPS_DIR"):
        values["image_deps_dir"] = Path(env["IMAGE_DEPS_DIR"])
    for key in ("main_repo_path", "data_path", "profiles_path", "image_deps_dir"):
        if key in values:
            # No normalisation: `..` must mean what the kernel says when symlinks are involved.
            values[key] = config_dir / values[key]

    if queue_values is not None:
        values["queue_servers"] = queue_values["servers"]
        values["queue"] = _queue(path, values, queue_values)

    profiles = _subtable(path, raw, "profiles", required=True) or {}
    values["profiles"] = {
        key: _profile(reader, path, key, table, config_dir, values["profiles_path"])
        for key, table in profiles.items()
    }

    api_tokens = _subtable(path, raw, "api_tokens", required=False) or {}
    values["api_tokens"], values["api_token_scopes"] = _api_tokens(reader, path, api_tokens)
    dotenv_hint = env_file or config_dir / ".env"
    values["hmac_secrets"], values["hmac_scopes"] = _hmac_secrets(reader, env, dotenv_hint)
    for name, attribute in (
        ("SERVO_CI_MONITOR_API_TOKEN", "api_token"),
        ("GITHUB_TOKEN", "github_token"),
    ):
        values[attribute] = _token(
            name, env, "the environment" if name in environ else dotenv_hint, dotenv_hint
        )

    return Config(**values, path=path, warnings=tuple(reader.warnings))


def file_warnings(config: Config) -> list[str]:
    """Files that profiles with a non-zero target need but that are not there (yet).
    Warnings, not errors: a config may be checked away from the hypervisor host, and `load`
    reads only the config and `.env`."""
    warnings = []
    for profile in config.profiles.values():
        if profile.target_count == 0:
            continue
        where = f"{config.path}: [profiles.{profile.profile_name}]"
        if not profile.guest_xml.is_file():
            warnings.append(
                f"{where} no guest.xml at {profile.guest_xml}; no runner can be created"
            )
        if profile.base_image is not None and not profile.base_image.is_file():
            warnings.append(f"{where} base_image: {profile.base_image} does not exist")
        if profile.base_image is None:
            boot_script = profile.config_dir / "boot-script"
            if not boot_script.is_file():
                warnings.append(
                    f"{where} no boot-script at {boot_script}; the image rebuild guest has"
                    " nothing to run"
                )
            source = profile.rebuild_source_image
            if source is not None and not source.is_file():
                warnings.append(f"{where} rebuild_source_image: {source} does not exist")
    return warnings


def summary(config: Config) -> str:
    """A human-readable account of `config` for `monitor check-config`: one line per profile,
    then the resource budget (static targets against what is available), then the
    warnings. Never includes the tokens."""
    lines = [
        f"{config.path}: scope {config.github_api_scope}, runners registered as"
        f" <name>@{config.github_api_suffix}, data in {config.data_path}",
        f"{len(config.profiles)} profile(s), configured in {config.profiles_path}:",
    ]
    for profile in config.profiles.values():
        image = (
            f"base image {profile.base_image}"
            if profile.base_image
            else f"image rebuilt ({profile.rebuild_mode})"
        )
        lines.append(
            f"  {profile.profile_name}: label {profile.github_runner_label}, target"
            f" {profile.target_count}, per runner {profile.requires_1g_hugepages} 1G hugepages"
            f" ({human_size(profile.requires_1g_hugepages * 2**30)}) and"
            f" {human_size(profile.requires_normal_memory)} normal memory, {image}"
        )
    hugepages = sum(p.target_count * p.requires_1g_hugepages for p in config.profiles.values())
    memory = sum(p.target_count * p.requires_normal_memory for p in config.profiles.values())
    lines += [
        "budget for the targets:",
        f"  1G hugepages: {hugepages} of {config.available_1g_hugepages}"
        f" ({_fits(hugepages, config.available_1g_hugepages)})",
        f"  normal memory: {human_size(memory)} of {human_size(config.available_normal_memory)}"
        f" ({_fits(memory, config.available_normal_memory)})",
    ]
    if config.queue is not None:
        queue = config.queue
        store = "PostgreSQL" if queue.database_url else "SQLite"
        lines.append(
            f"queue: served on port {queue.listen_port} for {len(queue.servers)} member(s),"
            f" entries in {store} ({queue.store_url}),"
            f" {len(queue.repository_priority)} repository priority setting(s)"
        )
    if config.destroy_all_non_busy_runners:
        lines.append("destroy_all_non_busy_runners: every runner that is not busy is destroyed")
    if config.dont_create_runners:
        lines.append("dont_create_runners: no runners are created (every target is 0)")
    if config.warnings:
        lines.append(f"{len(config.warnings)} warning(s):")
        lines += [f"  {warning}" for warning in config.warnings]
    return "\n".join(lines)


class _Reader:
    """Converts tables against a schema, collecting warnings for unknown keys."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.warnings: list[str] = []

    def table(
        self,
        raw: Mapping[str, Any],
        schema: Mapping[str, tuple[_Converter, bool]],
        where: str,
        known: tuple[str, ...] = (),
    ) -> dict[str, Any]:
        """The converted values of the keys present in `raw`; `where` is "" for the top
        level, else "[table] "."""
        values = {}
        for key, (convert, required) in schema.items():
            if key in raw:
                try:
                    values[key] = convert(raw[key])
                except ValueError as error:
                    raise ConfigError(f"{self.path}: {where}{key}: {error}") from None
            elif required:
                raise ConfigError(f"{self.path}: {where}{key}: required key is missing")
        for key in raw:
            if key not in schema and key not in known:
                self.warnings.append(f"{self.path}: unknown key {where}{key} (ignored)")
        return values


def _queue(path: Path, values: Mapping[str, Any], queue: dict[str, Any]) -> QueueConfig:
    """The `[queue]` table with its store derived; its port must not be the monitor's."""
    port = queue.get("listen_port", QueueConfig.listen_port)
    if port == values.get("listen_port", Config.listen_port):
        raise ConfigError(
            f"{path}: [queue] listen_port: {port} is the monitor's own listen_port; the queue"
            " needs a port of its own (default 8002)"
        )
    database_url = queue.get("database_url")
    store_url = database_url or f"sqlite:///{Path(values['data_path']) / 'queue.sqlite3'}"
    return QueueConfig(**queue, store_url=store_url)


def _api_tokens(
    reader: _Reader, path: Path, table: Mapping[str, Any]
) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    """`[api_tokens]`: `name = "<sha256>"` (every scope, with a warning) or
    `name = { sha256 = "<sha256>", scopes = [...] }`."""
    hashes: dict[str, str] = {}
    scopes: dict[str, tuple[str, ...]] = {}
    for name, value in table.items():
        where = f"{path}: [api_tokens] {name}"
        if not _NAME.fullmatch(name):
            raise ConfigError(f"{path}: [api_tokens] {name!r}: expected a name of [A-Za-z0-9_.-]")
        digest = value.get("sha256") if isinstance(value, dict) else value
        try:
            hashes[name] = _sha256_hex(digest)
        except ValueError as error:
            key = ".sha256" if isinstance(value, dict) else ""
            raise ConfigError(f"{where}{key}: {error}") from None
        if hashes[name] == _EMPTY_SHA256:
            raise ConfigError(
                f"{where}: that is the SHA-256 of the empty string, which would let an empty "
                "token in"
            )
        if not isinstance(value, dict):
            reader.warnings.append(
                f"{where}: a token without scopes may do everything, revocation included; "
                f'give it only what it needs, e.g. {_toml_key(name)} = {{ sha256 = "…", '
                'scopes = ["reserve"] }'
            )
            continue
        try:
            scopes[name] = _scopes(value.get("scopes"))
        except ValueError as error:
            raise ConfigError(f"{where}.scopes: {error}") from None
        for key in value:
            if key not in ("sha256", "scopes"):
                reader.warnings.append(f"{path}: unknown key [api_tokens] {name}.{key} (ignored)")
    return hashes, scopes


def _hmac_secrets(
    reader: _Reader, env: Mapping[str, str], dotenv_hint: Path
) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    """`MONITOR_HMAC_SECRET_<NAME>` and `MONITOR_HMAC_SCOPES_<NAME>` (scopes separated by
    commas or spaces; without them the caller may do everything, with a warning)."""
    where = f"(in {dotenv_hint} or the environment)"
    secrets: dict[str, str] = {}
    for key, secret in sorted(env.items()):
        if key.startswith(HMAC_SECRET_PREFIX) and key != HMAC_SECRET_PREFIX:
            if len(secret) < 16:
                raise ConfigError(f"{key} is shorter than 16 characters {where}")
            secrets[key.removeprefix(HMAC_SECRET_PREFIX).lower()] = secret
    scopes: dict[str, tuple[str, ...]] = {}
    for key, text in sorted(env.items()):
        if key.startswith(HMAC_SCOPES_PREFIX) and key != HMAC_SCOPES_PREFIX:
            name = key.removeprefix(HMAC_SCOPES_PREFIX).lower()
            if name not in secrets:
                raise ConfigError(f"{key}: no {HMAC_SECRET_PREFIX}{name.upper()} for it {where}")
            try:
                scopes[name] = _scopes(text.replace(",", " ").split())
            except ValueError as error:
                raise ConfigError(f"{key}: {error} {where}") from None
    for name in secrets:
        if name not in scopes:
            reader.warnings.append(
                f"{HMAC_SECRET_PREFIX}{name.upper()}: without {HMAC_SCOPES_PREFIX}{name.upper()} "
                "its caller may do everything, revocation included; give it only what it "
                "needs, e.g. reserve"
            )
    return secrets, scopes


def _scopes(value: Any) -> tuple[str, ...]:
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(scope, str) and scope in API_SCOPES for scope in value)
    ):
        raise ValueError(f"expected a non-empty list of {', '.join(API_SCOPES)}, got {value!r}")
    return tuple(sorted(set(value), key=API_SCOPES.index))


def _profile(
    reader: _Reader,
    path: Path,
    key: str,
    raw: Any,
    config_dir: Path,
    profiles_path: Path,
) -> Profile:
    table = f"[profiles.{_toml_key(key)}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: {table}: expected a table, got {raw!r}")
    values = reader.table(raw, _PROFILE, f"{table} ")
    if values["profile_name"] != key:
        # Upstream asserts this too; the name is used for guests, registrations and files.
        raise ConfigError(
            f"{path}: {table} profile_name: must equal the table key {key!r},"
            f" got {values['profile_name']!r}"
        )
    for key_name in ("base_image", "rebuild_source_image"):
        if key_name in values:
            values[key_name] = config_dir / values[key_name]
    return Profile(**values, config_dir=profiles_path / key)


def _subtable(
    path: Path, raw: Mapping[str, Any], key: str, required: bool
) -> dict[str, Any] | None:
    if key not in raw:
        if required:
            raise ConfigError(f"{path}: [{key}]: required table is missing (it may be empty)")
        return None
    table = raw[key]
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [{key}]: expected a table, got {table!r}")
    return table


def _toml_key(key: str) -> str:
    """`key` as written in a TOML table header."""
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else '"' + key.replace('"', '\\"') + '"'


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        # tomllib's message ends with "(at line L, column C)".
        raise ConfigError(f"{path}: invalid TOML: {error}") from None


def _token(name: str, env: Mapping[str, str], source: object, dotenv_hint: Path) -> str:
    """A required secret from the environment. Messages never contain its value."""
    value = env.get(name)
    if value is None:
        raise ConfigError(f"{name} not defined (set it in the environment or in {dotenv_hint})")
    if not value:
        raise ConfigError(f"{name} is empty (set it in the environment or in {dotenv_hint})")
    if value in _PLACEHOLDER_TOKENS[name]:
        raise ConfigError(f"{name} must be changed: it still has the example value (in {source})")
    return value


# `.env`, parsed the way dotenvy (upstream's loader) does for the files people write.

_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_ENV_REFERENCE = re.compile(r"\$(?:\{([A-Za-z0-9_]+)\}|([A-Za-z0-9_]+))")
_ENV_ESCAPES = {"n": "\n", "t": "\t", "r": "\r"}


def _find_dotenv(config_dir: Path, cwd: Path) -> Path | None:
    for directory in (config_dir, cwd):
        if (directory / ".env").is_file():
            return directory / ".env"
    return None


def _read_dotenv(file: Path, environ: Mapping[str, str]) -> dict[str, str]:
    """The variables `file` defines. Syntax: `KEY=VALUE` lines, blank lines, `#` comments,
    an optional `export `, values unquoted (a ` #` starts a comment), in 'single quotes'
    (literal) or "double quotes" (backslash escapes). `$NAME` and `${NAME}` outside single
    quotes expand from `environ`, else from earlier lines. As with dotenvy, which sets each
    variable only if it is not set yet, the first definition of a name wins. Error messages
    give the line and name, never the value."""
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{file}: cannot read: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{file}: not valid UTF-8") from None
    values: dict[str, str] = {}

    def lookup(name: str) -> str:
        return environ.get(name, values.get(name, ""))

    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line.removeprefix("export ").lstrip()
        key, equals, rest = line.partition("=")
        key = key.strip()
        if not equals or not _ENV_KEY.fullmatch(key):
            raise ConfigError(f"{file}: line {number}: expected KEY=VALUE")
        try:
            value = _dotenv_value(rest.strip(), lookup)
        except ValueError as error:
            raise ConfigError(f"{file}: line {number}: {key}: {error}") from None
        values.setdefault(key, value)
    return values


def _dotenv_value(raw: str, lookup: Callable[[str], str]) -> str:
    if raw.startswith("'"):
        end = raw.find("'", 1)
        if end < 0:
            raise ValueError("unterminated single quote")
        value, rest = raw[1:end], raw[end + 1 :]
    else:
        value, rest = _dotenv_scan(raw, lookup)
    rest = rest.strip()
    if rest and not rest.startswith("#"):
        raise ValueError("unexpected text after the closing quote")
    return value


def _dotenv_scan(raw: str, lookup: Callable[[str], str]) -> tuple[str, str]:
    """Reads an unquoted or double-quoted value; returns it and the text after it."""
    quoted = raw.startswith('"')
    out: list[str] = []
    i = 1 if quoted else 0
    while i < len(raw):
        char = raw[i]
        if quoted and char == '"':
            return "".join(out), raw[i + 1 :]
        if not quoted and char == "#" and (i == 0 or raw[i - 1].isspace()):
            break
        if char == "\\" and i + 1 < len(raw):
            following = raw[i + 1]
            out.append(_ENV_ESCAPES.get(following, following) if quoted else following)
            i += 2
            continue
        reference = _ENV_REFERENCE.match(raw, i) if char == "$" else None
        if reference:
            out.append(lookup(reference[1] or reference[2]))
            i = reference.end()
            continue
        out.append(char)
        i += 1
    if quoted:
        raise ValueError("unterminated double quote")
    return "".join(out).rstrip(), ""


def _fits(needed: int, available: int) -> str:
    return "fits" if needed <= available else "does NOT fit"


def human_size(size: int) -> str:
    """Bytes in the largest binary unit that keeps at least 1, e.g. "16 GiB", "1.5 GiB"."""
    for unit, name in (
        (2**50, "PiB"),
        (2**40, "TiB"),
        (2**30, "GiB"),
        (2**20, "MiB"),
        (2**10, "KiB"),
    ):
        if size >= unit:
            whole, remainder = divmod(size, unit)
            return f"{whole} {name}" if not remainder else f"{size / unit:.1f} {name}"
    return f"{size} B"
