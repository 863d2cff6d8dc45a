"""Pure view-model builders for the dashboard: an Observation in, plain data out.

`dashboard_json` keeps upstream's `/dashboard.json` shape (spec §11.1: sorted keys, runners in
id order, the JIT config never included), so the queue and other clients keep working.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from datetime import timedelta
from typing import TYPE_CHECKING
from typing import Any

from monitor.policy import Registration
from monitor.policy import Runner
from monitor.policy import RunnerCounts

if TYPE_CHECKING:
    from monitor.loop import Observation

STATUS_CSS = {
    "Invalid": "invalid",
    "DoneOrUnregistered": "done",
    "Busy": "busy",
    "Reserved": "reserved",
    "Idle": "idle",
    "StartedOrCrashed": "starting",
}


def _duration_json(value: timedelta | None) -> dict[str, int] | None:
    if value is None:
        return None
    micros = max(0, value // timedelta(microseconds=1))
    return {"nanos": (micros % 1_000_000) * 1000, "secs": micros // 1_000_000}


def _time_json(value: datetime) -> dict[str, int]:
    micros = int(value.timestamp() * 1_000_000)
    return {
        "nanos_since_epoch": (micros % 1_000_000) * 1000,
        "secs_since_epoch": micros // 1_000_000,
    }


def registration_json(registration: Registration | None) -> dict[str, Any] | None:
    if registration is None:
        return None
    return {
        "busy": registration.busy,
        "id": registration.id,
        "labels": [{"name": label} for label in registration.labels],
        "name": registration.name,
        "status": registration.status,
    }


def runner_json(runner: Runner, ipv4: str | None = None) -> dict[str, Any]:
    """Upstream's Runner JSON (spec §11.1); also used in take responses."""
    return {
        "created_time": _time_json(runner.created_at),
        "details": {"image_type": "Rust"},
        "guest_name": runner.guest_name,
        "id": runner.id,
        "ipv4_address": ipv4,
        "registration": registration_json(runner.registration),
    }


def counts_json(counts: RunnerCounts) -> dict[str, Any]:
    return {
        "busy": counts.busy,
        "excess_healthy": counts.excess_healthy,
        "healthy": counts.healthy,
        "idle": counts.idle,
        "image_age": _duration_json(counts.image_age),
        "reserved": counts.reserved,
        "started_or_crashed": counts.started_or_crashed,
        "target": counts.target,
        "wanted": counts.wanted,
    }


def dashboard_json(
    observation: Observation, external_base_url: str, addresses: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Upstream's /dashboard.json, plus each runner's `status` (upstream's status names)."""
    addresses = addresses or {}
    return {
        "profile_runner_counts": {
            key: counts_json(counts) for key, counts in sorted(observation.counts.items())
        },
        "runners": [
            {
                "id": runner.id,
                "runner": runner_json(runner, addresses.get(runner.guest_name or "")),
                # Upstream points at runner/<id>/screenshot, which matches no route (§11.1).
                "screenshot_url": f"{external_base_url}runner/{runner.id}/screenshot.png",
                "status": runner.status.value,
            }
            for runner in observation.runners
        ],
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


@dataclass(frozen=True)
class RunnerRow:
    id: int
    guest_name: str | None
    status: str
    css: str
    age: str
    reserved_for: str
    labels: list[str]
    in_flight: bool


@dataclass(frozen=True)
class ProfileView:
    key: str
    counts: RunnerCounts | None
    runners: list[RunnerRow]


def overview(
    observation: Observation | None, profile_keys: list[str], now: datetime
) -> list[ProfileView]:
    """Profiles in config order with their runners (ascending id), ages pre-formatted."""
    views = []
    for key in profile_keys:
        rows = []
        if observation is not None:
            for runner in observation.runners:
                if runner.profile != key:
                    continue
                status = runner.status.value
                reserved = runner.reserved_for(now)
                rows.append(
                    RunnerRow(
                        id=runner.id,
                        guest_name=runner.guest_name,
                        status=status,
                        css=STATUS_CSS.get(status, ""),
                        age=format_age(runner.age(now)),
                        reserved_for="" if reserved is None else format_age(reserved),
                        labels=list(runner.registration.labels) if runner.registration else [],
                        in_flight=runner.in_flight,
                    )
                )
        counts = observation.counts.get(key) if observation is not None else None
        views.append(ProfileView(key, counts, rows))
    return views
