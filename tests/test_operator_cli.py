"""The operator CLI against a running `monitor run` (libvirt's test driver, the GitHub stand-in
playing the runner agent): every command, for people and with --json, and its one-line errors
for a wrong token and a daemon that is down."""

from __future__ import annotations

import hashlib
import json
import time
import urllib.error
import urllib.request

import pytest

from monitor.standin import GitHubStandIn
from tests.support.configs import write_config
from tests.support.daemons import Daemon
from tests.support.daemons import free_port
from tests.support.daemons import get_json
from tests.support.daemons import monitor
from tests.support.daemons import wait_for_json

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# A named token of the daemon's config, which the revoke test revokes and restores.
CI_TOKEN = "ci-token-for-the-cli-tests-0123"
CI_SHA256 = hashlib.sha256(CI_TOKEN.encode()).hexdigest()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """One monitor for the module: profiles linux (2) and windows (1), all Idle."""
    root = tmp_path_factory.mktemp("operator")
    standin = GitHubStandIn(token="test-gh-token")
    # Online by the monitor's first look after a create: an agent that connected later than
    # that look would read "offline" from the cached list for api_cache_timeout (30 s), as
    # long as this module's waits for an idle pool.
    standin.agent_online_after = 0.0
    standin.start()
    port = free_port()
    extra = (
        f"listen_port = {port}\n"
        f'[api_tokens]\nci = {{ sha256 = "{CI_SHA256}", scopes = ["reserve"] }}\n'
    )
    path = write_config(root, github_api_url=standin.base_url, extra=extra)
    running = Daemon("run", "--config", str(path), cwd=root)
    base = f"http://127.0.0.1:{port}"
    try:
        with running:
            wait_until_idle(base, 3)
            yield {"config": str(path), "base": base, "root": root, "port": port}
    finally:
        standin.stop()


def wait_until_idle(base: str, count: int, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    wait_for_json(f"{base}/healthz", deadline)
    while True:
        try:
            dashboard = get_json(f"{base}/dashboard.json")
        except urllib.error.HTTPError:  # 503 until the first reconcile
            dashboard = {"runners": []}
        if sum(r["status"] == "Idle" for r in dashboard["runners"]) >= count:
            return dashboard
        assert time.monotonic() < deadline, dashboard
        time.sleep(0.1)


def cli(daemon, *args: str, cwd=None):
    return monitor(*args, "--config", daemon["config"], cwd=cwd or daemon["root"])


def test_status_shows_profiles_counts_and_health(daemon):
    result = cli(daemon, "status")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("GitHub") and line.endswith("ok") for line in lines)
    assert any(line.split()[:2] == ["linux", "2/2"] for line in lines), result.stdout
    assert any(line.split()[:2] == ["windows", "1/1"] for line in lines), result.stdout
    data = json.loads(cli(daemon, "status", "--json").stdout)
    assert data["dashboard"]["profile_runner_counts"]["linux"]["target"] == 2
    assert data["health"]["github_error"] is None


def test_runners_lists_each_runner_and_filters_by_profile(daemon):
    result = cli(daemon, "runners", "--profile", "windows")
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split()[:3] == ["ID", "PROFILE", "STATUS"]
    assert [row.split()[1:3] for row in rows] == [["windows", "Idle"]]
    listed = json.loads(cli(daemon, "runners", "--json").stdout)
    assert len(listed) >= 3 and {"id", "runner", "status"} <= set(listed[0])


def test_take_override_drain_destroy_screenshot_and_events(daemon, tmp_path):
    taken = cli(daemon, "take", "linux", "--repo", "test/servo", "--run-id", "77")
    assert taken.returncode == 0, taken.stderr
    runner_id = int(taken.stdout.split()[2])
    reserved = cli(daemon, "runners", "--profile", "linux").stdout
    assert any(
        r.split()[:3] == [str(runner_id), "linux", "Reserved"] for r in reserved.splitlines()
    )

    assert "linux" in cli(daemon, "override", "set", "linux=3").stdout
    shown = json.loads(cli(daemon, "override", "show", "--json").stdout)
    assert shown["profile_override_counts"] == {"linux": 3}
    assert "override cancelled" in cli(daemon, "override", "cancel").stdout
    assert cli(daemon, "override", "show").stdout.strip() == "no override"

    drained = cli(daemon, "drain", "windows")
    assert drained.returncode == 0 and "windows drained" in drained.stdout
    assert "drained" in cli(daemon, "status").stdout
    assert json.loads(cli(daemon, "undrain", "windows", "--json").stdout)["drained_profiles"] == []

    picture = tmp_path / "screen.png"
    saved = cli(daemon, "screenshot", str(runner_id), "-o", str(picture))
    assert saved.returncode == 0, saved.stderr
    assert picture.read_bytes().startswith(PNG_MAGIC)

    gone = cli(daemon, "destroy", str(runner_id), "--wait", "30")
    assert gone.returncode == 0, gone.stderr
    assert f"runner {runner_id} (Reserved) destroyed" in gone.stdout
    dashboard = get_json(f"{daemon['base']}/dashboard.json")
    assert runner_id not in [r["id"] for r in dashboard["runners"]]

    events = cli(daemon, "events", "--limit", "50")
    assert events.returncode == 0
    assert "destroy-requested" in events.stdout and "the operator asked for it" in events.stdout
    only = json.loads(cli(daemon, "events", "--runner", str(runner_id), "--json").stdout)
    assert only and all(e["runner_id"] == runner_id for e in only)
    wait_until_idle(daemon["base"], 3)  # replaced: the other tests see the pool whole


