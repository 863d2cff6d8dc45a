"""Tests for monitor.config: upstream's files load unchanged, every bad value names its key."""

from __future__ import annotations

import dataclasses
import shutil
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest

from monitor import config
from monitor.errors import ConfigError
from tests.support.configs import MINIMAL_CONFIG

UPSTREAM = Path(__file__).parent / "fixtures" / "upstream"
API_TOKEN = "api-s3cret-7f2a"
GITHUB_TOKEN = "ghp_s3cretGitHub91"
TOKENS = {"SERVO_CI_MONITOR_API_TOKEN": API_TOKEN, "GITHUB_TOKEN": GITHUB_TOKEN}
TOKENS_DOTENV = f"GITHUB_TOKEN={GITHUB_TOKEN}\nSERVO_CI_MONITOR_API_TOKEN={API_TOKEN}\n"

# Top-level keys must come before the first table, so cases prepend them.
MINIMAL = MINIMAL_CONFIG


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    """The config file's directory."""
    (tmp_path / "etc").mkdir()
    return tmp_path / "etc"


@pytest.fixture
def cwd(tmp_path: Path) -> Path:
    """A working directory apart from the config's, empty unless a test writes a .env."""
    (tmp_path / "cwd").mkdir()
    return tmp_path / "cwd"


def write(directory: Path, text: str, dotenv: str | None = None) -> Path:
    (directory / "monitor.toml").write_text(text)
    if dotenv is not None:
        (directory / ".env").write_text(dotenv)
    return directory / "monitor.toml"


def load_text(etc: Path, cwd: Path, text: str, **environ: str) -> config.Config:
    return config.load(write(etc, text), environ={**TOKENS, **environ}, cwd=cwd)


