"""What every group of routes shares: the `WebContext` that `make_app` builds once, the
content types, and the JSON answer."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bottle

from monitor import auth
from monitor import bootlog
from monitor.loop import Monitor

NOT_READY = "Monitor thread is still starting or not responding"
JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
HTML = "text/html; charset=utf-8"
PNG = "image/png"
# Recent events on the dashboard, and by default at /events.
EVENTS_SHOWN = 20


@dataclass(frozen=True)
class WebContext:
    """The app's shared parts, read by the routes on waitress' web threads. `credentials`
    and `boot_logs` guard their own state; the rest is not changed after `make_app`."""

    config: Any
    monitor: Monitor
    credentials: auth.Credentials
    boot_logs: bootlog.BootLogStore
    # Renders a template of views/ by name with the given values.
    render: Callable[..., str]
    # Where /static/ serves from.
    static_dir: Path
    # This monitor's OpenAPI document, as /openapi.json serves it.
    openapi: str

    def thread_timeout(self, extra: float = 0.0) -> float:
        """How long a route waits for the monitor thread to answer a request."""
        return (
            self.config.monitor_thread_send_timeout.total_seconds()
            + self.config.monitor_thread_recv_timeout.total_seconds()
            + extra
        )


def json_response(data: Any, status: int = 200) -> bottle.HTTPResponse:
    return bottle.HTTPResponse(json.dumps(data, sort_keys=True), status=status, content_type=JSON)
