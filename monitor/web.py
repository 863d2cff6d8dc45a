"""The HTTP edge: `make_app(...)` builds a Bottle app whose routes read the monitor's last
observation and the store. Routes never call libvirt or GitHub; anything that changes state
is a request to the monitor thread. Errors are JSON `{"error": …}` under the API and
`error.tpl` for pages; a traceback never reaches a client.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import bottle

from monitor import dashboard
from monitor import models
from monitor.errors import MonitorError
from monitor.loop import Monitor

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent


def asset_dir(name: str, prefix: str = sys.prefix) -> Path:
    """`views` or `static`: beside the package in a source checkout (editable install), else
    where a regular install put them (setup.cfg data_files: <prefix>/share/monitor)."""
    for base in (ROOT, Path(prefix) / "share" / "monitor"):
        if (base / name).is_dir():
            return base / name
    return ROOT / name


VIEWS = asset_dir("views")
STATIC = asset_dir("static")
NOT_READY = "Monitor thread is still starting or not responding"


def _json(data: Any, status: int = 200) -> bottle.HTTPResponse:
    return bottle.HTTPResponse(
        json.dumps(data, sort_keys=True), status=status, content_type="application/json"
    )


def make_app(config: Any, monitor: Monitor) -> bottle.Bottle:
    app = bottle.Bottle()
    lookup = [str(VIEWS)]

    def render(name: str, **values: Any) -> str:
        return bottle.template(name, template_lookup=lookup, **values)

    def wants_json() -> bool:
        path = bottle.request.path
        return path.endswith(".json") or path.startswith(("/api/", "/policy/", "/profile/"))

    def error_response(status: int, message: str) -> bottle.HTTPResponse:
        if wants_json():
            return _json({"error": message}, status)
        body = render("error", status=status, message=message)
        return bottle.HTTPResponse(body, status=status, content_type="text/html; charset=utf-8")

    def handle_errors(callback: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return callback(*args, **kwargs)
            except bottle.HTTPResponse:
                raise
            except MonitorError as error:
                return error_response(error.status, error.message)
            except Exception:  # noqa: BLE001 - never a traceback to a client
                log.exception("error handling %s %s", bottle.request.method, bottle.request.path)
                return error_response(500, "internal error; see the monitor's log")

        return wrapper

    app.install(handle_errors)

    for code in (404, 405, 500):
        app.error(code)(lambda err, code=code: error_response(code, str(err.body or err.status)))

    @app.get("/")
    def index() -> str:
        now = monitor.clock()
        observation = monitor.observation
        profiles = dashboard.overview(observation, list(config.profiles), now)
        return render(
            "index",
            config=config,
            observation=observation,
            profiles=profiles,
            github_error=monitor.github_error,
            events=models.recent_events(30),
            now=now,
        )

    @app.get("/dashboard.json")
    def dashboard_json() -> bottle.HTTPResponse:
        observation = monitor.observation
        if observation is None:
            raise MonitorError(NOT_READY, status=503)
        return _json(dashboard.dashboard_json(observation, config.external_base_url))

    @app.get("/healthz")
    def healthz() -> bottle.HTTPResponse:
        observation = monitor.observation
        return _json(
            {
                "observed_at": observation.at.isoformat() if observation else None,
                "github_error": monitor.github_error,
                "libvirt_error": observation.error if observation else None,
            }
        )

    @app.get("/static/<path:path>")
    def static(path: str) -> Any:
        return bottle.static_file(path, root=str(STATIC))

    return app