def load_error(etc: Path, cwd: Path, text: str, **environ: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_text(etc, cwd, text, **environ)
    return str(caught.value)


# Upstream's own files


def test_upstream_example_loads_unchanged(etc: Path, cwd: Path) -> None:
    shutil.copy(UPSTREAM / "monitor.toml.example", etc / "monitor.toml")
    (etc / ".env").write_text(TOKENS_DOTENV)

    loaded = config.load(etc / "monitor.toml", environ={}, cwd=cwd)

    assert loaded.listen_on == ("::1", "192.168.100.1")
    assert loaded.external_base_url == "http://[::1]:8000/"
    assert loaded.github_api_scope == "/repos/delan/servo"
    assert loaded.allowed_qualified_repo_prefix == "delan/"
    assert loaded.github_api_suffix == "host"
    assert loaded.monitor_poll_interval == timedelta(seconds=5)
    assert loaded.api_cache_timeout == timedelta(seconds=30)
    assert loaded.tokenless_select_artifact_max_age == timedelta(seconds=300)
    assert loaded.monitor_start_timeout == timedelta(seconds=120)
    assert loaded.monitor_reserve_timeout == timedelta(seconds=60)
    assert loaded.monitor_thread_send_timeout == timedelta(seconds=10)
    assert loaded.monitor_thread_recv_timeout == timedelta(seconds=10)
    assert loaded.main_repo_path == Path("/home/me/servo")
    assert loaded.base_image_max_age == timedelta(days=1)
    assert loaded.available_1g_hugepages == 96
    # Real GiB: upstream read "16G" as 16 KiB.
    assert loaded.available_normal_memory == 17179869184
    assert (loaded.destroy_all_non_busy_runners, loaded.dont_create_runners) == (False, False)
    assert (loaded.dont_register_runners, loaded.dont_update_cached_servo_repo) == (False, False)
    assert loaded.queue_member is False
    assert loaded.queue_servers is None
    assert loaded.libvirt_runner_guest_prefix == "ci-runner"
    assert loaded.libvirt_template_guest_prefix == "ci-template"
    assert loaded.libvirt_rebuild_guest_prefix == "ci-rebuild"
    assert (loaded.api_token, loaded.github_token) == (API_TOKEN, GITHUB_TOKEN)
    assert loaded.warnings == ()
    assert list(loaded.profiles) == [
        "servo-windows10",
        "servo-macos13",
        "servo-macos14",
        "servo-macos15",
        "servo-ubuntu2204",
        "servo-ubuntu2204-bench",
        "servo-ubuntu2204-wpt",
        "base-ubuntu2204",
    ]
    assert loaded.profiles["base-ubuntu2204"] == config.Profile(
        profile_name="base-ubuntu2204",
        github_runner_label="self-hosted-image:base-ubuntu2204",
        target_count=1,
        requires_1g_hugepages=12,
        requires_normal_memory=2**30,
        image_type="Rust",
        base_image=None,
        config_dir=etc / ".." / "profiles" / "base-ubuntu2204",
    )
    assert loaded.profiles["servo-ubuntu2204-wpt"].requires_1g_hugepages == 48


def test_upstream_production_config_loads_unchanged(etc: Path, cwd: Path) -> None:
    shutil.copy(UPSTREAM / "server-ci0" / "monitor.toml", etc / "monitor.toml")
    (etc / ".env").write_text(TOKENS_DOTENV)

    loaded = config.load(etc / "monitor.toml", environ={}, cwd=cwd)

    assert loaded.external_base_url == "https://ci0.servo.org/"
    assert loaded.github_api_scope == "/orgs/servo"
    assert loaded.github_api_suffix == "ci0"
    assert loaded.base_image_max_age == timedelta(days=7)
    assert loaded.main_repo_path == Path("/root/servo")
    assert loaded.queue_member is True
    assert loaded.queue_servers == tuple(f"https://ci{n}.servo.org" for n in range(5))
    targets = {name: p.target_count for name, p in loaded.profiles.items()}
    assert targets == {"servo-windows10": 1, "servo-ubuntu2204": 3, "servo-ubuntu2204-wpt": 0}
    assert loaded.warnings == ()


def test_upstream_env_example_is_refused_until_its_tokens_are_changed(etc: Path, cwd: Path) -> None:
    path = write(etc, MINIMAL, dotenv=(UPSTREAM / "env.example").read_text())

    with pytest.raises(ConfigError, match="SERVO_CI_MONITOR_API_TOKEN must be changed"):
        config.load(path, environ={}, cwd=cwd)
    with pytest.raises(ConfigError, match="GITHUB_TOKEN must be changed"):
        config.load(path, environ={"SERVO_CI_MONITOR_API_TOKEN": API_TOKEN}, cwd=cwd)
    # With real tokens from the environment, the rest of the example is used.
    loaded = config.load(path, environ=TOKENS, cwd=cwd)
    assert loaded.libvirt_uri == "qemu:///system"


# .env and the environment


def test_dotenv_beside_the_config_is_preferred_over_the_working_directory(
    etc: Path, cwd: Path
) -> None:
    (cwd / ".env").write_text("GITHUB_TOKEN=from-cwd\nSERVO_CI_MONITOR_API_TOKEN=from-cwd\n")
    path = write(etc, MINIMAL, dotenv=TOKENS_DOTENV)

    loaded = config.load(path, environ={}, cwd=cwd)

    assert (loaded.api_token, loaded.github_token) == (API_TOKEN, GITHUB_TOKEN)


def test_dotenv_is_read_from_the_working_directory_when_none_is_beside_the_config(
    etc: Path, cwd: Path
) -> None:
    (cwd / ".env").write_text("GITHUB_TOKEN=from-cwd\nSERVO_CI_MONITOR_API_TOKEN=from-cwd\n")

    loaded = config.load(write(etc, MINIMAL), environ={}, cwd=cwd)

    assert (loaded.api_token, loaded.github_token) == ("from-cwd", "from-cwd")


def test_environment_wins_over_dotenv(etc: Path, cwd: Path) -> None:
    dotenv = TOKENS_DOTENV + "LIBVIRT_DEFAULT_URI=qemu:///session\n"
    path = write(etc, MINIMAL, dotenv=dotenv)

    loaded = config.load(
        path,
        environ={
            "SERVO_CI_MONITOR_API_TOKEN": "from-env",
            "LIBVIRT_DEFAULT_URI": "test:///default",
        },
        cwd=cwd,
    )

    assert loaded.api_token == "from-env"
    assert loaded.github_token == GITHUB_TOKEN
    assert loaded.libvirt_uri == "test:///default"


@pytest.mark.parametrize(
    ("dotenv", "expected"),
    [
        ("T=abc", "abc"),
        ("export T=abc", "abc"),
        ("# comment\n\n  T = abc   # trailing comment", "abc"),
        ("T=a#b", "a#b"),
        ("T='a b # $HOME \\n'", "a b # $HOME \\n"),
        ('T="a \\"b\\" # c\\nd" # comment', 'a "b" # c\nd'),
        ("BASE=xyz\nT=${BASE}-1", "xyz-1"),
        ('BASE=xyz\nT="$BASE/2"', "xyz/2"),
        ("T=\\$BASE", "$BASE"),
        ("T=first\nT=second", "first"),
    ],
)
def test_dotenv_syntax(etc: Path, cwd: Path, dotenv: str, expected: str) -> None:
    dotenv = dotenv.replace("T=", "SERVO_CI_MONITOR_API_TOKEN=").replace(
        "T =", "SERVO_CI_MONITOR_API_TOKEN ="
    )
    path = write(etc, MINIMAL, dotenv=f"GITHUB_TOKEN={GITHUB_TOKEN}\n{dotenv}\n")

    assert config.load(path, environ={}, cwd=cwd).api_token == expected


def test_dotenv_expansion_prefers_the_environment(etc: Path, cwd: Path) -> None:
    path = write(etc, MINIMAL, dotenv=f"{TOKENS_DOTENV}BASE=file\nIMAGE_DEPS_DIR=/x/$BASE\n")

    loaded = config.load(path, environ={"BASE": "env"}, cwd=cwd)

    assert loaded.image_deps_dir == Path("/x/env")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (f'SERVO_CI_MONITOR_API_TOKEN="{API_TOKEN}', "line 2: SERVO_CI_MONITOR_API_TOKEN"),
        (f"SERVO_CI_MONITOR_API_TOKEN='{API_TOKEN}", "line 2: SERVO_CI_MONITOR_API_TOKEN"),
        (f'SERVO_CI_MONITOR_API_TOKEN="{API_TOKEN}" x', "line 2: SERVO_CI_MONITOR_API_TOKEN"),
        (API_TOKEN, "line 2: expected KEY=VALUE"),
        (f"BAD KEY={API_TOKEN}", "line 2: expected KEY=VALUE"),
    ],
)
def test_malformed_dotenv_names_file_and_line_but_not_the_value(
    etc: Path, cwd: Path, line: str, expected: str
) -> None:
    path = write(etc, MINIMAL, dotenv=f"GITHUB_TOKEN={GITHUB_TOKEN}\n{line}\n")

    with pytest.raises(ConfigError) as caught:
        config.load(path, environ={}, cwd=cwd)

    assert str(caught.value).startswith(f"{etc / '.env'}: {expected}")
    assert API_TOKEN not in str(caught.value)


