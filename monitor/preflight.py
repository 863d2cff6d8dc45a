"""What `monitor check-config --host` reports: one `Check` per thing looked at, each `ok`,
`warn` or `FAIL` with the fix for a failure, and how the report is printed (text or JSON).

Pure: no I/O. The checks themselves live beside the adapter they need (libvirt in
`monitor.hypervisor.preflight`, GitHub in `monitor.github_checks`, the host's own memory,
addresses and ports in `monitor.host_checks`); `monitor.doctor` runs them in order.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable
from dataclasses import dataclass


class Status(enum.StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Check:
    """One thing looked at. `subject` names it ("libvirt", "profile servo-ubuntu2204",
    "GitHub token"); `detail` says what was found; `fix` what to do about a warn or FAIL."""

    subject: str
    status: Status
    detail: str
    fix: str = ""

    @classmethod
    def ok(cls, subject: str, detail: str) -> Check:
        return cls(subject, Status.OK, detail)

    @classmethod
    def warn(cls, subject: str, detail: str, fix: str = "") -> Check:
        return cls(subject, Status.WARN, detail, fix)

    @classmethod
    def fail(cls, subject: str, detail: str, fix: str) -> Check:
        return cls(subject, Status.FAIL, detail, fix)

    def as_json(self) -> dict[str, str]:
        return {
            "subject": self.subject,
            "status": self.status.value,
            "detail": self.detail,
            "fix": self.fix,
        }


def failed(checks: Iterable[Check]) -> bool:
    return any(check.status is Status.FAIL for check in checks)


def exit_status(checks: Iterable[Check]) -> int:
    """0 when nothing failed (warnings included), 2 otherwise, like a bad config."""
    return 2 if failed(checks) else 0


def render_text(checks: Iterable[Check]) -> str:
    """One line per check, `ok  `/`warn`/`FAIL` first, the fix indented on the next line."""
    lines = []
    for check in checks:
        lines.append(f"{check.status.value:<4}  {check.subject}: {check.detail}")
        if check.fix:
            lines.append(f"      fix: {check.fix}")
    return "\n".join(lines)


def render_json(checks: Iterable[Check]) -> str:
    listed = list(checks)
    return json.dumps(
        {
            "ok": not failed(listed),
            "failures": sum(check.status is Status.FAIL for check in listed),
            "warnings": sum(check.status is Status.WARN for check in listed),
            "checks": [check.as_json() for check in listed],
        },
        indent=2,
    )
