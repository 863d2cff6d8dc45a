"""Upstream's JSON shapes, as clients read them: `/dashboard.json` (spec §11.1: sorted keys,
runners in id order, the JIT config never included, so the queue and other clients keep
working), a runner in a take's answer, the reservation history and the event log. Pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from datetime import timedelta
from typing import Any

from monitor.policy import Holds
from monitor.policy import Observation
from monitor.policy import Registration
from monitor.policy import Runner
from monitor.policy import RunnerCounts


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
    observation: Observation,
    external_base_url: str,
    addresses: Mapping[str, str] | None = None,
    holds: Holds | None = None,
) -> dict[str, Any]:
    """Upstream's /dashboard.json, plus each runner's `status` (upstream's status names) and
    `holds`: the drained profiles, whether the host is paused or in maintenance."""
    addresses = addresses or {}
    return {
        "holds": (holds or Holds()).to_json(),
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


def take_answer(runners: list[Runner], addresses: Mapping[str, str]) -> list[dict[str, Any]]:
    """Upstream's take answer: {"id", "runner"} per runner, in the order given."""
    return [
        {"id": r.id, "runner": runner_json(r, addresses.get(r.guest_name or ""))} for r in runners
    ]


def take_record_json(row: Any) -> dict[str, Any]:
    """One row of the reservation history as `/reservations` shows it: the times, and the
    durations between them in seconds (None while unknown)."""

    def seconds(start: datetime | None, end: datetime | None) -> float | None:
        return None if start is None or end is None else round((end - start).total_seconds(), 3)

    return {
        "unique_id": row.unique_id,
        "profile": row.profile,
        "qualified_repo": row.qualified_repo,
        "run_id": row.run_id,
        "runner_id": row.runner_id,
        "outcome": row.outcome,
        "asked_at": row.asked_at.isoformat(),
        "answered_at": row.answered_at.isoformat(),
        "started_at": row.started_at.isoformat() if row.started_at else None,
        "ended_at": row.ended_at.isoformat() if row.ended_at else None,
        "answer_seconds": seconds(row.asked_at, row.answered_at),
        "waited_seconds": seconds(row.asked_at, row.started_at),
        "ran_seconds": seconds(row.started_at, row.ended_at),
    }


def event_json(event: Any) -> dict[str, Any]:
    """One event of the log as `/events` shows it."""
    return {
        "at": event.at.isoformat(),
        "kind": event.kind,
        "message": event.message,
        "runner_id": event.runner_id,
        "profile": event.profile,
    }
