"""The GitHub part of `monitor check-config --host`: does the token work for the configured
scope, how much of its rate budget is left, and may it register runners.

Each finding is a `preflight.Check` naming the fix. The checks make real calls through the
`GitHub` adapter (the doctor passes a `RestGitHub`): one list of the runners, and unless
`dont_register_runners` is set, one JIT runner registered and deleted at once. They run on
the caller's thread, once, outside the monitor; nothing here retries.
"""

from __future__ import annotations

import secrets

from monitor.config import Config
from monitor.errors import MonitorError
from monitor.errors import TransientError
from monitor.github import GitHub
from monitor.github import GitHubRefused
from monitor.github import RateLimit
from monitor.preflight import Check
from monitor.preflight import Status
from monitor.registrations import LOW_BUDGET_FRACTION

TOKEN = "GitHub token"
BUDGET = "GitHub rate limit"
JIT = "GitHub JIT runners"
# Throwaway registrations are `<prefix><8 hex>@<github_api_suffix>`: the suffix says which
# host made it, and with no `.<id>` it never parses as one of the monitor's runners
# (`policy.parse_registration_name`), so a monitor running meanwhile leaves it alone.
PREFLIGHT_PREFIX = "monitor-preflight-"


def github_checks(github: GitHub, config: Config) -> list[Check]:
    """The token, the rate budget and the JIT permission, in that order. Stops after the
    token check if it failed: the later ones would only repeat its failure."""
    token = _token_check(github, config)
    if token.status is Status.FAIL:
        return [token]
    return [token, _budget_check(github.rate_limit), _jit_check(github, config)]


def preflight_name(suffix: str) -> str:
    """A fresh name for a throwaway registration (see `PREFLIGHT_PREFIX`)."""
    return f"{PREFLIGHT_PREFIX}{secrets.token_hex(4)}@{suffix}"


def _token_check(github: GitHub, config: Config) -> Check:
    scope = config.github_api_scope
    try:
        runners = github.list_runners()
    except GitHubRefused as error:
        return _refused_listing(error, config)
    except MonitorError as error:
        return _no_answer(TOKEN, error, github, config)
    counted = f"{len(runners)} runner{'' if len(runners) == 1 else 's'} registered"
    return Check.ok(TOKEN, f"token accepted for {scope} ({counted})")


def _refused_listing(error: GitHubRefused, config: Config) -> Check:
    said = f"{error.github_status} {error.github_message}"
    scope = config.github_api_scope
    if error.github_status == 401:
        dotenv = config.path.parent / ".env"
        return Check.fail(
            TOKEN,
            f"GitHub refused the token ({said})",
            f"set a valid, unexpired token as GITHUB_TOKEN in {dotenv} (or the environment)",
        )
    if error.github_status in (403, 404):
        return Check.fail(
            TOKEN,
            f"the token cannot see the runners of {scope} ({said})",
            f"check that github_api_scope names {_scope_kind(scope)} the token may use, and"
            f" grant the token {_runner_permission(scope)}",
        )
    return Check.fail(
        TOKEN,
        f"listing the runners of {scope} failed: {error}",
        "check github_api_scope and github_api_url in monitor.toml",
    )


def _budget_check(rate: RateLimit | None) -> Check:
    if rate is None:
        # GitHub Enterprise Server with rate limiting turned off sends no x-ratelimit-*.
        return Check.ok(BUDGET, "GitHub reported no rate limit")
    left = f"{rate.remaining} of {rate.limit} requests left until {_clock(rate)}"
    if rate.remaining < rate.limit * LOW_BUDGET_FRACTION:
        return Check.warn(
            BUDGET,
            f"{left}: the monitor will look at its runners less often until then",
            "something else is spending this token's budget (another monitor, a script?):"
            " give the monitor a token of its own",
        )
    return Check.ok(BUDGET, left)


def _jit_check(github: GitHub, config: Config) -> Check:
    if config.dont_register_runners:
        return Check.ok(JIT, "not checked: dont_register_runners is set")
    name = preflight_name(config.github_api_suffix)
    try:
        registration = github.generate_jitconfig(name, ["self-hosted"]).registration
    except GitHubRefused as error:
        if error.github_status in (403, 404):
            permission = _runner_permission(config.github_api_scope)
            return Check.fail(
                JIT,
                f"the token may list runners but not create them ({error.github_status}"
                f" {error.github_message}): missing permission",
                f"grant the token {permission}",
            )
        return Check.fail(
            JIT,
            f"creating a JIT runner config failed: {error}",
            "the monitor makes this call for every runner it creates: see GitHub's message",
        )
    except MonitorError as error:
        return _no_answer(JIT, error, github, config)
    try:
        github.delete_runner(registration.id)
    except MonitorError as error:
        return Check.warn(
            JIT,
            f"can create JIT runner configs, but deleting the test registration {name}"
            f" (id {registration.id}) failed: {error}",
            f"delete runner {registration.id} by hand (the scope's Settings > Actions > Runners,"
            f" or `gh api -X DELETE {config.github_api_scope}/actions/runners/{registration.id}`)",
        )
    return Check.ok(JIT, "can create JIT runner configs")


def _no_answer(subject: str, error: MonitorError, github: GitHub, config: Config) -> Check:
    """No usable answer: the network, GitHub's own trouble (5xx), or a used-up budget."""
    rate = github.rate_limit
    if isinstance(error, TransientError) and rate is not None and rate.remaining == 0:
        return Check.fail(
            subject,
            f"GitHub's rate limit for this token is used up until {_clock(rate)} ({error})",
            "wait until then; if something else spends this token's budget, give the monitor"
            " a token of its own",
        )
    return Check.fail(
        subject,
        f"no usable answer from {config.github_api_url} ({error})",
        "check github_api_url in monitor.toml and that this host can reach it (DNS, proxy,"
        " firewall); a 5xx is GitHub's own trouble: https://www.githubstatus.com",
    )


def _scope_kind(scope: str) -> str:
    return "an organisation" if scope.startswith("/orgs/") else "a repository"


def _runner_permission(scope: str) -> str:
    """What a token needs to register and remove runners at `scope` (GitHub's REST docs for
    the self-hosted runner endpoints; the account also needs admin access there)."""
    if scope.startswith("/orgs/"):
        return (
            'the organisation permission "Self-hosted runners: read and write" (fine-grained'
            " token) or the `admin:org` scope (classic token; `repo` too for private"
            " repositories)"
        )
    return (
        'the repository permission "Administration: read and write" (fine-grained token)'
        " or the `repo` scope (classic token)"
    )


def _clock(rate: RateLimit) -> str:
    return f"{rate.reset_at:%H:%M} UTC"