# Tokens


def test_missing_api_token_names_where_to_set_it(etc: Path, cwd: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        config.load(write(etc, MINIMAL), environ={"GITHUB_TOKEN": GITHUB_TOKEN}, cwd=cwd)

    assert str(caught.value) == (
        f"SERVO_CI_MONITOR_API_TOKEN not defined (set it in the environment or in {etc}/.env)"
    )


def test_missing_github_token_is_an_error(etc: Path, cwd: Path) -> None:
    environ = {"SERVO_CI_MONITOR_API_TOKEN": API_TOKEN}

    with pytest.raises(ConfigError) as caught:
        config.load(write(etc, MINIMAL), environ=environ, cwd=cwd)

    assert str(caught.value) == (
        f"GITHUB_TOKEN not defined (set it in the environment or in {etc}/.env)"
    )


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("SERVO_CI_MONITOR_API_TOKEN", "ChangeMe", "SERVO_CI_MONITOR_API_TOKEN must be changed"),
        ("SERVO_CI_MONITOR_API_TOKEN", "", "SERVO_CI_MONITOR_API_TOKEN is empty"),
        ("GITHUB_TOKEN", "ChangeMe", "GITHUB_TOKEN must be changed"),
        ("GITHUB_TOKEN", "", "GITHUB_TOKEN is empty"),
    ],
)
def test_placeholder_or_empty_token_is_refused(
    etc: Path, cwd: Path, name: str, value: str, expected: str
) -> None:
    with pytest.raises(ConfigError, match=expected):
        config.load(write(etc, MINIMAL), environ={**TOKENS, name: value}, cwd=cwd)


def test_secrets_stay_out_of_repr_and_summary(etc: Path, cwd: Path) -> None:
    loaded = load_text(etc, cwd, MINIMAL)

    for text in (repr(loaded), str(loaded), config.summary(loaded)):
        assert API_TOKEN not in text
        assert GITHUB_TOKEN not in text
    assert "github_api_suffix='ci9'" in repr(loaded)


# Defaults, precedence and paths


def test_optional_keys_take_their_defaults(etc: Path, cwd: Path) -> None:
    loaded = load_text(etc, cwd, MINIMAL)

    assert loaded.listen_on == ("127.0.0.1",)
    assert loaded.listen_port == 8000
    assert loaded.external_base_url == "http://127.0.0.1:8000/"
    assert loaded.allowed_qualified_repo_prefix is None
    assert loaded.main_repo_path is None
    assert loaded.tokenless_select_artifact_max_age == timedelta(seconds=300)
    assert loaded.monitor_thread_send_timeout == timedelta(seconds=10)
    assert loaded.monitor_thread_recv_timeout == timedelta(seconds=10)
    assert loaded.monitor_poll_interval == timedelta(seconds=5)
    assert loaded.api_cache_timeout == timedelta(seconds=30)
    assert loaded.monitor_start_timeout == timedelta(seconds=120)
    assert loaded.monitor_reserve_timeout == timedelta(seconds=60)
    assert loaded.base_image_max_age == timedelta(seconds=86400)
    assert loaded.github_api_url == "https://api.github.com"
    assert loaded.libvirt_uri is None
    assert loaded.libvirt_storage_pool == "default"
    assert loaded.image_deps_dir is None
    assert loaded.queue_servers is None
    assert loaded.profiles["linux"].image_type == "Rust"
    assert loaded.profiles["linux"].base_image is None


