"""A clock for fakes and a Monitor that a test moves by hand."""

from __future__ import annotations

from datetime import UTC
from datetime import datetime
from datetime import timedelta


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
