"""Pure view-model builders for the dashboard's HTML: an Observation in, plain data out.

The JSON that clients read (`/dashboard.json`, take answers, events) is in `wire`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC
from datetime import datetime
from datetime import timedelta
from typing import Any

from monitor.policy import Observation
from monitor.policy import Runner
from monitor.policy import RunnerCounts
from monitor.preflight import Check

STATUS_CSS = {
    "Invalid": "invalid",
    "DoneOrUnregistered": "done",
    "Busy": "busy",
    "Reserved": "reserved",
    "Idle": "idle",
    "StartedOrCrashed": "starting",
}


def format_age(value: timedelta | None) -> str:
    if value is None:
        return "?"
    seconds = int(value.total_seconds())
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


# The page shows status as text with a symbol, never by colour alone.
STATUS_SYMBOL = {
    "Idle": "●",
    "Reserved": "◆",
    "Busy": "▶",
    "StartedOrCrashed": "…",
    "DoneOrUnregistered": "✕",
    "Invalid": "!",
}
# Only a value of this shape becomes a link to the workflow run (spec §11.2 links any value).
_RUN_PATH = re.compile(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+/actions/runs/[0-9]+")
# Event kinds shown as errors.
_ERROR_KINDS = ("-error", "-failed", "stale")


@dataclass(frozen=True)
class LabelChip:
    """One label as the page shows it: `key:value` labels split (as upstream's chips)."""

    text: str
    key: str | None
    value: str | None
    url: str | None


@dataclass(frozen=True)
class RunnerRow:
    id: int
    guest_name: str | None
    status: str
    css: str
    symbol: str
    created_at: datetime
    ipv4: str | None
    registration_name: str | None
    reserved_for: str | None  # the job's unique_id
    reserved_since: datetime | None
    reserved_by: str | None  # <owner>/<repo>/actions/runs/<id>
    reserved_by_url: str | None
    labels: list[LabelChip]
    in_flight: bool
    screenshot_version: str | None
    boot_log: bool = False  # the guest uploaded some of its boot log (GET /runner/<id>/boot.log)


@dataclass(frozen=True)
class ProfileView:
    key: str
    counts: RunnerCounts | None
    runners: list[RunnerRow]
    override_count: int | None
    image_age: str | None
    # What the profile's image rebuild is doing (building, failed and when it retries, …).
    rebuild: str = ""


@dataclass(frozen=True)
class Notice:
    kind: str  # "error" (a fault is ongoing) or "stale" (data is old)
    text: str


@dataclass(frozen=True)
class Health:
    """The dashboard's status line: when the monitor last looked, GitHub's budget, faults."""

    observed_at: datetime | None
    registrations_at: datetime | None
    rate_limit: Any  # monitor.github.RateLimit | None
    notices: list[Notice]


def label_chip(label: str) -> LabelChip:
    key, colon, value = label.partition(":")
    if not colon:
        return LabelChip(label, None, None, None)
    url = (
        f"https://github.com/{value}"
        if key == "reserved-by" and _RUN_PATH.fullmatch(value)
        else None
    )
    return LabelChip(label, key, value, url)


def _runner_row(
    runner: Runner, ipv4: str | None, screenshot_version: str | None, boot_log: bool = False
) -> RunnerRow:
    status = runner.status.value
    registration = runner.registration
    labels = registration.labels if registration else ()
    reserved_by = registration.label_value("reserved-by") if registration else None
    since = registration.label_value("reserved-since") if registration else None
    return RunnerRow(
        id=runner.id,
        guest_name=runner.guest_name,
        status=status,
        css=STATUS_CSS.get(status, ""),
        symbol=STATUS_SYMBOL.get(status, ""),
        created_at=runner.created_at,
        ipv4=ipv4,
        registration_name=registration.name if registration else None,
        reserved_for=registration.label_value("reserved-for") if registration else None,
        reserved_since=_epoch(since),
        reserved_by=reserved_by,
        reserved_by_url=label_chip(f"reserved-by:{reserved_by}").url if reserved_by else None,
        labels=[label_chip(label) for label in labels],
        in_flight=runner.in_flight,
        screenshot_version=screenshot_version,
        boot_log=boot_log,
    )


def _epoch(text: str | None) -> datetime | None:
    """A `reserved-since` value (unix seconds) as a time, or None if it is not one."""
    if text is None or not text.isascii() or not text.isdigit():
        return None
    try:
        return datetime.fromtimestamp(int(text), UTC)
    except (OverflowError, ValueError, OSError):
        return None


def overview(
    observation: Observation | None,
    profile_keys: list[str],
    addresses: Mapping[str, str] | None = None,
    screenshot_version: Callable[[int], str | None] = lambda runner_id: None,
    rebuild_state: Mapping[str, str] | None = None,
    has_boot_log: Callable[[int], bool] = lambda runner_id: False,
) -> list[ProfileView]:
    """Profiles in config order with their runners (ascending id). Nothing here depends on
    the time of the request, so an unchanged state renders to the same bytes (the page's
    ETag); the page counts ages up itself."""
    addresses = addresses or {}
    override = observation.override if observation is not None else None
    views = []
    for key in profile_keys:
        rows = [
            _runner_row(
                r, addresses.get(r.guest_name or ""), screenshot_version(r.id), has_boot_log(r.id)
            )
            for r in (observation.runners if observation is not None else [])
            if r.profile == key
        ]
        counts = observation.counts.get(key) if observation is not None else None
        image_age = format_age(counts.image_age) if counts and counts.image_age else None
        granted = override.profile_override_counts.get(key) if override is not None else None
        rebuild = (rebuild_state or {}).get(key, "")
        views.append(ProfileView(key, counts, rows, granted, image_age, rebuild))
    return views


def health(
    observation: Observation | None,
    *,
    registrations_at: datetime | None,
    github_error: str | None,
    rate_limit: Any,
    now: datetime,
    poll_interval: timedelta,
    cache_timeout: timedelta,
    blocked: Mapping[str, Check] | None = None,
) -> Health:
    """What the status line says, and the notices for data that is stale or a fault that is
    ongoing. Times are shown as clock times, not ages, so the text stays the same while
    nothing changes."""
    notices = []
    if observation is None:
        notices.append(Notice("stale", "Waiting for the first look at GitHub and libvirt…"))
    else:
        if now - observation.at > max(3 * poll_interval, timedelta(seconds=30)):
            notices.append(
                Notice(
                    "stale",
                    f"No reconcile pass since {clock(observation.at)}: "
                    "what is shown may be out of date.",
                )
            )
        if observation.error:
            notices.append(Notice("error", f"libvirt: {observation.error}"))
    if github_error:
        notices.append(Notice("error", f"GitHub: {github_error}"))
    for profile, blocker in sorted((blocked or {}).items()):
        notices.append(
            Notice(
                "error",
                f"Profile {profile} cannot create runners: {blocker.subject}: "
                f"{blocker.detail}. Fix: {blocker.fix}",
            )
        )
    if registrations_at is not None and now - registrations_at > 2 * cache_timeout + timedelta(
        seconds=30
    ):
        notices.append(
            Notice("stale", f"GitHub's runner list was last fetched at {clock(registrations_at)}.")
        )
    if rate_limit is not None and rate_limit.remaining < max(1, rate_limit.limit // 10):
        notices.append(
            Notice(
                "error",
                f"GitHub API budget low: {rate_limit.remaining} of {rate_limit.limit} left "
                f"until {clock(rate_limit.reset_at)}.",
            )
        )
    observed_at = observation.at if observation is not None else None
    return Health(observed_at, registrations_at, rate_limit, notices)


def clock(value: datetime) -> str:
    """A time as the page shows it: UTC, to the second."""
    return value.astimezone(UTC).strftime("%H:%M:%S UTC")


def epoch(value: datetime) -> int:
    return int(value.timestamp())


def event_css(kind: str) -> str:
    return "error" if kind.endswith(_ERROR_KINDS) else ""


def format_seconds(value: float | None) -> str:
    """A duration in seconds for the history table: "—" while unknown."""
    return "—" if value is None else format_age(timedelta(seconds=value))