def test_external_base_url_default_follows_listen_port(etc: Path, cwd: Path) -> None:
    loaded = load_text(etc, cwd, "listen_port = 8123\n" + MINIMAL)

    assert loaded.external_base_url == "http://127.0.0.1:8123/"


def test_new_keys_are_read(etc: Path, cwd: Path) -> None:
    extra = (
        'github_api_url = "http://127.0.0.1:9000/api/"\n'
        'libvirt_storage_pool = "ci"\n'
        'allowed_qualified_repo_prefix = "servo/"\n'
    )
    loaded = load_text(
        etc, cwd, extra + MINIMAL + "[queue]\nservers = ['https://ci0.servo.org/']\n"
    )

    assert loaded.github_api_url == "http://127.0.0.1:9000/api"
    assert loaded.libvirt_storage_pool == "ci"
    assert loaded.allowed_qualified_repo_prefix == "servo/"
    assert loaded.queue_servers == ("https://ci0.servo.org",)


@pytest.mark.parametrize(
    ("destroy", "dont_create", "expected"),
    [
        (None, None, False),
        ("true", None, True),
        ("false", None, False),
        ("true", "false", False),
        (None, "true", True),
    ],
)
def test_dont_create_runners_defaults_to_destroy_all_non_busy_runners(
    etc: Path, cwd: Path, destroy: str | None, dont_create: str | None, expected: bool
) -> None:
    extra = ""
    if destroy is not None:
        extra += f"destroy_all_non_busy_runners = {destroy}\n"
    if dont_create is not None:
        extra += f"dont_create_runners = {dont_create}\n"

    assert load_text(etc, cwd, extra + MINIMAL).dont_create_runners is expected


def test_data_path_precedence(etc: Path, cwd: Path) -> None:
    assert load_text(etc, cwd, MINIMAL).data_path == etc / "data"
    from_env = load_text(etc, cwd, MINIMAL, SERVO_CI_MONITOR_DATA_PATH="/var/lib/monitor")
    assert from_env.data_path == Path("/var/lib/monitor")
    from_key = load_text(
        etc, cwd, 'data_path = "state"\n' + MINIMAL, SERVO_CI_MONITOR_DATA_PATH="/var/lib/monitor"
    )
    assert from_key.data_path == etc / "state"


def test_libvirt_uri_precedence(etc: Path, cwd: Path) -> None:
    assert load_text(etc, cwd, MINIMAL).libvirt_uri is None
    from_env = load_text(etc, cwd, MINIMAL, LIBVIRT_DEFAULT_URI="qemu:///system")
    assert from_env.libvirt_uri == "qemu:///system"
    from_key = load_text(
        etc,
        cwd,
        'libvirt_uri = "test:///default"\n' + MINIMAL,
        LIBVIRT_DEFAULT_URI="qemu:///system",
    )
    assert from_key.libvirt_uri == "test:///default"


def test_profiles_path_precedence(etc: Path, cwd: Path) -> None:
    default = load_text(etc, cwd, MINIMAL)
    assert default.profiles_path == etc / ".." / "profiles"
    from_env = load_text(etc, cwd, MINIMAL, LIB_MONITOR_DIR="/nix/store/x/lib/monitor")
    assert from_env.profiles_path == Path("/nix/store/x/lib/monitor/profiles")
    from_key = load_text(
        etc, cwd, 'profiles_path = "p"\n' + MINIMAL, LIB_MONITOR_DIR="/nix/store/x/lib/monitor"
    )
    assert from_key.profiles_path == etc / "p"
    assert from_key.profiles["linux"].config_dir == etc / "p" / "linux"
    assert from_key.profiles["linux"].guest_xml == etc / "p" / "linux" / "guest.xml"


def test_relative_paths_resolve_against_the_config_directory(etc: Path, cwd: Path) -> None:
    text = 'main_repo_path = "servo"\n' + MINIMAL + 'base_image = "images/linux.qcow2"\n'

    loaded = load_text(
        etc,
        cwd,
        text,
        SERVO_CI_MONITOR_DATA_PATH="var",
        IMAGE_DEPS_DIR="deps",
        LIB_MONITOR_DIR="lib",
    )

    assert loaded.main_repo_path == etc / "servo"
    assert loaded.data_path == etc / "var"
    assert loaded.image_deps_dir == etc / "deps"
    assert loaded.profiles_path == etc / "lib" / "profiles"
    assert loaded.profiles["linux"].base_image == etc / "images" / "linux.qcow2"


