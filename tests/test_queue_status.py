"""`monitor queue-status` (monitor/cli.py) as an operator runs it (`python -m monitor`),
against the queue's views served by waitress over a fake engine: the table, --json, and its
one-line errors."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from monitor import cli
from monitor import config as config_module
from monitor.errors import ConfigError
from monitor.errors import MonitorError
from monitor.main import build_parser
from monitor.queue import views
from monitor.serving import BackgroundServer
from tests.support.configs import write_config
from tests.support.daemons import free_port
from tests.support.daemons import monitor
from tests.support.queue_views import MEMBER_A
from tests.support.queue_views import MEMBER_B
from tests.support.queue_views import FakeEngine
from tests.support.queue_views import entry
from tests.support.queue_views import member
from tests.support.queue_views import snapshot
from tests.support.queue_views import view_app

LINUX = "servo-ubuntu2204"


def queue_config(root: Path, port: int | None, extra: str = "") -> Path:
    listen = "" if port is None else f"listen_port = {port}\n"
    return write_config(
        root, extra=f'[queue]\nservers = ["{MEMBER_A}", "{MEMBER_B}"]\n{listen}{extra}'
    )


@pytest.fixture
def queue(tmp_path):
    """The queue's views on a free port and a config whose `[queue] listen_port` is it."""
    engine = FakeEngine(
        snapshot(
            [
                entry(
                    "aaaa-1",
                    seq=1,
                    count=2,
                    run_id="11",
                    enqueued=-75.0,
                    state="reserving",
                    reserved={MEMBER_A: [4]},
                ),
                entry(
                    "bbbb-2", seq=2, repo="servo/webrender", run_id="22", enqueued=5.0, priority=3
                ),
            ],  # fmt: skip
            [
                member(MEMBER_A, **{LINUX: (1, 2, 2), "servo-windows10": (0, 1, 1)}),
                member(MEMBER_B, fresh=False, polled=None, error="connection refused"),
            ],
            outcomes={"served": 7, "refused": 1},
        )
    )
    app, _ = view_app(engine)
    server = BackgroundServer(app, name="queue-status-http")
    try:
        yield engine, queue_config(tmp_path, int(server.port)), tmp_path
    finally:
        server.close()


def test_queue_status_prints_entries_in_order_then_members(queue):
    _, path, root = queue

    result = monitor("queue-status", "--config", str(path), cwd=root)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "taken at  2025-03-01T12:00:10+00:00"
    assert lines[1] == "outcomes  served 7, expired 0, refused 1, failed 0"
    table = lines[3:6]
    assert table[0].split() == ["POS", "UNIQUE", "ID", "PROFILE", "COUNT", "REPO", "WAITING",
                                "STATE"]  # fmt: skip
    assert table[1].split() == ["1", "aaaa-1", LINUX, "2", "servo/servo", "#11", "85s",
                                "reserving"]  # fmt: skip
    assert table[2].split() == ["2", "bbbb-2", LINUX, "1", "servo/webrender", "#22", "5s",
                                "waiting", "(priority", "3)"]  # fmt: skip
    members = lines[7:]
    assert members[0].split() == ["MEMBER", "DATA", "PROFILE", "IDLE", "HEALTHY", "TARGET"]
    assert members[1].split() == [MEMBER_A, "fresh", LINUX, "1", "2", "2"]
    assert members[2].split() == [MEMBER_A, "fresh", "servo-windows10", "0", "1", "1"]
    assert members[3].split() == [MEMBER_B, "STALE", "(connection", "refused)"]


def test_queue_status_json_is_the_queues_json(queue):
    engine, path, root = queue
    result = monitor("queue-status", "--config", str(path), "--json", cwd=root)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == views.snapshot_json(engine.current)


def test_queue_status_reports_a_queue_that_cannot_answer(queue):
    engine, path, root = queue
    engine.failure = MonitorError("the queue's store is unreachable", 503)
    args = cli_args("queue-status", "--config", str(path))
    out, err = io.StringIO(), io.StringIO()
    assert cli.main(args, out, err) == cli.EXIT_FAILED
    assert out.getvalue() == ""
    assert err.getvalue() == (
        "monitor queue-status: the queue answered 503: the queue's store is unreachable\n"
    )


def test_queue_status_reports_a_queue_that_is_down(tmp_path):
    port = free_port()
    path = queue_config(tmp_path, port)
    result = monitor("queue-status", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 1
    line = result.stderr.strip()
    assert line.startswith(
        f"monitor queue-status: cannot reach the queue at http://127.0.0.1:{port}"
    )
    assert "connection refused" in line and "Traceback" not in result.stderr


def test_queue_port_defaults_to_upstreams_8002(tmp_path):
    path = queue_config(tmp_path, None)
    config = config_module.load(path, environ={})
    assert cli.queue_port(config, path) == 8002
    args = cli_args("queue-status", "--config", str(path))
    assert cli._client(args).base_url == "http://127.0.0.1:8002"


@pytest.mark.parametrize("value", ['"8002"', "0", "70000", "true"])
def test_a_bad_queue_port_names_file_table_and_key(tmp_path, value):
    path = write_config(
        tmp_path, extra=f'[queue]\nservers = ["{MEMBER_A}"]\nlisten_port = {value}\n'
    )
    result = monitor("queue-status", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert str(path) in result.stderr and "[queue] listen_port" in result.stderr
    assert "Traceback" not in result.stderr


def cli_args(*argv: str):
    return build_parser().parse_args(argv)


def test_queue_port_from_a_config_that_carries_it(tmp_path):
    # Once Config carries `[queue] listen_port` (as `queue_listen_port`), that value is used.
    path = queue_config(tmp_path, None)
    assert cli.queue_port(SimpleNamespace(queue_listen_port=8123), path) == 8123
    with pytest.raises(ConfigError, match=r"\[queue\] listen_port"):
        cli.queue_port(SimpleNamespace(queue_listen_port="x"), path)
