"""The dashboard's view model (monitor/dashboard.py): pure functions, built from hand-made
observations. The page in a real browser is tests/test_dashboard_browser.py."""

from __future__ import annotations

from datetime import UTC
from datetime import datetime
from datetime import timedelta

from monitor import dashboard
from monitor import policy
from monitor.github import RateLimit
from monitor.policy import Observation

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
POLL = timedelta(seconds=5)
CACHE = timedelta(seconds=30)


def runner(
    runner_id: int, profile: str = "linux", labels: tuple[str, ...] = (), **registration
) -> policy.Runner:
    fields = {"status": "online", "busy": False, **registration}
    return policy.Runner(
        id=runner_id,
        profile=profile,
        created_at=NOW - timedelta(minutes=3),
        registration=policy.Registration(
            runner_id + 100, f"{profile}.{runner_id}@host", labels=labels, **fields
        ),
        guest_name=f"ci-runner-{profile}.{runner_id}",
    )


def observation(runners: list[policy.Runner], **fields) -> Observation:
    return Observation(
        at=fields.pop("at", NOW),
        runners=runners,
        counts={},
        ignored=[],
        changes=None,
        override=fields.pop("override", None),
        **fields,
    )


def health(obs: Observation | None, **overrides) -> dashboard.Health:
    values = {
        "registrations_at": NOW,
        "github_error": None,
        "rate_limit": None,
        "now": NOW,
        "poll_interval": POLL,
        "cache_timeout": CACHE,
    }
    return dashboard.health(obs, **{**values, **overrides})


def test_labels_become_chips_and_only_a_run_path_becomes_a_link():
    assert dashboard.label_chip("self-hosted") == dashboard.LabelChip(
        "self-hosted", None, None, None
    )
    chip = dashboard.label_chip("reserved-by:servo/servo/actions/runs/42")
    assert (chip.key, chip.value) == ("reserved-by", "servo/servo/actions/runs/42")
    assert chip.url == "https://github.com/servo/servo/actions/runs/42"
    assert dashboard.label_chip("reserved-by:javascript:alert(1)").url is None
    assert dashboard.label_chip("reserved-by:a/b/actions/runs/1?x=<y>").url is None
    assert dashboard.label_chip("other:servo/servo/actions/runs/42").url is None


def test_runner_rows_show_reservation_address_and_screenshot():
    reserved = runner(
        1,
        labels=(
            "self-hosted",
            "reserved-for:5b4f2a86-0000-4000-8000-000000000001",
            "reserved-since:1795000000",
            "reserved-by:servo/servo/actions/runs/7",
        ),
    )
    obs = observation([runner(0), reserved, runner(2, profile="windows")])
    (linux, windows) = dashboard.overview(
        obs,
        ["linux", "windows"],
        {"ci-runner-linux.1": "192.168.122.23"},
        lambda runner_id: "abc" if runner_id == 1 else None,
    )
    assert [row.id for row in linux.runners] == [0, 1]
    assert [row.id for row in windows.runners] == [2]
    idle, row = linux.runners
    assert (idle.status, idle.symbol, idle.reserved_for, idle.ipv4) == ("Idle", "●", None, None)
    assert row.status == "Reserved" and row.symbol == "◆" and row.css == "reserved"
    assert row.reserved_for == "5b4f2a86-0000-4000-8000-000000000001"
    assert row.reserved_since == datetime.fromtimestamp(1795000000, UTC)
    assert row.reserved_by_url == "https://github.com/servo/servo/actions/runs/7"
    assert row.ipv4 == "192.168.122.23"
    assert row.screenshot_version == "abc" and idle.screenshot_version is None
    assert [chip.key for chip in row.labels] == [
        None,
        "reserved-for",
        "reserved-since",
        "reserved-by",
    ]


def test_a_malformed_reserved_since_is_shown_without_an_age():
    (view,) = dashboard.overview(
        observation([runner(0, labels=("reserved-for:x", "reserved-since:soon"))]), ["linux"]
    )
    assert view.runners[0].reserved_since is None
    assert view.runners[0].status == "Reserved"


def test_profiles_show_their_override_and_image_age():
    override = policy.Override({"linux": 2}, {"linux": 2, "windows": 0})
    counts = policy.RunnerCounts(
        target=2, healthy=1, started_or_crashed=0, idle=1, reserved=0, busy=0,
        done_or_unregistered=0, excess_healthy=0, wanted=1, critical=0,
        image_age=timedelta(hours=5, minutes=3),
    )  # fmt: skip
    obs = observation([runner(0)], override=override)
    obs.counts["linux"] = counts
    linux, windows = dashboard.overview(obs, ["linux", "windows"])
    assert (linux.override_count, linux.image_age, linux.counts) == (2, "5h03m", counts)
    assert (windows.override_count, windows.image_age, windows.counts) == (None, None, None)
    assert linux.rebuild == ""
    states = {"linux": "building since 12:00:00 UTC (ci-rebuild-linux@x)"}
    (rebuilding,) = dashboard.overview(obs, ["linux"], rebuild_state=states)
    assert rebuilding.rebuild == states["linux"]
    assert dashboard.overview(None, ["linux"])[0].runners == []


def test_health_is_quiet_when_all_is_well():
    rate = RateLimit(5000, 4990, 10, NOW + timedelta(minutes=30), "core")
    result = health(observation([]), rate_limit=rate)
    assert result.notices == []
    assert (result.observed_at, result.rate_limit) == (NOW, rate)


def test_health_names_each_fault_and_stale_data():
    assert [n.kind for n in health(None).notices] == ["stale"]

    old = observation([], at=NOW - timedelta(minutes=2), error="connection reset")
    notices = health(
        old,
        github_error="listing runners failed: 502",
        registrations_at=NOW - timedelta(minutes=10),
        rate_limit=RateLimit(5000, 12, 4988, NOW + timedelta(minutes=9), "core"),
    ).notices
    texts = [f"{n.kind}: {n.text}" for n in notices]
    assert texts == [
        "stale: No reconcile pass since 11:58:00 UTC: what is shown may be out of date.",
        "error: libvirt: connection reset",
        "error: GitHub: listing runners failed: 502",
        "stale: GitHub's runner list was last fetched at 11:50:00 UTC.",
        "error: GitHub API budget low: 12 of 5000 left until 12:09:00 UTC.",
    ]


def test_health_text_does_not_change_while_the_state_does_not():
    # The page's ETag is a hash of the fragment: its text must not tick with the clock.
    obs = observation([], at=NOW - timedelta(minutes=2))
    first = health(obs, now=NOW)
    later = health(obs, now=NOW + timedelta(seconds=17))
    assert first == later


def test_error_events_are_marked():
    assert dashboard.event_css("create-failed") == "error"
    assert dashboard.event_css("github-error") == "error"
    assert dashboard.event_css("created") == ""