def test_relative_config_path_is_taken_from_cwd(tmp_path: Path) -> None:
    write(tmp_path, MINIMAL)

    loaded = config.load(Path("monitor.toml"), environ=TOKENS, cwd=tmp_path)

    assert loaded.path == tmp_path / "monitor.toml"
    assert loaded.data_path == tmp_path / "data"


# Profiles


def test_any_profile_name_works_and_file_order_is_kept(etc: Path, cwd: Path) -> None:
    extra = """
[profiles."zz-fedora_41.x"]
profile_name = "zz-fedora_41.x"
github_runner_label = "fedora"
target_count = 0
requires_1g_hugepages = 0
requires_normal_memory = "512M"
image_type = "Rust"
"""
    loaded = load_text(etc, cwd, MINIMAL + extra)

    assert list(loaded.profiles) == ["linux", "zz-fedora_41.x"]
    assert loaded.profiles["zz-fedora_41.x"].requires_normal_memory == 512 * 2**20


def test_profiles_table_may_be_empty(etc: Path, cwd: Path) -> None:
    text = MINIMAL.split("[profiles.linux]")[0] + "[profiles]\n"

    assert load_text(etc, cwd, text).profiles == {}


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ("0B", 0),
        ("512B", 512),
        ("1K", 1024),
        ("3 M", 3 * 2**20),
        ("16G", 16 * 2**30),
        ("2T", 2 * 2**40),
        ("1P", 2**50),
    ],
)
def test_memory_sizes_use_binary_units(etc: Path, cwd: Path, size: str, expected: int) -> None:
    text = MINIMAL.replace('available_normal_memory = "16G"', f'available_normal_memory = "{size}"')

    assert load_text(etc, cwd, text).available_normal_memory == expected


def test_config_is_frozen(etc: Path, cwd: Path) -> None:
    loaded = load_text(etc, cwd, MINIMAL)

    with pytest.raises(dataclasses.FrozenInstanceError):
        loaded.listen_port = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        loaded.profiles["linux"].target_count = 1  # type: ignore[misc]


# Unknown keys and malformed configs


def test_unknown_keys_are_warnings_naming_them(etc: Path, cwd: Path) -> None:
    text = (
        "monitor_pol_interval = 5\n"
        + MINIMAL
        + "colour = 'blue'\n[queue]\nservers = []\nretries = 3\n[chunker]\nport = 1\n"
    )

    loaded = load_text(etc, cwd, text)

    path = etc / "monitor.toml"
    assert loaded.warnings == (
        f"{path}: unknown key monitor_pol_interval (ignored)",
        f"{path}: unknown key chunker (ignored)",
        f"{path}: unknown key [queue] retries (ignored)",
        f"{path}: unknown key [profiles.linux] colour (ignored)",
    )
    assert loaded.queue_servers == ()


def _replace(old: str, new: str) -> str:
    assert old in MINIMAL
    return MINIMAL.replace(old, new)


