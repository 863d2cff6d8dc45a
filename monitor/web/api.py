"""Upstream's monitor API (spec §3): takes, the tokenless select, the policy override, the
status documents (dashboard.json, healthz, metrics, openapi.json), events and the reservation
history. Routes run on waitress' web threads; anything that changes state is handed to the
monitor thread with `Monitor.call`."""

from __future__ import annotations

import logging
import time
import urllib.parse
from typing import Any

import bottle

from monitor import auth
from monitor import metrics
from monitor import models
from monitor import tokenless
from monitor import wire
from monitor.errors import MonitorError
from monitor.web.context import EVENTS_SHOWN
from monitor.web.context import JSON
from monitor.web.context import NOT_READY
from monitor.web.context import WebContext
from monitor.web.context import json_response
from monitor.web.params import bounded_param
from monitor.web.params import parse_count
from monitor.web.params import parse_runner_id
from monitor.web.params import parse_unique_id
from monitor.web.params import require_token
from monitor.web.params import single_param
from monitor.web.params import take_params

log = logging.getLogger(__name__)

# More runners than any host holds; the override maths are linear in the counts.
MAX_OVERRIDE_COUNT = 1000
# At most this many events at /events.
EVENTS_MAX = 1000
# Reservation history: rows per page by default and at most.
HISTORY_PAGE = 30
HISTORY_PAGE_MAX = 100


def add_routes(app: bottle.Bottle, context: WebContext) -> None:
    _add_take_routes(app, context)
    _add_status_routes(app, context)
    _add_override_routes(app, context)
    _add_history_routes(app, context)


def run_take(
    context: WebContext, profile_key: str, count: int, params: tuple[str, str, str]
) -> Any:
    """Take runners for a client; the take records itself in the history and the metrics."""
    unique_id, qualified_repo, run_id = params
    # Upstream waits its recv timeout plus a second per runner.
    timeout = context.thread_timeout(count)
    return context.monitor.takes.request(
        profile_key, count, unique_id, qualified_repo, run_id, timeout
    )


def _add_take_routes(app: bottle.Bottle, context: WebContext) -> None:
    config = context.config
    select_limiter = tokenless.repo_limiter(config.select_runner_rate_limit)
    validator = tokenless.TokenlessValidator(
        context.monitor.github,
        allowed_prefix=config.allowed_qualified_repo_prefix,
        max_age=config.tokenless_select_artifact_max_age,
        calls_per_hour=config.tokenless_github_calls_per_hour,
    )

    @app.post("/profile/<profile_key>/take")
    @app.post("/profile/<profile_key>/take/<count>")
    def take(profile_key: str, count: str = "1") -> bottle.HTTPResponse:
        require_token(context.credentials, auth.RESERVE)
        number = parse_count(count, config.take_max_count)
        return json_response(run_take(context, profile_key, number, take_params()))

    @app.delete("/reservation/<unique_id>")
    def release(unique_id: str) -> bottle.HTTPResponse:
        """Give back the runners a take reserved for `unique_id` whose job has not started
        (the global queue, when it cannot serve the entry they were for)."""
        require_token(context.credentials, auth.RESERVE)
        parse_unique_id(unique_id)
        monitor = context.monitor
        return json_response(
            monitor.call(lambda: monitor.takes.release(unique_id), context.thread_timeout())
        )

    @app.post("/select-runner")
    def select_runner() -> bottle.HTTPResponse:
        if config.queue_member:
            raise MonitorError("Tokenless select is disabled due to `queue_member` setting", 409)
        params = take_params()
        unique_id, qualified_repo, run_id = params
        # Anyone can call this. Only repositories under the prefix are counted; each gets so
        # many selects a minute before its artifact is fetched from GitHub, and all of them
        # together so many GitHub calls an hour (the validator's budget).
        validator.check_repo(qualified_repo)
        limit_headers = tokenless.count_repo_request(
            select_limiter, qualified_repo, time.time(), "selects"
        )
        try:
            response = select_runner_checked(params)
        except MonitorError as error:
            error.headers = {**limit_headers, **error.headers}  # refusals say it too
            raise
        for name, value in limit_headers.items():
            response.set_header(name, value)
        return response

    def select_runner_checked(params: tuple[str, str, str]) -> bottle.HTTPResponse:
        unique_id, qualified_repo, run_id = params
        profile_key, count = validator.validate(
            unique_id=unique_id,
            qualified_repo=qualified_repo,
            run_id=run_id,
            now=context.monitor.clock(),
        )
        if not 1 <= count <= config.take_max_count:
            raise MonitorError(
                f"Bad self_hosted_runner_count in artifact: {count} (1 to {config.take_max_count})",
                403,
            )
        return json_response(run_take(context, profile_key, count, params))


