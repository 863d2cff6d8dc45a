"""The HTTP edge: `make_app(config, monitor)` builds the Bottle app serving upstream's monitor
API (spec §3) and the dashboard.

Routes parse and check their input, then read the monitor's last observation and the store,
or hand a request to the monitor thread (`Monitor.call`) for anything that changes state.
Read-only lookups go through the monitor's adapters off that thread: guest addresses and
screenshots (libvirt), and a tokenless select's args artifact (GitHub). Errors are JSON
`{"error": …}` with a precise status; only pages meant for a browser render `error.tpl`; a
traceback never reaches a client.

The routes live in one module per group (`api`, `pages`, `guest_routes`, `operator`), each
adding its routes to the app from the shared `WebContext`; `params` parses requests.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import bottle

from monitor import auth
from monitor import bootlog
from monitor import models
from monitor.errors import MonitorError
from monitor.loop import Monitor
from monitor.web import api
from monitor.web import guest_routes
from monitor.web import operator
from monitor.web import pages
from monitor.web.context import HTML
from monitor.web.context import NOT_READY
from monitor.web.context import WebContext
from monitor.web.context import json_response
from monitor.web.headers import secure_headers

__all__ = [
    "NOT_READY",
    "OPENAPI",
    "ROOT",
    "VIEWS",
    "SecuredBottle",
    "asset_dir",
    "body_limit",
    "credentials_for",
    "error_plugin",
    "error_response",
    "make_app",
    "openapi_document",
]

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent.parent


def asset_dir(name: str, prefix: str = sys.prefix) -> Path:
    """`views` or `static`: beside the package in a source checkout (editable install), else
    where a regular install put them (setup.cfg data_files: <prefix>/share/monitor)."""
    for base in (ROOT, Path(prefix) / "share" / "monitor"):
        if (base / name).is_dir():
            return base / name
    return ROOT / name


VIEWS = asset_dir("views")
STATIC = asset_dir("static")
# The API's OpenAPI description, shipped in the package (setup.cfg package_data).
OPENAPI = Path(__file__).resolve().parent.parent / "openapi.json"
# curl --retry honours Retry-After on a 503.
RETRY_AFTER_SECONDS = "5"
_BROWSER_PATHS = ("/", "/dashboard.html")
# The largest request body a route of ours reads: a signed request's (params.MAX_SIGNED_BODY)
# and a take's are far below it. Only methods that carry a body may send one.
MAX_BODY = 1024 * 1024
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def body_limit(method: str, path: str) -> int:
    """The longest request body, in bytes, that `method path` may send: the server (see
    `serving.create_server`) answers 413 from the headers of a longer one, before reading
    it, and before any route or credential check runs."""
    if method == "POST" and path == "/boot-log":
        return bootlog.MAX_BYTES
    return MAX_BODY if method in _BODY_METHODS else 0


class SecuredBottle(bottle.Bottle):
    """A Bottle app whose every answer carries the security headers (`headers.py`); added
    where the status and headers go to the server, since Bottle's `after_request` hooks are
    lost on answers that are `HTTPResponse`s (most of ours, and every error page)."""

    def wsgi(self, environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")

        def secured(status: str, response_headers: list[Any], exc_info: Any = None) -> Any:
            return start_response(status, secure_headers(path, status, response_headers), exc_info)

        return super().wsgi(environ, secured)


def credentials_for(config: Any, revoked: Iterable[str]) -> auth.Credentials:
    """The API credentials `config` configures, minus the `revoked` SHA-256s."""
    return auth.Credentials(
        upstream_token=config.api_token,
        token_hashes=config.api_tokens,
        hmac_secrets=config.hmac_secrets,
        revoked=revoked,
        token_scopes=config.api_token_scopes,
        hmac_scopes=config.hmac_scopes,
    )


def make_app(
    config: Any, monitor: Monitor, credentials: auth.Credentials | None = None
) -> bottle.Bottle:
    """The monitor's app. `credentials` (default: the config's, minus the store's
    revocations) may be shared with the queue's app, so a revocation closes both."""
    app = SecuredBottle()
    lookup = [str(VIEWS)]

    def render(name: str, **values: Any) -> str:
        return bottle.template(name, template_lookup=lookup, **values)

    context = WebContext(
        config=config,
        monitor=monitor,
        credentials=credentials or credentials_for(config, models.revoked_credentials()),
        boot_logs=bootlog.BootLogStore(config.data_path),
        render=render,
        static_dir=STATIC,
        openapi=openapi_document(config.take_max_count),
    )
    app.install(error_plugin(render))
    for code, text in ((404, "Not found"), (405, "Method not allowed"), (500, "Internal error")):
        app.error(code)(
            lambda err, text=text, code=code: error_response(render, code, text, _allow(err))
        )
    pages.add_routes(app, context)
    api.add_routes(app, context)
    guest_routes.add_routes(app, context)
    operator.add_routes(app, context)
    return app


def openapi_document(take_max_count: int) -> str:
    """monitor/openapi.json as this monitor serves it: with its own `take_max_count` as the
    largest `count` a take accepts."""
    document = json.loads(OPENAPI.read_text(encoding="utf-8"))
    document["components"]["parameters"]["Count"]["schema"]["maximum"] = take_max_count
    return json.dumps(document, indent=2)


def wants_html() -> bool:
    """Whether the current request's error is answered as a page rather than JSON."""
    request = bottle.request
    # The raw header: bottle's get_header raises on bytes that are not UTF-8.
    accept = request.environ.get("HTTP_ACCEPT", "")
    return request.path in _BROWSER_PATHS or ("text/html" in accept and request.method == "GET")


def error_response(
    render: Callable[..., str], status: int, message: str, extra: dict[str, str] | None = None
) -> bottle.HTTPResponse:
    headers = {"Retry-After": RETRY_AFTER_SECONDS} if status == 503 else {}
    headers.update(extra or {})
    if not wants_html():
        response = json_response({"error": message}, status)
    else:
        body = render("error", status=status, message=message)
        response = bottle.HTTPResponse(body, status=status, content_type=HTML)
    for name, value in headers.items():
        response.set_header(name, value)
    return response


def error_plugin(render: Callable[..., str]) -> Callable[[Any], Any]:
    """A Bottle plugin answering a route's `MonitorError` with its status, and any other
    exception with a 500 (logged, never shown to the client)."""

    def handle_errors(callback: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return callback(*args, **kwargs)
            except bottle.HTTPResponse:
                raise
            except MonitorError as error:
                return error_response(render, error.status, error.message, error.headers)
            except UnicodeError:  # bottle decodes headers and forms as UTF-8 when read
                return error_response(render, 400, "a header or parameter is not valid UTF-8")
            except Exception:  # noqa: BLE001 - never a traceback to a client
                log.exception("error handling %s %s", bottle.request.method, bottle.request.path)
                return error_response(render, 500, "internal error; see the monitor's log")

        return wrapper

    return handle_errors


def _allow(error: bottle.HTTPResponse) -> dict[str, str]:
    """The `Allow` header Bottle puts on a 405, kept in our answer (RFC 9110 requires it)."""
    allow = error.get_header("Allow")
    return {"Allow": allow} if allow else {}