MALFORMED = {
    "toml syntax": (_replace("target_count = 2", "target_count = "), ["line 9, column 16"]),
    "duplicate key": (MINIMAL + "target_count = 3\n", ["line 12"]),
    "string for int": (
        _replace("target_count = 2", 'target_count = "five"'),
        ["[profiles.linux] target_count: expected a non-negative integer, got 'five'"],
    ),
    "bool for int": (
        _replace("available_1g_hugepages = 96", "available_1g_hugepages = true"),
        [": available_1g_hugepages: expected a non-negative integer, got True"],
    ),
    "float for int": (
        _replace("requires_1g_hugepages = 24", "requires_1g_hugepages = 24.0"),
        ["[profiles.linux] requires_1g_hugepages:", "24.0"],
    ),
    "negative count": (
        _replace("target_count = 2", "target_count = -1"),
        ["[profiles.linux] target_count:", "-1"],
    ),
    "float duration": (
        "monitor_poll_interval = 1.5\n" + MINIMAL,
        [": monitor_poll_interval: expected a non-negative integer number of seconds, got 1.5"],
    ),
    "negative duration": ("base_image_max_age = -1\n" + MINIMAL, [": base_image_max_age:"]),
    "memory 16GB": (
        _replace('"16G"', '"16GB"'),
        [": available_normal_memory: expected a memory size", "'16GB'"],
    ),
    "memory 16g": (_replace('"16G"', '"16g"'), [": available_normal_memory:", "'16g'"]),
    "memory as integer": (
        _replace('requires_normal_memory = "1G"', "requires_normal_memory = 1024"),
        ["[profiles.linux] requires_normal_memory:", "1024"],
    ),
    "external_base_url without slash": (
        'external_base_url = "https://ci0.servo.org"\n' + MINIMAL,
        [": external_base_url: must end with '/'"],
    ),
    "profile_name differs from key": (
        _replace('profile_name = "linux"', 'profile_name = "windows"'),
        ["[profiles.linux] profile_name: must equal the table key 'linux', got 'windows'"],
    ),
    "missing top-level key": (
        _replace('github_api_suffix = "ci9"\n', ""),
        [": github_api_suffix: required key is missing"],
    ),
    "missing profile key": (
        _replace('requires_normal_memory = "1G"\n', ""),
        ["[profiles.linux] requires_normal_memory: required key is missing"],
    ),
    "missing profiles table": (
        MINIMAL.split("[profiles.linux]")[0],
        ["[profiles]: required table is missing"],
    ),
    "profile not a table": (
        MINIMAL.replace("[profiles.linux]", "[profiles]\nodd = 3\n[profiles.linux]"),
        ["[profiles.odd]: expected a table, got 3"],
    ),
    "bad github_api_scope": (
        _replace('"/orgs/servo"', '"servo"'),
        [": github_api_scope: expected '/repos/<owner>/<repo>' or '/orgs/<org>', got 'servo'"],
    ),
    "listen_port 70000": (
        "listen_port = 70000\n" + MINIMAL,
        [": listen_port: expected a port number from 1 to 65535, got 70000"],
    ),
    "listen_on not a list": ('listen_on = "::1"\n' + MINIMAL, [": listen_on:", "'::1'"]),
    "listen_on not an address": (
        'listen_on = ["localhost"]\n' + MINIMAL,
        [": listen_on: expected an IP address, got 'localhost'"],
    ),
    "image_type Docker": (
        MINIMAL + 'image_type = "Docker"\n',
        ["[profiles.linux] image_type:", "'Docker'"],
    ),
    "github_api_url not http": (
        'github_api_url = "ftp://example.com"\n' + MINIMAL,
        [": github_api_url: expected an http:// or https:// URL"],
    ),
    "queue servers not a list": (
        MINIMAL + '[queue]\nservers = "https://ci0.servo.org"\n',
        ["[queue] servers: expected an array of URLs"],
    ),
    "queue without servers": (MINIMAL + "[queue]\n", ["[queue] servers: required key is missing"]),
    "queue not a table": ("queue = 5\n" + MINIMAL, ["[queue]: expected a table, got 5"]),
    "unsafe profile name": (
        MINIMAL.replace("profiles.linux", 'profiles."../x"').replace('"linux"', '"../x"'),
        ['[profiles."../x"] profile_name: expected a name'],
    ),
    "suffix with @": (_replace('"ci9"', '"ci@9"'), [": github_api_suffix:", "'ci@9'"]),
    "bool as string": (
        'queue_member = "yes"\n' + MINIMAL,
        [": queue_member: expected true or false"],
    ),
    "empty runner label": (
        _replace('"self-hosted-image:linux"', '""'),
        ["[profiles.linux] github_runner_label: expected a non-empty string"],
    ),
}