def _add_status_routes(app: bottle.Bottle, context: WebContext) -> None:
    monitor = context.monitor

    @app.get("/dashboard.json")
    def dashboard_json() -> bottle.HTTPResponse:
        rendered = monitor.rendered
        if rendered is None:
            raise MonitorError(NOT_READY, 503)
        return bottle.HTTPResponse(rendered.json, content_type=JSON)

    @app.get("/metrics")
    def prometheus_metrics() -> bottle.HTTPResponse:
        return bottle.HTTPResponse(monitor.metrics.exposition(), content_type=metrics.CONTENT_TYPE)

    @app.get("/healthz")
    def healthz() -> bottle.HTTPResponse:
        observation = monitor.observation
        return json_response(
            {
                "observed_at": observation.at.isoformat() if observation else None,
                "github_error": monitor.registrations.error,
                "libvirt_error": observation.error if observation else None,
                "blocked_profiles": {
                    key: blocker.as_json() for key, blocker in monitor.workers.blocked.items()
                },
            }
        )

    @app.get("/openapi.json")
    def openapi_json() -> bottle.HTTPResponse:
        return bottle.HTTPResponse(context.openapi, content_type=JSON)


def _add_override_routes(app: bottle.Bottle, context: WebContext) -> None:
    monitor = context.monitor

    @app.get("/policy/override")
    def get_override() -> bottle.HTTPResponse:
        override = monitor.override
        return json_response(override.to_json() if override is not None else None)

    @app.post("/policy/override")
    def post_override() -> bottle.HTTPResponse:
        require_token(context.credentials, auth.OPERATE)
        counts = {}
        for key, value in bottle.request.query.allitems():
            if not value.isdigit() or not value.isascii() or int(value) > MAX_OVERRIDE_COUNT:
                raise MonitorError(
                    f"{key}: expected an integer from 0 to {MAX_OVERRIDE_COUNT}, got {value!r}",
                    422,
                )
            counts[key] = int(value)
        override = monitor.call(lambda: monitor.set_override(counts), context.thread_timeout())
        return json_response(override.to_json())

    @app.delete("/policy/override")
    def delete_override() -> bottle.HTTPResponse:
        require_token(context.credentials, auth.OPERATE)
        override = monitor.call(monitor.clear_override, context.thread_timeout())
        return json_response(override.to_json() if override is not None else None)


def _add_history_routes(app: bottle.Bottle, context: WebContext) -> None:
    @app.get("/events")
    def events() -> bottle.HTTPResponse:
        query = bottle.request.query
        limit = bounded_param(query, "limit", EVENTS_SHOWN, 1, EVENTS_MAX)
        runner = query.get("runner_id")
        rows = models.recent_events(limit, None if runner is None else parse_runner_id(runner))
        return json_response([wire.event_json(event) for event in rows])

    @app.get("/reservations")
    def reservations() -> bottle.HTTPResponse:
        query = bottle.request.query
        page = bounded_param(query, "page", 1, 1, 1_000_000)
        per_page = bounded_param(query, "per_page", HISTORY_PAGE, 1, HISTORY_PAGE_MAX)
        sort = single_param(query, "sort") or "asked_at"
        if sort not in models.HISTORY_SORTS:
            raise MonitorError(f"sort must be one of {', '.join(models.HISTORY_SORTS)}", 422)
        order = single_param(query, "order") or "desc"
        if order not in ("asc", "desc"):
            raise MonitorError("order must be asc or desc", 422)
        total, rows = models.take_history(
            page=page,
            per_page=per_page,
            sort=sort,
            descending=order == "desc",
            profile=query.getunicode("profile") or None,
            qualified_repo=query.getunicode("qualified_repo") or None,
        )
        response = json_response(
            {
                "total": total,
                "page": page,
                "per_page": per_page,
                "reservations": [wire.take_record_json(row) for row in rows],
            }
        )
        response.set_header("Link", _page_links(query, page, per_page, total))
        return response


def _page_links(query: bottle.FormsDict, page: int, per_page: int, total: int) -> str:
    """The reservation history's `Link` header: next, prev, first and last page."""
    last = max(1, -(-total // per_page))
    links = []
    for rel, number in (("next", page + 1), ("prev", page - 1), ("first", 1), ("last", last)):
        if 1 <= number <= last and (rel not in ("next", "prev") or number != page):
            params = {**dict(query.allitems()), "page": str(number)}
            target = "/reservations?" + urllib.parse.urlencode(params)
            links.append(f'<{target}>; rel="{rel}"')
    return ", ".join(links)
