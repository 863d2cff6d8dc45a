"""Prometheus metrics (`GET /metrics`), with the `prometheus_client` library.

Two kinds:
- what the monitor records as it happens, in `Metrics` (reconcile passes, takes by outcome,
  how long jobs waited for their runner, screenshot passes);
- what is read from the monitor's state at scrape time, by `_StateCollector` (runners by
  profile and status, targets, image ages, GitHub calls and rate limit, libvirt errors), so
  there is nothing to keep in step.

Each `Metrics` has its own registry: several monitors in one process (tests) never clash.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client import Counter
from prometheus_client import Histogram
from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from monitor import policy
from monitor.github import GitHub

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TAKE_OUTCOMES = ("reserved", "null", "failed")


class Metrics:
    """The monitor's own measurements, and the registry `/metrics` exposes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.reconcile_seconds = Histogram(
            "monitor_reconcile_duration_seconds",
            "Wall time of one reconcile pass on the monitor thread.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry,
        )
        self.takes = Counter(
            "monitor_reservations",
            "Takes answered: reserved (runners given), null (none idle), failed (an error).",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in TAKE_OUTCOMES:
            self.takes.labels(outcome)  # present at 0 from the start
        self.job_wait_seconds = Histogram(
            "monitor_job_wait_seconds",
            "How long a reserved runner waited for its job to start (Reserved to Busy).",
            ["profile"],
            buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
            registry=self.registry,
        )
        self.screenshot_pass_seconds = Histogram(
            "monitor_screenshot_pass_duration_seconds",
            "Wall time of one pass over every runner guest's screen.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )

    def attach(self, monitor: Any) -> None:
        """Also expose what can be read from `monitor` at scrape time."""
        self.registry.register(_StateCollector(monitor))

    def take_answered(self, answer: Any) -> None:
        self.takes.labels("reserved" if answer else "null").inc()

    def take_failed(self) -> None:
        self.takes.labels("failed").inc()

    def note_transitions(self, before: Any, after: Any) -> None:
        """Between two observations: runners that went from Reserved to Busy waited this
        long for their job (from their `reserved-since` label)."""
        if before is None:
            return
        was = {r.id: r.status for r in before.runners}
        for runner in after.runners:
            if runner.status is policy.Status.BUSY and was.get(runner.id) is policy.Status.RESERVED:
                waited = runner.reserved_for(after.at)
                if waited is not None:
                    self.job_wait_seconds.labels(runner.profile).observe(waited.total_seconds())

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    def __init__(self, monitor: Any) -> None:
        self.monitor = monitor

    def describe(self) -> list[Metric]:
        return []  # collected at scrape time only (auto_describe would call collect)

    def collect(self) -> Iterator[Metric]:
        monitor = self.monitor
        observation = monitor.observation
        runners = GaugeMetricFamily(
            "monitor_runners", "Runners by profile and status.", labels=["profile", "status"]
        )
        target = GaugeMetricFamily(
            "monitor_runner_target", "Runners each profile should have.", labels=["profile"]
        )
        image_age = GaugeMetricFamily(
            "monitor_image_age_seconds",
            "Age of each profile's base image (rebuilt images; absent for prebuilt ones).",
            labels=["profile"],
        )
        if observation is not None:
            counted = {(key, status): 0 for key in observation.counts for status in policy.Status}
            for runner in observation.runners:
                key = (runner.profile, runner.status)
                counted[key] = counted.get(key, 0) + 1
            for (profile, status), count in sorted(counted.items(), key=_by_name):
                runners.add_metric([profile, status.value], count)
            for profile, counts in sorted(observation.counts.items()):
                target.add_metric([profile], counts.target)
                if counts.image_age is not None:
                    image_age.add_metric([profile], counts.image_age.total_seconds())
        yield runners
        yield target
        yield image_age

        blocked = GaugeMetricFamily(
            "monitor_profile_blocked",
            "1 for a profile that cannot create runners now (the dashboard says why), else 0.",
            labels=["profile"],
        )
        stuck = monitor.workers.blocked
        for profile in sorted(monitor.config.profiles):
            blocked.add_metric([profile], 1 if profile in stuck else 0)
        yield blocked

        at = GaugeMetricFamily(
            "monitor_last_reconcile_timestamp_seconds",
            "When the last reconcile pass observed GitHub and libvirt (Unix time).",
        )
        if observation is not None:
            at.add_metric([], _timestamp(observation.at))
        yield at

        github: GitHub = monitor.github
        calls = CounterMetricFamily(
            "monitor_github_api_calls",
            "GitHub REST calls by method and answer (HTTP status, or error without one).",
            labels=["method", "status"],
        )
        errors = CounterMetricFamily(
            "monitor_github_api_errors",
            "GitHub REST calls that failed (4xx/5xx answers or no answer).",
        )
        made = dict(github.api_calls)
        for (method, answer), count in sorted(made.items()):
            calls.add_metric([method, answer], count)
        errors.add_metric([], sum(n for (_, s), n in made.items() if s == "error" or int(s) >= 400))
        yield calls
        yield errors
        remaining = GaugeMetricFamily(
            "monitor_github_rate_limit_remaining",
            "GitHub API requests left in the current window (X-RateLimit-Remaining).",
        )
        limit = github.rate_limit
        if limit is not None:
            remaining.add_metric([], limit.remaining)
        yield remaining

        libvirt_errors = CounterMetricFamily(
            "monitor_libvirt_errors", "libvirt calls that failed (the connection lost included)."
        )
        libvirt_errors.add_metric([], monitor.hypervisor.errors)
        yield libvirt_errors


def _by_name(item: tuple[tuple[str, policy.Status], int]) -> tuple[str, str]:
    (profile, status), _ = item
    return profile, status.value


def _timestamp(when: datetime) -> float:
    return when.timestamp()