def test_pause_resume_and_maintenance(daemon):
    assert cli(daemon, "pause").stdout.strip() == "host: paused"
    assert "paused" in cli(daemon, "status").stdout
    assert cli(daemon, "maintenance", "on").stdout.strip() == "host: paused, maintenance"
    assert json.loads(cli(daemon, "maintenance", "off", "--json").stdout)["maintenance"] is False
    assert cli(daemon, "resume").stdout.strip() == "host: running"
    wait_until_idle(daemon["base"], 3)


def test_take_wait_shows_progress_and_gives_up(daemon):
    first = cli(daemon, "take", "windows", "--json")
    assert first.returncode == 0 and json.loads(first.stdout)
    none = cli(daemon, "take", "windows", "--wait", "3")
    assert none.returncode == 1
    assert "waiting for an idle windows runner" in none.stderr  # one line per try (no tty)
    assert "gave up" in none.stderr.splitlines()[-1]
    busy_runner = json.loads(first.stdout)[0]["id"]
    cli(daemon, "destroy", str(busy_runner), "--wait", "30")
    wait_until_idle(daemon["base"], 3)


def test_refusals_are_one_line_with_exit_status_1(daemon):
    unknown = cli(daemon, "drain", "macos")
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == (
        "monitor drain: the monitor answered 404: No profile with key: macos"
    )
    assert "Traceback" not in unknown.stderr


def test_a_wrong_token_is_reported(daemon, tmp_path):
    path = write_config(tmp_path, extra=f"listen_port = {daemon['port']}\n")
    env_file = tmp_path / ".env"
    env_file.write_text(env_file.read_text().replace("test-api-token", "not-the-token"))
    result = monitor("drain", "linux", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "monitor drain: the monitor refused the API token (403): wrong monitor API token"
    )
    # Reading needs no token: still fine.
    assert monitor("status", "--config", str(path), cwd=tmp_path).returncode == 0


def test_revoke_and_unrevoke_a_token(daemon):
    def take_status() -> int:
        request = urllib.request.Request(
            f"{daemon['base']}/profile/linux/take",  # no parameters: 422 once let in
            method="POST",
            headers={"Authorization": f"Bearer {CI_TOKEN}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    assert take_status() == 422
    revoked = cli(daemon, "revoke", CI_SHA256)
    assert revoked.returncode == 0, revoked.stderr
    assert revoked.stdout.strip() == "API token 'ci' revoked"
    assert take_status() == 403
    restored = cli(daemon, "unrevoke", CI_SHA256, "--json")
    assert json.loads(restored.stdout) == {"unrevoked": "ci", "kind": "token"}
    assert take_status() == 422
    unknown = cli(daemon, "revoke", "0" * 64)
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == (
        "monitor revoke: the monitor answered 404: no API token or HMAC secret has that SHA-256"
    )


@pytest.mark.parametrize(
    "url", ["http://192.0.2.1:8000", "http://monitor.example:8000/", "HTTP://10.0.0.1"]
)
def test_the_token_is_never_sent_over_plain_http_to_another_host(daemon, url):
    result = cli(daemon, "drain", "linux", "--url", url)
    assert result.returncode == 1
    host = url.split("//")[1].split(":")[0].split("/")[0].lower()
    assert result.stderr.strip() == (
        f"monitor drain: refusing to send the API token over plain http to {host}, which is "
        "not a loopback address: use an https:// --url, or the monitor's loopback address"
    )


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "localhost", "[::1]"])
def test_the_token_goes_over_plain_http_to_a_loopback_address(daemon, host):
    # Nothing listens on port 9 (discard): the request is made, and refused by the kernel.
    result = cli(daemon, "drain", "linux", "--url", f"http://{host}:9")
    assert result.returncode == 1
    assert "cannot reach the monitor" in result.stderr and "refusing" not in result.stderr


def test_a_daemon_that_is_down_is_reported(tmp_path):
    path = write_config(tmp_path, extra=f"listen_port = {free_port()}\n")
    result = monitor("status", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 1
    line = result.stderr.strip()
    assert line.startswith("monitor status: cannot reach the monitor at http://127.0.0.1:")
    assert "connection refused" in line and "Traceback" not in result.stderr


def test_a_bad_config_is_exit_2(tmp_path):
    result = monitor("status", "--config", str(tmp_path / "missing.toml"), cwd=tmp_path)
    assert result.returncode == 2 and "missing.toml" in result.stderr
