"""The queue's HTTP edge: `make_queue_app(engine, config, validator, credentials)` serves
upstream's queue API (spec §10.2) over a `QueueEngine`, answer for answer where Servo's
`actions/runner-select` depends on it:

  POST /enqueue?unique_id&qualified_repo&run_id            tokenless: the args artifact is
       checked as `/select-runner` checks it; 200 text/plain, the body is the token
  POST /profile/<key>/enqueue[/<count>]?unique_id&qualified_repo&run_id[&priority]
       with a `reserve` credential; 200 text/plain token
  POST /take/<unique_id>?token=<token>                     200 application/json, the runner
       count, once served; 503 with an EMPTY body and Retry-After while waiting; 404 unknown,
       403 wrong token (neither retried by the client: it falls back at once)
  GET  /dashboard.txt                                      upstream's text dashboard
  GET  /healthz                                            JSON: the engine answers

The client's take is `curl --retry` writing every attempt's body to one file, then `jq -e .`
on it: so every answer the client retries (408, 429, 5xx, from the engine or from an error
here) has an empty body, or the final `jq` would fail after a success. Other errors are the
monitor's JSON `{"error": …}` (the client reads only the status). Parameters are checked as a
take's (`monitor.web.params`: 422), the error mapping, security headers and body limit are the
monitor's (`monitor.web`, `monitor.serving`). Routes run on waitress' web threads; they hold
no state of their own (the engine does).
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from datetime import UTC
from datetime import datetime
from typing import Any

import bottle

from monitor import auth
from monitor import tokenless
from monitor.config import Config
from monitor.errors import MonitorError
from monitor.queue import pages
from monitor.queue import views
from monitor.queue.contracts import QueueEngine
from monitor.queue.contracts import Snapshot
from monitor.web import VIEWS
from monitor.web import SecuredBottle
from monitor.web import error_plugin
from monitor.web import error_response
from monitor.web.context import JSON
from monitor.web.context import TEXT
from monitor.web.context import json_response
from monitor.web.params import parse_count
from monitor.web.params import parse_unique_id
from monitor.web.params import require_token
from monitor.web.params import single_param
from monitor.web.params import take_params

log = logging.getLogger(__name__)

# What a token may hold: it is pasted unencoded into the take URL.
_URL_SAFE = re.compile(r"[A-Za-z0-9_-]{1,128}")
# A take's token is at most this long; anything longer is not one of ours.
MAX_TOKEN = 128
# The statuses curl --retry retries (RFC 9110's transient ones): their bodies must be empty.
RETRIED = frozenset({408, 429, 500, 502, 503, 504})
# The authenticated enqueue's `priority`, as `[queue] repository_priority` bounds it.
MAX_PRIORITY = 1_000_000
_PRIORITY = re.compile(r"-?[0-9]{1,7}")
# A profile key is a config table name; bounded so junk stays out of member URLs and logs.
MAX_PROFILE_KEY = 100
# No route reads a body; a small one (`curl -d ''`) is let through and ignored.
MAX_BODY = 4096


def body_limit(method: str, path: str) -> int:
    """The longest request body `method path` may send (see `serving.create_server`)."""
    return MAX_BODY if method == "POST" else 0


def make_queue_app(
    engine: QueueEngine,
    config: Config,
    validator: tokenless.TokenlessValidator,
    credentials: auth.Credentials,
    *,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    dashboard_text: Callable[[Snapshot], str] | None = None,
) -> bottle.Bottle:
    """The queue's app over `engine`. `validator` checks tokenless enqueues (its GitHub
    budget and refusal memory); `credentials` guard the authenticated enqueue (share the
    monitor's, so a revocation closes both)."""
    app = SecuredBottle()
    lookup = [str(VIEWS)]

    def render(name: str, **values: Any) -> str:
        return bottle.template(name, template_lookup=lookup, **values)

    app.install(error_plugin(render))
    for code, text in ((404, "Not found"), (405, "Method not allowed"), (500, "Internal error")):
        app.error(code)(lambda err, text=text, code=code: _unrouted(render, err, code, text))
    _add_enqueue_routes(app, engine, config, validator, credentials, clock)
    _add_take_route(app, engine)
    _add_status_routes(app, engine, dashboard_text or views.dashboard_text)
    pages.install_view_routes(app, engine)  # the page, its live fragment, /queue.json, /metrics
    return app


def _add_enqueue_routes(
    app: bottle.Bottle,
    engine: QueueEngine,
    config: Config,
    validator: tokenless.TokenlessValidator,
    credentials: auth.Credentials,
    clock: Callable[[], datetime],
) -> None:
    limiter = tokenless.repo_limiter(config.select_runner_rate_limit)

    def enqueue(profile: str, count: int, params: tuple[str, str, str], priority: int | None):
        unique_id, qualified_repo, run_id = params
        token = engine.enqueue(
            unique_id=unique_id,
            profile=profile,
            count=count,
            qualified_repo=qualified_repo,
            run_id=run_id,
            priority=priority,
        )
        if not _URL_SAFE.fullmatch(token):
            log.error("the engine made a token that is not URL-safe for %s", unique_id)
            raise MonitorError("internal error: a token that is not URL-safe", 500)
        return bottle.HTTPResponse(token, content_type=TEXT)

    @app.post("/enqueue")
    def tokenless_enqueue() -> bottle.HTTPResponse:
        params = take_params()
        unique_id, qualified_repo, run_id = params
        # Anyone can call this: the prefix first, then the repository's rate, then the
        # validator's GitHub budget, as /select-runner.
        validator.check_repo(qualified_repo)
        headers = tokenless.count_repo_request(limiter, qualified_repo, time.time(), "enqueues")
        try:
            profile, count = validator.validate(
                unique_id=unique_id, qualified_repo=qualified_repo, run_id=run_id, now=clock()
            )
            if not 1 <= count <= config.take_max_count:
                raise MonitorError(
                    f"Bad self_hosted_runner_count in artifact: {count}"
                    f" (1 to {config.take_max_count})",
                    403,
                )
            response = enqueue(profile, count, params, None)
        except MonitorError as error:
            error.headers = {**headers, **error.headers}  # refusals say it too
            raise
        for name, value in headers.items():
            response.set_header(name, value)
        return response

    @app.post("/profile/<profile_key>/enqueue")
    @app.post("/profile/<profile_key>/enqueue/<count>")
    def authenticated_enqueue(profile_key: str, count: str = "1") -> bottle.HTTPResponse:
        require_token(credentials, auth.RESERVE)
        if len(profile_key) > MAX_PROFILE_KEY:
            raise MonitorError(f"profile key longer than {MAX_PROFILE_KEY} characters", 422)
        number = parse_count(count, config.take_max_count)
        params = take_params()
        return enqueue(profile_key, number, params, _priority())


def _priority() -> int | None:
    text = single_param(bottle.request.query, "priority")
    if text is None or text == "":
        return None
    if not _PRIORITY.fullmatch(text) or abs(int(text)) > MAX_PRIORITY:
        raise MonitorError(
            f"priority must be an integer from {-MAX_PRIORITY} to {MAX_PRIORITY},"
            f" got {text[:20]!r}",
            422,
        )
    return int(text)


def _add_take_route(app: bottle.Bottle, engine: QueueEngine) -> None:
    @app.post("/take/<unique_id>")
    def take(unique_id: str) -> bottle.HTTPResponse:
        parse_unique_id(unique_id)
        token = single_param(bottle.request.query, "token")
        if not token:
            raise MonitorError("missing query parameter token", 422)
        if len(token) > MAX_TOKEN:
            raise MonitorError(f"Bad token for {unique_id}", 403)
        try:
            answer = engine.poll(unique_id, token)
        except MonitorError as error:
            if error.status not in RETRIED:
                raise  # 403, 404, …: JSON; the client falls back at once
            log.info("take %s: %d %s", unique_id, error.status, error.message)
            retry_after = error.headers.get("Retry-After") or getattr(error, "retry_after", None)
            return _empty(error.status, retry_after or 1)
        except Exception:  # noqa: BLE001 - still an empty body: the client retries a 500
            log.exception("take %s failed", unique_id)
            return _empty(500, None)
        if not answer.served:
            return _empty(503, answer.retry_after)
        return bottle.HTTPResponse(str(int(answer.count)), content_type=JSON)


def _empty(status: int, retry_after: float | str | None) -> bottle.HTTPResponse:
    """An answer the client retries: no body at all (curl appends retried bodies to its
    output), `Retry-After` in whole seconds (curl waits the longer of it and 1 s)."""
    response = bottle.HTTPResponse(b"", status=status)
    response.content_type = TEXT
    if retry_after is not None:
        try:
            seconds = max(1, math.ceil(float(retry_after)))
        except ValueError:
            seconds = 1
        response.set_header("Retry-After", str(seconds))
    return response


def _add_status_routes(
    app: bottle.Bottle, engine: QueueEngine, dashboard_text: Callable[[Snapshot], str]
) -> None:
    @app.get("/dashboard.txt")
    def dashboard() -> bottle.HTTPResponse:
        return bottle.HTTPResponse(dashboard_text(engine.snapshot()), content_type=TEXT)

    @app.get("/healthz")
    def healthz() -> bottle.HTTPResponse:
        snapshot = engine.snapshot()  # a store that does not answer: 503 from the engine
        return json_response(
            {
                "taken_at": snapshot.taken_at.isoformat(),
                "entries": len(snapshot.entries),
                "members": len(snapshot.members),
                "fresh_members": sum(member.fresh for member in snapshot.members),
            }
        )


def _unrouted(
    render: Callable[..., str], error: bottle.HTTPResponse, code: int, text: str
) -> bottle.HTTPResponse:
    """Bottle's own 404/405/500 as the monitor answers them (JSON, with `Allow` on a 405);
    a 500 on the take route keeps an empty body (the client retries it)."""
    if code == 500 and bottle.request.path.startswith("/take/"):
        return _empty(500, None)
    allow = error.get_header("Allow")
    return error_response(render, code, text, {"Allow": allow} if allow else None)
