"""The GitHub checks of `check-config --host`, through `RestGitHub` against a real stand-in
over HTTP."""

from __future__ import annotations

import dataclasses
import socket
from datetime import UTC
from datetime import datetime

import pytest

from monitor import policy
from monitor.config import Config
from monitor.github import RestGitHub
from monitor.github_checks import PREFLIGHT_PREFIX
from monitor.github_checks import github_checks
from monitor.github_checks import preflight_name
from monitor.preflight import Status
from monitor.preflight import render_text
from monitor.standin import GitHubStandIn
from tests.support.constants import GITHUB_TOKEN
from tests.support.under_pytest import standin_fixtures

server, standin = standin_fixtures(GITHUB_TOKEN)


@pytest.fixture
def config(make_config, standin: GitHubStandIn) -> Config:
    config: Config = make_config(github_api_url=standin.base_url)
    return config


def client(config: Config, token: str = GITHUB_TOKEN) -> RestGitHub:
    return RestGitHub(config.github_api_url, config.github_api_scope, token, timeout=2.0)


def statuses(checks) -> list[tuple[str, Status]]:
    return [(check.subject, check.status) for check in checks]


def test_a_good_token_passes_and_leaves_no_registration(standin: GitHubStandIn, config: Config):
    standin.add_runner(config.github_api_scope, "ci-runner-linux.1@host")

    github = client(config)
    checks = github_checks(github, config)

    assert statuses(checks) == [
        ("GitHub token", Status.OK),
        ("GitHub rate limit", Status.OK),
        ("GitHub JIT runners", Status.OK),
    ]
    assert github.rate_limit is not None
    reset = github.rate_limit.reset_at
    assert render_text(checks) == (
        "ok    GitHub token: token accepted for /repos/test/servo (1 runner registered)\n"
        f"ok    GitHub rate limit: 4999 of 5000 requests left until {reset:%H:%M} UTC\n"
        "ok    GitHub JIT runners: can create JIT runner configs"
    )
    # The throwaway registration was made, at the configured scope, and is gone again.
    (name,) = standin.jit_names
    assert name.startswith(PREFLIGHT_PREFIX) and name.endswith("@host")
    assert [runner["name"] for runner in standin.runners()] == ["ci-runner-linux.1@host"]
    assert [(r.method, r.status) for r in standin.requests] == [
        ("GET", 200),
        ("POST", 201),
        ("DELETE", 204),
    ]


def test_the_throwaway_name_is_never_one_of_the_monitors_runners(config: Config):
    for runner_prefix in (config.libvirt_runner_guest_prefix, "monitor", "monitor-preflight"):
        name = preflight_name(config.github_api_suffix)
        assert policy.parse_registration_name(name, runner_prefix, "host") is None
    assert preflight_name("host") != preflight_name("host")


def test_a_wrong_token_fails_naming_the_401_and_stops(standin: GitHubStandIn, config: Config):
    checks = github_checks(client(config, token="not-the-token"), config)

    (check,) = checks
    assert check.status is Status.FAIL
    assert check.detail == "GitHub refused the token (401 Bad credentials)"
    assert check.fix == (
        f"set a valid, unexpired token as GITHUB_TOKEN in {config.path.parent / '.env'}"
        " (or the environment)"
    )
    assert "not-the-token" not in render_text(checks)
    assert standin.jit_names == []


@pytest.mark.parametrize(
    ("scope", "permission"),
    [
        ("/repos/test/servo", '"Administration: read and write"'),
        ("/orgs/test", '"Self-hosted runners: read and write"'),
    ],
)
def test_without_jit_permission_listing_passes_and_jit_fails_naming_the_permission(
    standin: GitHubStandIn, config: Config, scope: str, permission: str
):
    config = dataclasses.replace(config, github_api_scope=scope)
    standin.jit_permission = False

    token, budget, jit = github_checks(client(config), config)

    assert (token.status, budget.status, jit.status) == (Status.OK, Status.OK, Status.FAIL)
    assert jit.detail == (
        "the token may list runners but not create them (403 Resource not accessible by"
        " personal access token): missing permission"
    )
    assert permission in jit.fix
    assert render_text([jit]).splitlines() == [
        f"FAIL  GitHub JIT runners: {jit.detail}",
        f"      fix: {jit.fix}",
    ]


def test_a_token_that_cannot_see_the_scope_fails_naming_the_permission(
    standin: GitHubStandIn, config: Config
):
    standin.inject_fault(404, path_contains="/actions/runners")

    (check,) = github_checks(client(config), config)

    assert check.status is Status.FAIL
    assert check.detail == "the token cannot see the runners of /repos/test/servo (404 Not Found)"
    assert "names a repository the token may use" in check.fix
    assert '"Administration: read and write"' in check.fix and "`repo`" in check.fix


def test_a_low_budget_warns(config: Config):
    # A stand-in of its own: its limit is small enough to spend most of it here.
    with GitHubStandIn(token=GITHUB_TOKEN, rate_limit=100) as small:
        config = dataclasses.replace(config, github_api_url=small.base_url)
        github = client(config)
        for _ in range(90):
            assert github.get_runner(1) is None  # a counted 404

        token, budget, jit = github_checks(github, config)

    assert (token.status, budget.status, jit.status) == (Status.OK, Status.WARN, Status.OK)
    assert budget.detail.startswith("9 of 100 requests left until ")
    assert "less often" in budget.detail and "a token of its own" in budget.fix


def test_no_jit_check_when_the_monitor_registers_no_runners(standin: GitHubStandIn, config: Config):
    config = dataclasses.replace(config, dont_register_runners=True)

    checks = github_checks(client(config), config)

    assert checks[-1].status is Status.OK
    assert checks[-1].detail == "not checked: dont_register_runners is set"
    assert standin.jit_names == []


def test_a_failed_delete_warns_naming_the_registration(standin: GitHubStandIn, config: Config):
    standin.inject_fault(422, method="DELETE")

    jit = github_checks(client(config), config)[-1]

    (runner,) = standin.runners()
    assert jit.status is Status.WARN
    assert f"(id {runner['id']}) failed: GitHub DELETE" in jit.detail
    assert f"delete runner {runner['id']} by hand" in jit.fix


def test_a_standin_that_is_down_fails_naming_the_url(config: Config):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    config = dataclasses.replace(config, github_api_url=url)

    checks = github_checks(client(config), config)

    assert render_text(checks) == (
        f"FAIL  GitHub token: no usable answer from {url} (GitHub GET"
        " /repos/test/servo/actions/runners: NewConnectionError)\n"
        "      fix: check github_api_url in monitor.toml and that this host can reach it"
        " (DNS, proxy, firewall); a 5xx is GitHub's own trouble: https://www.githubstatus.com"
    )


def test_a_github_outage_fails_naming_the_url_and_status(standin: GitHubStandIn, config: Config):
    standin.inject_fault(503, count=5)

    (check,) = github_checks(client(config), config)

    assert check.status is Status.FAIL
    assert check.detail.startswith(f"no usable answer from {standin.base_url} (")
    assert ": 503 Service Unavailable)" in check.detail


def test_a_used_up_budget_fails_naming_when_it_comes_back(standin: GitHubStandIn, config: Config):
    reset = datetime.fromtimestamp(standin.exhaust_rate_limit(600), UTC)

    (check,) = github_checks(client(config), config)

    assert check.status is Status.FAIL
    assert check.detail.startswith(
        f"GitHub's rate limit for this token is used up until {reset:%H:%M} UTC ("
    )
    assert check.fix.startswith("wait until then")
