"""What a browser and a guest fetch as files or pages: the dashboard (/ and its live
fragment at /dashboard.html), screenshots and thumbnails, and the static trees (/static/,
/image-deps/, /cache/servo/). Runs on waitress' web threads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import bottle

from monitor import dashboard
from monitor import models
from monitor import wire
from monitor.errors import MonitorError
from monitor.web.context import EVENTS_SHOWN
from monitor.web.context import HTML
from monitor.web.context import NOT_READY
from monitor.web.context import PNG
from monitor.web.context import WebContext
from monitor.web.memo import RenderMemo
from monitor.web.params import etags
from monitor.web.params import parse_runner_id

# Rows of the reservation history on the dashboard.
HISTORY_SHOWN = 15


def add_routes(app: bottle.Bottle, context: WebContext) -> None:
    _add_dashboard_routes(app, context)
    _add_screenshot_routes(app, context)
    _add_static_routes(app, context)


class LiveFragment:
    """The dashboard's live fragment and its ETag, rendered again only when something it
    shows has changed (`RenderMemo`; a render of 100 runners costs ~6 ms)."""

    def __init__(self, context: WebContext) -> None:
        self._context = context
        self._memo: RenderMemo[tuple[tuple[Any, ...], Any, Any, dict[str, str]]] = RenderMemo(
            lambda old, new: _same(old[0], new[0])
        )

    def render(self) -> tuple[str, str]:
        """The fragment's body and ETag."""
        return self._memo.get(self._state, lambda state: self._render_body(*state[1:]))

    def _state(self) -> tuple[tuple[Any, ...], Any, Any, dict[str, str]]:
        """What the fragment shows, as values that compare cheaply, and its parts."""
        config = self._context.config
        monitor = self._context.monitor
        observation = monitor.observation
        now = monitor.clock()
        health = dashboard.health(
            observation,
            registrations_at=monitor.registrations.fetched_at,
            github_error=monitor.registrations.error,
            rate_limit=monitor.github.rate_limit,
            now=now,
            poll_interval=config.monitor_poll_interval,
            cache_timeout=config.api_cache_timeout,
            blocked=monitor.workers.blocked,
        )
        rebuilds = {key: monitor.rebuilds.state(key, now) for key in config.profiles}
        # The monitor replaces the observation and the address map whole when they change,
        # so an unchanged one is the same object and compares at once.
        shown = (
            observation,
            monitor.guests.addresses,
            monitor.guests.screenshots.generation,
            health,
            models.last_event_id(),
            models.last_take_id(),
            rebuilds,
            self._context.boot_logs.generation,
            monitor.holds,
        )
        return shown, observation, health, rebuilds

    def _render_body(self, observation: Any, health: Any, rebuilds: dict[str, str]) -> str:
        config = self._context.config
        monitor = self._context.monitor
        return self._context.render(
            "fragment",
            observation=observation,
            profiles=dashboard.overview(
                observation,
                list(config.profiles),
                monitor.guests.addresses,
                monitor.guests.screenshots.version,
                rebuilds,
                has_boot_log=self._context.boot_logs.exists,
            ),
            health=health,
            events=models.recent_events(EVENTS_SHOWN),
            holds=monitor.holds,
            drained=monitor.holds.drained_profiles(config.profiles),
            history=[wire.take_record_json(row) for row in models.recent_takes(HISTORY_SHOWN)],
            seconds=dashboard.format_seconds,
        )


def _add_dashboard_routes(app: bottle.Bottle, context: WebContext) -> None:
    live = LiveFragment(context)

    @app.get("/")
    def index() -> str:
        fragment, etag = live.render()
        return context.render("index", config=context.config, fragment=fragment, etag=etag)

    @app.get("/dashboard.html")
    def dashboard_html() -> bottle.HTTPResponse:
        if context.monitor.observation is None:
            raise MonitorError(NOT_READY, 503)
        body, etag = live.render()
        headers = {"ETag": etag, "Cache-Control": "no-cache"}
        if etag in etags(bottle.request.get_header("If-None-Match", "")):
            return bottle.HTTPResponse(status=304, headers=headers)
        return bottle.HTTPResponse(body, content_type=HTML, headers=headers)


