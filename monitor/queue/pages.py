"""The queue's page and what scrapers read, over a `QueueEngine`: `install_view_routes(app,
engine)` adds

  GET /                the queue page (server-rendered; static/queue.js keeps it live)
  GET /queue.html      its live fragment, with an ETag (304 when unchanged)
  GET /queue.json      the snapshot as JSON (`views.snapshot_json`; `monitor queue-status`)
  GET /metrics         Prometheus text (`views.metrics_text`)
  GET /static/live.js, /static/queue.js, /static/queue.css, /static/style.css   its files

Every URL the page uses is relative, so it works behind nginx's `location /queue/` as
upstream's page does. Routes run on waitress' web threads; each takes one snapshot, and an
engine's `MonitorError` (e.g. 503, store unreachable) is answered by the app's error plugin
(`monitor.web.error_plugin`), which the app must have installed.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC
from datetime import datetime
from typing import Any

import bottle

from monitor.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from monitor.queue import views
from monitor.queue.contracts import QueueEngine
from monitor.queue.contracts import Snapshot
from monitor.web import STATIC
from monitor.web import VIEWS
from monitor.web.context import HTML
from monitor.web.context import json_response
from monitor.web.memo import RenderMemo
from monitor.web.params import etags

STATIC_FILES = ("live.js", "queue.js", "queue.css", "style.css")


class QueueFragment:
    """The page's live fragment and its ETag, rendered again only when what it shows
    (`views.page_model`) has changed (`RenderMemo`, as the dashboard's). Also feeds every
    snapshot taken to `tally`, the wait histogram of `/metrics`.
    """

    def __init__(
        self,
        engine: QueueEngine,
        render: Callable[..., str],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.engine = engine
        self._render = render
        self.tally = views.WaitTally(since=clock())
        self._memo: RenderMemo[views.QueuePage] = RenderMemo()

    def snapshot(self) -> Snapshot:
        snapshot = self.engine.snapshot()
        self.tally.observe(snapshot)
        return snapshot

    def render(self) -> tuple[str, str]:
        """The fragment's body and ETag."""
        return self._memo.get(
            lambda: views.page_model(self.snapshot()),
            lambda page: self._render("queue_fragment", page=page),
        )


def install_view_routes(app: bottle.Bottle, engine: QueueEngine) -> QueueFragment:
    """Add the page, its fragment, /queue.json, /metrics and the page's static files to
    `app`; returns the fragment (its `tally` holds the wait histogram)."""
    lookup = [str(VIEWS)]  # one list: bottle caches compiled templates by its id

    def render(name: str, **values: Any) -> str:
        return bottle.template(name, template_lookup=lookup, **values)

    live = QueueFragment(engine, render)

    @app.get("/")
    def index() -> str:
        fragment, etag = live.render()
        return render("queue", fragment=fragment, etag=etag)

    @app.get("/queue.html")
    def queue_html() -> bottle.HTTPResponse:
        body, etag = live.render()
        headers = {"ETag": etag, "Cache-Control": "no-cache"}
        if etag in etags(bottle.request.get_header("If-None-Match", "")):
            return bottle.HTTPResponse(status=304, headers=headers)
        return bottle.HTTPResponse(body, content_type=HTML, headers=headers)

    @app.get("/queue.json")
    def queue_json() -> bottle.HTTPResponse:
        response = json_response(views.snapshot_json(live.snapshot()))
        response.set_header("Cache-Control", "no-cache")
        return response

    @app.get("/metrics")
    def metrics() -> bottle.HTTPResponse:
        text = views.metrics_text(live.snapshot(), live.tally)
        return bottle.HTTPResponse(text, content_type=METRICS_CONTENT_TYPE)

    for name in STATIC_FILES:

        @app.get(f"/static/{name}")
        def static(name: str = name) -> Any:
            return bottle.static_file(name, root=str(STATIC))

    return live
