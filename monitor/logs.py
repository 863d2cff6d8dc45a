"""Log formatting and set-up: one line per record on stderr, `runner=<id>` on lines about one
runner, and under journald each line's syslog priority so `journalctl -p warning` works.

Runs once at start-up, on the main thread, before anything else logs.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping

# journald reads a `<N>` prefix as the entry's PRIORITY (syslog levels).
JOURNALD_PRIORITIES = {"CRITICAL": 2, "ERROR": 3, "WARNING": 4, "INFO": 6, "DEBUG": 7}


class RunnerFormatter(logging.Formatter):
    """Adds `runner=<id>` to a line about one runner (`extra={"runner_id": …}`), so that
    `journalctl -u monitor | grep runner=42` follows a runner from creation to destruction.
    Under journald (`$JOURNAL_STREAM`) each line starts with its syslog priority (`<3>` for
    ERROR…), which journald turns into the entry's PRIORITY: `journalctl -p warning` works."""

    def __init__(self, fmt: str, journald: bool) -> None:
        super().__init__(fmt)
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        runner_id = getattr(record, "runner_id", None)
        if runner_id is not None:
            text += f" runner={runner_id}"
        if self.journald:
            text = f"{journald_prefix(record.levelname)}{text}"
        return text


def journald_prefix(levelname: str) -> str:
    """The `<N>` a line starts with for journald; a level it does not know is INFO."""
    return f"<{JOURNALD_PRIORITIES.get(levelname, 6)}>"


def setup_logging(environ: Mapping[str, str]) -> None:
    """Log to stderr at `$MONITOR_LOG_LEVEL` (default INFO), in journald's form when
    `$JOURNAL_STREAM` says stderr is the journal."""
    level = (environ.get("MONITOR_LOG_LEVEL") or "INFO").upper()
    # journald adds timestamps itself; a terminal wants them.
    journald = "JOURNAL_STREAM" in environ
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not journald:
        fmt = "%(asctime)s " + fmt
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RunnerFormatter(fmt, journald))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # APScheduler logs every job run at INFO.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    # peewee logs every query with its parameters at DEBUG, JIT configs included: never.
    logging.getLogger("peewee").setLevel(logging.INFO)