def _add_screenshot_routes(app: bottle.Bottle, context: WebContext) -> None:
    config = context.config

    @app.get("/profile/<profile_key>/screenshot.png")
    def profile_screenshot(profile_key: str) -> bottle.HTTPResponse:
        if profile_key not in config.profiles:
            raise MonitorError(f"No profile with key: {profile_key}", 404)
        return _png_file(config.data_path / "profiles" / profile_key / "screenshot.png")

    @app.get("/runner/<runner_id>/screenshot.png")
    def runner_screenshot(runner_id: str) -> bottle.HTTPResponse:
        number = parse_runner_id(runner_id)
        return _png_file(config.data_path / "runners" / str(number) / "screenshot.png")

    @app.get("/runner/<runner_id>/thumbnail.png")
    def runner_thumbnail(runner_id: str) -> bottle.HTTPResponse:
        number = parse_runner_id(runner_id)
        return _png_file(config.data_path / "runners" / str(number) / "thumbnail.png")

    @app.get("/runner/<runner_id>/screenshot/now")
    def runner_screenshot_now(runner_id: str) -> bottle.HTTPResponse:
        png = context.monitor.guests.screenshot_now(parse_runner_id(runner_id))
        return bottle.HTTPResponse(png, content_type=PNG, headers={"Cache-Control": "no-store"})


def _add_static_routes(app: bottle.Bottle, context: WebContext) -> None:
    @app.get("/image-deps/")
    @app.get("/image-deps/<path:path>")
    def image_deps(path: str = "") -> Any:
        return _static(context.config.image_deps_dir, path, "/image-deps/")

    @app.get("/cache/servo/")
    @app.get("/cache/servo/<path:path>")
    def cached_servo(path: str = "") -> Any:
        # Dotfiles included: guests `git clone http://…/cache/servo/.git` (dumb HTTP).
        return _static(context.config.main_repo_path, path, "/cache/servo/")

    @app.get("/static/<path:path>")
    def static(path: str) -> Any:
        return _static(context.static_dir, path, "/static/")


def _png_file(path: Path) -> bottle.HTTPResponse:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MonitorError(f"no screenshot yet ({path.name})", 404) from None
    except OSError as error:
        raise MonitorError(f"cannot read the screenshot: {error.strerror}", 503) from None
    return bottle.HTTPResponse(data, content_type=PNG, headers={"Cache-Control": "no-cache"})


def _static(root: Path | None, path: str, mount: str) -> Any:
    """A file under `root`, never outside it (symlinks included). A directory asked for
    without its trailing slash is redirected to it, then 404: no listings (as upstream)."""
    if root is None:
        raise MonitorError(f"{mount} is not configured on this monitor", 404)
    base = root.resolve()
    try:
        target = (base / path).resolve()
    except (ValueError, OSError):  # e.g. a NUL byte, or a symlink loop
        raise MonitorError("Not found", 404) from None
    if target != base and base not in target.parents:
        raise MonitorError("Not found", 404)
    try:
        is_dir = target.is_dir()
    except OSError:  # e.g. a name longer than the file system allows (found by schemathesis)
        raise MonitorError("Not found", 404) from None
    if is_dir:
        if path and not path.endswith("/"):
            raise bottle.HTTPResponse(status=301, headers={"Location": f"{mount}{path}/"})
        raise MonitorError("Not found (no directory listings)", 404)
    response = bottle.static_file(str(target.relative_to(base)), root=str(base))
    if isinstance(response, bottle.HTTPError):
        raise MonitorError(str(response.body), response.status_code)
    return response


def _same(old: tuple[Any, ...], new: tuple[Any, ...]) -> bool:
    return all(a is b or a == b for a, b in zip(old, new, strict=True))