@pytest.mark.parametrize(("text", "expected"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_config_names_file_table_and_key(
    etc: Path, cwd: Path, text: str, expected: list[str]
) -> None:
    message = load_error(etc, cwd, text)

    assert message.startswith(f"{etc / 'monitor.toml'}: ")
    for fragment in expected:
        assert fragment in message
    assert API_TOKEN not in message
    assert GITHUB_TOKEN not in message


def test_missing_config_file_is_named(etc: Path, cwd: Path) -> None:
    with pytest.raises(ConfigError, match="monitor.toml: cannot read"):
        config.load(etc / "monitor.toml", environ=TOKENS, cwd=cwd)


# summary()


def test_summary_lists_profiles_budget_and_warnings(etc: Path, cwd: Path) -> None:
    text = (
        "surprise = 1\n"
        + MINIMAL
        + 'base_image = "linux.qcow2"\n'
        + """
[profiles.windows]
profile_name = "windows"
github_runner_label = "self-hosted-image:windows"
target_count = 1
requires_1g_hugepages = 48
requires_normal_memory = "1536M"
"""
    )

    lines = config.summary(load_text(etc, cwd, text)).splitlines()

    assert (
        "  linux: label self-hosted-image:linux, target 2, per runner 24 1G hugepages (24 GiB)"
        f" and 1 GiB normal memory, base image {etc / 'linux.qcow2'}"
    ) in lines
    assert (
        "  windows: label self-hosted-image:windows, target 1, per runner 48 1G hugepages"
        " (48 GiB) and 1.5 GiB normal memory, image rebuilt (rolling)"
    ) in lines
    # 2×24 + 1×48 = 96 of 96; 2×1 GiB + 1.5 GiB = 3.5 GiB of 16 GiB.
    assert "  1G hugepages: 96 of 96 (fits)" in lines
    assert "  normal memory: 3.5 GiB of 16 GiB (fits)" in lines
    assert f"  {etc / 'monitor.toml'}: unknown key surprise (ignored)" in lines


def test_summary_reports_a_budget_that_does_not_fit(etc: Path, cwd: Path) -> None:
    text = _replace("target_count = 2", "target_count = 5").replace('"16G"', '"4G"')

    lines = config.summary(load_text(etc, cwd, "dont_create_runners = true\n" + text)).splitlines()

    assert "  1G hugepages: 120 of 96 (does NOT fit)" in lines
    assert "  normal memory: 5 GiB of 4 GiB (does NOT fit)" in lines
    assert "dont_create_runners: no runners are created (every target is 0)" in lines
    assert not any("warning" in line for line in lines)


def test_missing_profile_files_are_warned_about(tmp_path):
    from tests.support.configs import write_config

    path = write_config(tmp_path)
    (tmp_path / "base.img").unlink()
    (tmp_path / "profiles" / "windows" / "guest.xml").unlink()
    loaded = config.load(path, environ={})
    assert loaded.warnings == ()  # load reads only the config and .env
    warnings = config.file_warnings(loaded)
    assert any("[profiles.windows]" in w and "guest.xml" in w for w in warnings)
    assert any("[profiles.linux] base_image" in w for w in warnings)
    assert sum("[profiles.linux]" in w for w in warnings) == 1  # linux has its guest.xml


def test_trusted_proxies_and_take_max_count(tmp_path):
    import ipaddress

    from tests.support.configs import write_config

    path = write_config(
        tmp_path, extra='trusted_proxies = ["127.0.0.1", "10.0.0.0/8", "::1"]\ntake_max_count = 4\n'
    )
    loaded = config.load(path, environ={})
    assert ipaddress.ip_address("10.1.2.3") in loaded.trusted_proxies[1]
    assert len(loaded.trusted_proxies) == 3
    assert loaded.take_max_count == 4
    defaults = config.load(write_config(tmp_path / "d"), environ={})
    assert defaults.trusted_proxies == () and defaults.take_max_count == 32


@pytest.mark.parametrize(
    "line, key",
    [
        ('trusted_proxies = "127.0.0.1"', "trusted_proxies"),
        ('trusted_proxies = ["nginx.local"]', "trusted_proxies"),
        ("take_max_count = 0", "take_max_count"),
    ],
)
def test_bad_new_api_keys_are_named(tmp_path, line, key):
    from tests.support.configs import write_config

    path = write_config(tmp_path, extra=line + "\n")
    with pytest.raises(ConfigError, match=key):
        config.load(path, environ={})


def test_rebuild_keys_of_a_profile(tmp_path):
    from tests.support.configs import write_config

    extra_profile = textwrap.dedent(
        """
        [profiles.built]
        profile_name = "built"
        github_runner_label = "self-hosted-image:built"
        target_count = 1
        requires_1g_hugepages = 0
        requires_normal_memory = "1G"
        rebuild_mode = "drain"
        rebuild_timeout = 90
        rebuild_disk_size = "2G"
        rebuild_source_image = "cloud.img"
        """
    )
    path = write_config(tmp_path, targets={"linux": 1}, extra=extra_profile)
    built = config.load(path, environ={}).profiles["built"]
    assert built.base_image is None
    assert (built.rebuild_mode, built.rebuild_timeout) == ("drain", timedelta(seconds=90))
    assert built.rebuild_disk_size == 2 * 2**30
    assert built.rebuild_source_image == tmp_path / "cloud.img"
    linux = config.load(path, environ={}).profiles["linux"]
    assert (linux.rebuild_mode, linux.rebuild_timeout) == ("rolling", timedelta(seconds=2000))
    warnings = config.file_warnings(config.load(path, environ={}))
    assert any("[profiles.built] no boot-script" in w for w in warnings)
    assert any("rebuild_source_image" in w and "does not exist" in w for w in warnings)

    for bad, message in (
        ('rebuild_mode = "sometimes"', 'expected "rolling" or "drain"'),
        ("rebuild_timeout = 0", "positive number of seconds"),
        ('rebuild_disk_size = "lots"', "memory size"),
    ):
        line = bad.split(" =")[0]
        text = path.read_text()
        broken = "\n".join(bad if row.startswith(line) else row for row in text.splitlines())
        path.write_text(broken)
        with pytest.raises(ConfigError, match=f"\\[profiles.built\\] {line}: .*{message}"):
            config.load(path, environ={})
        path.write_text(text)


def test_tokenless_github_calls_per_hour(tmp_path):
    from tests.support.configs import write_config

    loaded = config.load(write_config(tmp_path, extra="tokenless_github_calls_per_hour = 50\n"), {})
    assert loaded.tokenless_github_calls_per_hour == 50
    defaults = config.load(write_config(tmp_path / "d"), environ={})
    assert defaults.tokenless_github_calls_per_hour == 1000
    for bad in ("0", "-1", '"1000"', "1.5", "true"):
        path = write_config(tmp_path / "bad", extra=f"tokenless_github_calls_per_hour = {bad}\n")
        with pytest.raises(ConfigError, match="tokenless_github_calls_per_hour"):
            config.load(path, environ={})


# What a config may not hold: a tokenless prefix that lets in anybody, GitHub's token over
# plain http, a secret in a URL; and no secret ever leaves through repr, summary or errors.


@pytest.mark.parametrize("prefix", ["", "servo"])
def test_a_prefix_without_a_slash_is_refused(etc: Path, cwd: Path, prefix: str) -> None:
    message = load_error(etc, cwd, f'allowed_qualified_repo_prefix = "{prefix}"\n' + MINIMAL)
    assert message.startswith(f"{etc / 'monitor.toml'}: allowed_qualified_repo_prefix: ")
    assert 'such as "servo/"' in message


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("http://api.github.example", False),
        ("http://10.0.0.5:8080/api", False),
        ("http://127.0.0.1:9000/api/", True),
        ("http://127.1.2.3", True),
        ("http://localhost:1", True),
        ("http://[::1]:8000", True),
        ("https://github.example/api/v3", True),
    ],
)
def test_github_api_url_is_https_unless_loopback(
    etc: Path, cwd: Path, url: str, allowed: bool
) -> None:
    text = f'github_api_url = "{url}"\n' + MINIMAL
    if allowed:
        assert load_text(etc, cwd, text).github_api_url == url.rstrip("/")
    else:
        message = load_error(etc, cwd, text)
        assert message.startswith(f"{etc / 'monitor.toml'}: github_api_url: plain http://")


