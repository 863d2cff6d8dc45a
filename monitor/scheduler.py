"""APScheduler wiring only: periodic jobs that refresh what can be refreshed without racing
the monitor thread, and a periodic reconcile that is just a request on its queue."""

from __future__ import annotations

import logging
from datetime import UTC
from datetime import datetime

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from monitor.loop import Monitor

log = logging.getLogger(__name__)

# How often the registrations job wakes to see whether the cache is due (the cache decides,
# honouring api_cache_timeout, forced expiries and back-off).
REGISTRATIONS_CHECK_SECONDS = 1.0
# Guest addresses (for /boot and /github-jitconfig; a miss looks again at once) and screenshots.
ADDRESSES_SECONDS = 5.0
# How soon the dashboard shows runners just taken in a burst as Reserved, at the latest.
VIEW_SECONDS = 0.5
SCREENSHOTS_SECONDS = 5.0
# How often Reserved runners' workflow runs are looked at (each run at most once a minute).
RESERVED_RUNS_SECONDS = 15.0


def make_scheduler(monitor: Monitor) -> BackgroundScheduler:
    """A scheduler with the monitor's periodic jobs added (not started)."""
    scheduler = BackgroundScheduler(
        executors={"default": ThreadPoolExecutor(max_workers=3)},
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30},
        timezone="UTC",
    )
    scheduler.add_job(
        monitor.registrations.refresh,
        "interval",
        seconds=REGISTRATIONS_CHECK_SECONDS,
        id="refresh-registrations",
        next_run_time=datetime.now(UTC),  # at once, then every second
    )
    scheduler.add_job(
        monitor.refresh_view_if_stale, "interval", seconds=VIEW_SECONDS, id="refresh-view"
    )
    # Read-only libvirt work, off the monitor thread (libvirt connections are thread-safe).
    scheduler.add_job(
        monitor.guests.refresh_addresses,
        "interval",
        seconds=ADDRESSES_SECONDS,
        id="refresh-addresses",
    )
    scheduler.add_job(
        monitor.guests.refresh_screenshots,
        "interval",
        seconds=SCREENSHOTS_SECONDS,
        id="refresh-screenshots",
    )
    scheduler.add_job(
        monitor.registrations.check_reserved_runs,
        "interval",
        seconds=RESERVED_RUNS_SECONDS,
        id="check-reserved-runs",
    )
    scheduler.add_job(
        monitor.request_reconcile,
        "interval",
        seconds=monitor.config.monitor_poll_interval.total_seconds(),
        id="reconcile",
    )
    return scheduler
