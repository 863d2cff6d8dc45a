"""The command line, run as a real process: help, check-config, run + SIGTERM, demo."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from monitor.standin import GitHubStandIn
from tests.support.configs import write_config
from tests.support.constants import FIXTURES
from tests.support.constants import ROOT
from tests.support.daemons import Daemon
from tests.support.daemons import free_port
from tests.support.daemons import get_json
from tests.support.daemons import monitor
from tests.support.daemons import wait_for_json

ENV_FILE = "SERVO_CI_MONITOR_API_TOKEN=changed\nGITHUB_TOKEN=ghp_test\n"


def test_bare_monitor_prints_help():
    result = monitor()
    assert result.returncode == 0
    for command in ("run", "check-config", "demo"):
        assert command in result.stdout


def test_launcher_script_works_the_same():
    result = subprocess.run(
        [sys.executable, "monitor.py", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0
    assert "check-config" in result.stdout


@pytest.mark.parametrize(
    "config", ["monitor.toml.example", "server-ci0/monitor.toml"], ids=["example", "ci0"]
)
def test_check_config_accepts_upstream_configs(tmp_path, config):
    shutil.copy(FIXTURES / "upstream" / config, tmp_path / "monitor.toml")
    (tmp_path / ".env").write_text(ENV_FILE)
    result = monitor("check-config", "--config", str(tmp_path / "monitor.toml"))
    assert result.returncode == 0, result.stderr
    assert "servo-ubuntu2204" in result.stdout
    assert "changed" not in result.stdout + result.stderr  # the API token is never printed


def test_check_config_uses_working_directory_by_default(tmp_path):
    shutil.copy(FIXTURES / "upstream" / "monitor.toml.example", tmp_path / "monitor.toml")
    (tmp_path / ".env").write_text(ENV_FILE)
    assert monitor("check-config", cwd=tmp_path).returncode == 0


def test_check_config_rejects_bad_config_with_exit_2(tmp_path):
    text = (FIXTURES / "upstream" / "monitor.toml.example").read_text()
    (tmp_path / "monitor.toml").write_text(text.replace("target_count = 1", 'target_count = "one"'))
    (tmp_path / ".env").write_text(ENV_FILE)
    result = monitor("check-config", "--config", str(tmp_path / "monitor.toml"))
    assert result.returncode == 2
    assert "monitor.toml" in result.stderr
    assert "[profiles.base-ubuntu2204]" in result.stderr
    assert "target_count" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_rejects_over_budget_profiles(tmp_path):
    text = (FIXTURES / "upstream" / "monitor.toml.example").read_text()
    text = text.replace("available_1g_hugepages = 96", "available_1g_hugepages = 6")
    (tmp_path / "monitor.toml").write_text(text)
    (tmp_path / ".env").write_text(ENV_FILE)
    result = monitor("check-config", "--config", str(tmp_path / "monitor.toml"))
    assert result.returncode == 2
    assert "hugepages" in result.stderr


def test_run_with_bad_config_exits_2_before_starting(tmp_path):
    (tmp_path / "monitor.toml").write_text("listen_on = [")
    (tmp_path / ".env").write_text(ENV_FILE)
    result = monitor("run", "--config", str(tmp_path / "monitor.toml"))
    assert result.returncode == 2
    assert "monitor.toml" in result.stderr


@pytest.fixture
def live_standin():
    standin = GitHubStandIn(token="test-gh-token")
    standin.start()
    yield standin
    standin.stop()


def run_daemon(
    tmp_path: Path, standin: GitHubStandIn, env: dict[str, str] | None = None
) -> tuple[Daemon, int]:
    port = free_port()
    path = write_config(tmp_path, github_api_url=standin.base_url, extra=f"listen_port = {port}\n")
    return Daemon("run", "--config", str(path), cwd=tmp_path, env=env), port


def test_run_serves_and_shuts_down_cleanly_on_sigterm(tmp_path, live_standin):
    daemon, port = run_daemon(tmp_path, live_standin)
    with daemon:
        deadline = time.monotonic() + 30
        base = f"http://127.0.0.1:{port}"
        wait_for_json(f"{base}/healthz", deadline)
        while time.monotonic() < deadline and len(live_standin.jit_names) < 3:
            time.sleep(0.1)
        assert sorted(live_standin.jit_names) == [
            "ci-runner-linux.0@host",
            "ci-runner-linux.1@host",
            "ci-runner-windows.2@host",
        ]
        dashboard = wait_for_json(f"{base}/dashboard.json", deadline)
        assert set(dashboard["profile_runner_counts"]) == {"linux", "windows"}
        code, output = daemon.terminate()
    assert code == 0, output
    assert "Traceback" not in output
    assert "stopped" in output


def test_run_with_unusable_data_path_exits_2(tmp_path, live_standin):
    (tmp_path / "occupied").write_text("a file, not a directory")
    path = write_config(
        tmp_path, github_api_url=live_standin.base_url, extra='data_path = "occupied/data"\n'
    )
    path.write_text(path.read_text().replace('data_path = "data"\n', ""))
    result = monitor("run", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "cannot open the store" in result.stderr
    assert "Traceback" not in result.stderr


def test_jit_configs_never_reach_the_log_even_at_debug(tmp_path, live_standin):
    daemon, port = run_daemon(tmp_path, live_standin, env={"MONITOR_LOG_LEVEL": "DEBUG"})
    with daemon:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(live_standin.runners()) < 3:
            time.sleep(0.1)
        wait_for_json(f"http://127.0.0.1:{port}/healthz", deadline)
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read().decode()
        dashboard = urllib.request.urlopen(f"http://127.0.0.1:{port}/dashboard.json").read()
        code, output = daemon.terminate()
    assert code == 0
    assert "DEBUG" in output
    connection = sqlite3.connect(tmp_path / "data" / "monitor.sqlite3")
    secrets = [row[0] for row in connection.execute("SELECT jit_config FROM runner") if row[0]]
    connection.close()
    assert len(secrets) == 3
    for secret in secrets:
        assert secret not in output
        assert secret not in page
        assert secret not in dashboard.decode()


def test_run_rides_out_github_faults(tmp_path, live_standin):
    # GitHub is down for the first calls, then rate-limits once; one registration fails.
    live_standin.inject_fault(500, count=2)
    live_standin.inject_fault(429, count=1, retry_after=1)
    live_standin.inject_fault(502, count=1, path_contains="generate-jitconfig")
    daemon, port = run_daemon(tmp_path, live_standin)
    with daemon:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(live_standin.runners()) < 3:
            assert daemon.process.poll() is None, "the monitor exited"
            time.sleep(0.2)
        assert len(live_standin.runners()) == 3
        health = get_json(f"http://127.0.0.1:{port}/healthz")
        assert health["observed_at"] is not None
        code, output = daemon.terminate()
    assert code == 0
    assert "500" in output  # the fault was logged, not fatal
    assert "Traceback" not in output


def test_demo_shows_the_pool_cycling(tmp_path):
    port = free_port()
    with Daemon("demo", "--port", str(port), "--data-dir", str(tmp_path), cwd=tmp_path) as daemon:
        deadline = time.monotonic() + 60
        base = f"http://127.0.0.1:{port}"
        idle = 0
        while time.monotonic() < deadline and idle < 1:
            try:
                dashboard = get_json(f"{base}/dashboard.json")
            except OSError:
                time.sleep(0.3)
                continue
            idle = sum(c["idle"] for c in dashboard["profile_runner_counts"].values())
            time.sleep(0.3)
        assert idle >= 1
        # The demo's workflows reserve runners through the API; the stand-in runs their jobs.
        working = 0
        while time.monotonic() < deadline and working < 1:
            counts = get_json(f"{base}/dashboard.json")["profile_runner_counts"].values()
            working = sum(c["busy"] + c["reserved"] for c in counts)
            time.sleep(0.3)
        assert working >= 1
        with urllib.request.urlopen(f"{base}/", timeout=5) as response:
            page = response.read().decode()
        assert "runners for linux" in page and "runners for windows" in page
        # Its config and tokens are on disk, as on a real host: the check and the CLI work.
        assert (tmp_path / ".env").stat().st_mode & 0o777 == 0o600
        config = str(tmp_path / "monitor.toml")
        checked = monitor("check-config", "--host", "--json", "--config", config, cwd=tmp_path)
        report = json.loads(checked.stdout)
        assert checked.returncode == 0 and report["failures"] == 0, checked.stdout
        assert any(c["detail"].startswith("token accepted") for c in report["checks"])
        status = monitor("status", "--config", config, cwd=tmp_path)
        assert status.returncode == 0 and "GitHub       ok" in status.stdout, status.stderr
        code, output = daemon.terminate()
    assert code == 0, output


def test_package_version_matches_setup_cfg():
    # setup.cfg cannot read monitor.__version__: `attr:` resolves monitor.py, the launcher.
    from configparser import ConfigParser

    from monitor import __version__

    parser = ConfigParser()
    parser.read(ROOT / "setup.cfg")
    assert parser["metadata"]["version"] == __version__