PASSWORD = "leak-url-passw0rd"
SECRETS = {
    "GITHUB_TOKEN": "ghp_leakGitHubToken42",
    "SERVO_CI_MONITOR_API_TOKEN": "leak-api-token-42",
    "MONITOR_HMAC_SECRET_CI": "leak-hmac-secret-42",
}
SECRET_DOTENV = "".join(f"{name}={value}\n" for name, value in SECRETS.items())
TOKEN_HASH = "a3" * 32
BROKEN = {
    "github_api_url": f'github_api_url = "https://x-access-token:{PASSWORD}@api.github.com"\n'
    + MINIMAL,
    "github_api_url not http either": f'github_api_url = "ftp://u:{PASSWORD}@x"\n' + MINIMAL,
    "external_base_url": f'external_base_url = "http://admin:{PASSWORD}@monitor.example/"\n'
    + MINIMAL,
    "[queue] servers": MINIMAL + f'[queue]\nservers = ["https://{PASSWORD}@queue.example"]\n',
}
BROKEN_DOTENV = {
    "unterminated quote": f'GITHUB_TOKEN="{PASSWORD}\n',
    "text after a quote": f"GITHUB_TOKEN='{PASSWORD}' oops\n",
    "HMAC secret too short": f"MONITOR_HMAC_SECRET_X={PASSWORD[:8]}\n",
    "placeholder": "GITHUB_TOKEN=ChangeMe\n",
}


def test_no_secret_in_repr_summary_check_config_or_errors(
    etc: Path, cwd: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from monitor import main

    for name in SECRETS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(cwd)
    secrets = [*SECRETS.values(), PASSWORD, PASSWORD[:8], TOKEN_HASH]
    texts: dict[str, str] = {}

    path = write(etc, MINIMAL + f'[api_tokens]\nci = "{TOKEN_HASH}"\n', SECRET_DOTENV)
    loaded = config.load(path, environ={}, cwd=cwd)
    assert loaded.hmac_secrets == {"ci": SECRETS["MONITOR_HMAC_SECRET_CI"]}
    texts |= {"repr": repr(loaded), "str": str(loaded), "summary": config.summary(loaded)}
    assert main.check_config(path) == 0
    texts["check-config"] = "".join(capsys.readouterr())

    for case, text in BROKEN.items():
        texts[case] = load_error(etc, cwd, text)
        assert "user name or password" in texts[case], case
        assert main.check_config(write(etc, text)) == main.EXIT_CONFIG
        texts[f"check-config, {case}"] = "".join(capsys.readouterr())
    for case, dotenv in BROKEN_DOTENV.items():
        write(etc, MINIMAL, SECRET_DOTENV.replace("GITHUB_TOKEN=ghp_leakGitHubToken42\n", dotenv))
        with pytest.raises(ConfigError) as caught:
            config.load(etc / "monitor.toml", environ={}, cwd=cwd)
        texts[case] = str(caught.value)
        assert main.check_config(etc / "monitor.toml") == main.EXIT_CONFIG
        texts[f"check-config, {case}"] = "".join(capsys.readouterr())

    for where, text in texts.items():
        for secret in secrets:
            assert secret not in text, f"{where} shows a secret: {text}"
