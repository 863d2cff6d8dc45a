"""The `[queue]` table: defaults, the store it derives, and every bad value naming the file,
the table and the key."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from monitor import config
from monitor.errors import ConfigError
from tests.support.configs import MINIMAL_CONFIG
from tests.support.daemons import monitor as run_monitor

UPSTREAM = Path(__file__).parent / "fixtures" / "upstream"
TOKENS = {"SERVO_CI_MONITOR_API_TOKEN": "api-s3cret-7f2a", "GITHUB_TOKEN": "ghp_s3cretGitHub91"}

# Top-level keys, then the tables (a case appends its [queue] table).
MINIMAL = 'data_path = "state"\n' + MINIMAL_CONFIG
SERVERS = 'servers = ["https://ci0.servo.org", "http://127.0.0.1:8000/"]\n'


def load(tmp_path: Path, queue: str, top: str = "") -> config.Config:
    path = tmp_path / "monitor.toml"
    path.write_text(top + MINIMAL + "\n[queue]\n" + queue)
    return config.load(path, environ=TOKENS, cwd=tmp_path)


def error(tmp_path: Path, queue: str, top: str = "") -> str:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, queue, top)
    return str(caught.value)


def test_defaults(tmp_path: Path) -> None:
    loaded = load(tmp_path, SERVERS)

    assert loaded.queue == config.QueueConfig(
        servers=("https://ci0.servo.org", "http://127.0.0.1:8000"),
        store_url=f"sqlite:///{tmp_path}/state/queue.sqlite3",
        listen_port=8002,
        database_url=None,
        repository_priority={},
    )
    assert loaded.queue_servers == loaded.queue.servers
    assert loaded.warnings == ()


def test_no_table_no_queue(tmp_path: Path) -> None:
    path = tmp_path / "monitor.toml"
    path.write_text(MINIMAL)

    assert config.load(path, environ=TOKENS, cwd=tmp_path).queue is None


def test_every_key(tmp_path: Path) -> None:
    loaded = load(
        tmp_path,
        SERVERS
        + "listen_port = 9002\n"
        + 'database_url = "postgresql://queue@db.example:5433/queue?sslmode=require"\n'
        + '[queue.repository_priority]\n"servo/servo" = 10\n"servo/media" = -1\n',
    )

    assert loaded.queue is not None
    assert loaded.queue.listen_port == 9002
    assert loaded.queue.database_url == "postgresql://queue@db.example:5433/queue?sslmode=require"
    assert loaded.queue.store_url == loaded.queue.database_url
    assert loaded.queue.repository_priority == {"servo/servo": 10, "servo/media": -1}
    assert "queue: served on port 9002 for 2 member(s), entries in PostgreSQL" in (
        config.summary(loaded)
    )


@pytest.mark.parametrize(
    "url",
    ["postgres://db/queue", "postgresql:///queue?host=/run/postgresql", "postgresql://h:1/q"],
)
def test_postgresql_urls(tmp_path: Path, url: str) -> None:
    loaded = load(tmp_path, SERVERS + f'database_url = "{url}"\n')

    assert loaded.queue is not None and loaded.queue.store_url == url


@pytest.mark.parametrize(
    ("queue", "expected"),
    [
        ("", "[queue] servers: required key is missing"),
        ('servers = "https://ci0.servo.org"\n', "[queue] servers: expected an array of URLs"),
        ('servers = ["ftp://x"]\n', "[queue] servers: expected an http:// or https:// URL"),
        (SERVERS + "listen_port = 0\n", "[queue] listen_port: expected a port number"),
        (SERVERS + 'listen_port = "8002"\n', "[queue] listen_port: expected a port number"),
        (SERVERS + "listen_port = 8000\n", "[queue] listen_port: 8000 is the monitor's own"),
        (
            SERVERS + 'database_url = "sqlite:///x.db"\n',
            "[queue] database_url: expected a postgresql:// (or postgres://) URL",
        ),
        (
            SERVERS + 'database_url = "mysql://db/q"\n',
            "[queue] database_url: expected a postgresql://",
        ),
        (SERVERS + "database_url = 5\n", "[queue] database_url: expected a string"),
        (
            SERVERS + 'database_url = "postgresql://db"\n',
            "[queue] database_url: expected a database",
        ),
        (
            SERVERS + 'database_url = "postgresql://queue:hunter2@db/queue"\n',
            "[queue] database_url: a password in the URL is refused",
        ),
        (
            SERVERS + "repository_priority = 3\n",
            '[queue] repository_priority: expected a table of "owner/repo" = integer',
        ),
        (
            SERVERS + "[queue.repository_priority]\nservo = 1\n",
            "[queue] repository_priority: expected keys of the form \"owner/repo\", got 'servo'",
        ),
        (
            SERVERS + '[queue.repository_priority]\n"servo/servo" = "high"\n',
            "[queue] repository_priority: servo/servo: expected an integer",
        ),
        (
            SERVERS + '[queue.repository_priority]\n"servo/servo" = true\n',
            "[queue] repository_priority: servo/servo: expected an integer",
        ),
        (
            SERVERS + '[queue.repository_priority]\n"servo/servo" = 1.5\n',
            "[queue] repository_priority: servo/servo: expected an integer",
        ),
        (
            SERVERS + '[queue.repository_priority]\n"servo/servo" = 10000000000\n',
            "[queue] repository_priority: servo/servo: expected an integer from",
        ),
    ],
)
def test_bad_values_name_file_table_and_key(tmp_path: Path, queue: str, expected: str) -> None:
    message = error(tmp_path, queue)

    assert message.startswith(f"{tmp_path / 'monitor.toml'}: "), message
    assert expected in message, message
    assert "hunter2" not in message


def test_the_queue_port_may_match_a_moved_monitor_port(tmp_path: Path) -> None:
    loaded = load(tmp_path, SERVERS + "listen_port = 8000\n", top="listen_port = 8001\n")

    assert loaded.queue is not None and loaded.queue.listen_port == 8000


def test_monitor_port_clash_with_the_default(tmp_path: Path) -> None:
    assert "[queue] listen_port: 8002 is the monitor's own" in error(
        tmp_path, SERVERS, top="listen_port = 8002\n"
    )


def test_unknown_queue_keys_are_warnings(tmp_path: Path) -> None:
    loaded = load(tmp_path, SERVERS + "retries = 3\n")

    assert loaded.warnings == (
        f"{tmp_path / 'monitor.toml'}: unknown key [queue] retries (ignored)",
    )


def test_upstream_production_config_serves_the_queue(tmp_path: Path) -> None:
    shutil.copy(UPSTREAM / "server-ci0" / "monitor.toml", tmp_path / "monitor.toml")

    loaded = config.load(tmp_path / "monitor.toml", environ=TOKENS, cwd=tmp_path)

    assert loaded.queue is not None
    assert loaded.queue.servers == tuple(f"https://ci{n}.servo.org" for n in range(5))
    assert loaded.queue.listen_port == 8002
    assert loaded.queue.store_url.startswith("sqlite:///") and loaded.queue.store_url.endswith(
        "/queue.sqlite3"
    )
    assert loaded.warnings == ()


def test_check_config_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "monitor.toml"
    path.write_text(MINIMAL + '\n[queue]\nservers = []\ndatabase_url = "sqlite:///q"\n')
    (tmp_path / ".env").write_text("".join(f"{k}={v}\n" for k, v in TOKENS.items()))

    done = run_monitor("check-config", "--config", str(path))

    assert done.returncode == 2
    assert f"{path}: [queue] database_url: expected a postgresql://" in done.stderr
