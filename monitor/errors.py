"""The one error type the rest of the monitor raises and the web edge maps to HTTP.

Leaf module: imports only the standard library, so every other module may import it.
"""

from __future__ import annotations


class MonitorError(Exception):
    """An expected failure with a message fit for a client or a log line.

    `status` is the HTTP status the web layer answers with. Adapters (GitHub, libvirt)
    turn their library's errors into this type, so callers handle one thing.
    """

    def __init__(
        self, message: str, status: int = 500, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        # Extra response headers the answer needs (a 429's Retry-After and rate limit).
        self.headers = headers or {}

    def __str__(self) -> str:
        return self.message


class ConfigError(MonitorError):
    """A configuration file or environment that cannot be used; the message names
    the file, table and key. The CLI prints it and exits 2."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=500)


class TransientError(MonitorError):
    """A failure worth retrying later: a GitHub 5xx/429/403-rate-limit, a timeout, a
    libvirt connection problem. `retry_after` (seconds) is set when the peer said so."""

    def __init__(self, message: str, status: int = 503, retry_after: float | None = None) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after
