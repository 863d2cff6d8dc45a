"""The HTTP edge: `make_app(config, monitor)` builds the Bottle app serving upstream's monitor
API (spec §3) and the dashboard.

Routes parse and check their input, then read the monitor's last observation and the store,
or hand a request to the monitor thread (`Monitor.call`) for anything that changes state.
Read-only lookups go through the monitor's adapters off that thread: guest addresses and
screenshots (libvirt), and a tokenless select's args artifact (GitHub). Errors are JSON
`{"error": …}` with a precise status; only pages meant for a browser render `error.tpl`; a
traceback never reaches a client.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import re
import sys
import threading
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

import bottle

from monitor import auth
from monitor import bootlog
from monitor import dashboard
from monitor import metrics
from monitor import models
from monitor import tokenless
from monitor import wire
from monitor.errors import MonitorError
from monitor.guests import parse_address
from monitor.loop import Monitor
from monitor.ratelimit import FixedWindowLimiter

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
# The API's OpenAPI description, shipped in the package (setup.cfg package_data).
OPENAPI = Path(__file__).resolve().parent / "openapi.json"
NOT_READY = "Monitor thread is still starting or not responding"
JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
HTML = "text/html; charset=utf-8"
PNG = "image/png"
# curl --retry honours Retry-After on a 503.
RETRY_AFTER_SECONDS = "5"
_QUALIFIED_REPO = re.compile(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+")
_BROWSER_PATHS = ("/", "/dashboard.html")
# More runners than any host holds; the override maths are linear in the counts.
MAX_OVERRIDE_COUNT = 1000
# The tokenless select's rate limit counts requests per repository in windows of this long.
SELECT_WINDOW_SECONDS = 60.0
# Recent events on the dashboard (and by default at /events), and at most at /events.
EVENTS_SHOWN = 20
EVENTS_MAX = 1000
# Reservation history: rows per page by default and at most; rows on the dashboard.
HISTORY_PAGE = 30
HISTORY_PAGE_MAX = 100
HISTORY_SHOWN = 15
# Token routes take no body; a signed request's is hashed up to this much.
MAX_SIGNED_BODY = 1 << 20
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


def _json(data: Any, status: int = 200) -> bottle.HTTPResponse:
    return bottle.HTTPResponse(json.dumps(data, sort_keys=True), status=status, content_type=JSON)


def make_app(config: Any, monitor: Monitor) -> bottle.Bottle:
    app = bottle.Bottle()
    lookup = [str(VIEWS)]
    boot_logs = bootlog.BootLogStore(config.data_path)
    credentials = auth.Credentials(
        upstream_token=config.api_token,
        token_hashes=config.api_tokens,
        hmac_secrets=config.hmac_secrets,
        revoked=models.revoked_credentials(),
    )

    def render(name: str, **values: Any) -> str:
        return bottle.template(name, template_lookup=lookup, **values)

    def wants_html() -> bool:
        request = bottle.request
        # The raw header: bottle's get_header raises on bytes that are not UTF-8.
        accept = request.environ.get("HTTP_ACCEPT", "")
        return request.path in _BROWSER_PATHS or ("text/html" in accept and request.method == "GET")

    def error_response(
        status: int, message: str, extra: dict[str, str] | None = None
    ) -> bottle.HTTPResponse:
        headers = {"Retry-After": RETRY_AFTER_SECONDS} if status == 503 else {}
        headers.update(extra or {})
        if not wants_html():
            response = _json({"error": message}, status)
        else:
            body = render("error", status=status, message=message)
            response = bottle.HTTPResponse(body, status=status, content_type=HTML)
        for name, value in headers.items():
            response.set_header(name, value)
        return response

    def handle_errors(callback: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return callback(*args, **kwargs)
            except bottle.HTTPResponse:
                raise
            except MonitorError as error:
                return error_response(error.status, error.message, error.headers)
            except UnicodeError:  # bottle decodes headers and forms as UTF-8 when read
                return error_response(400, "a header or parameter is not valid UTF-8")
            except Exception:  # noqa: BLE001 - never a traceback to a client
                log.exception("error handling %s %s", bottle.request.method, bottle.request.path)
                return error_response(500, "internal error; see the monitor's log")

        return wrapper

    app.install(handle_errors)

    for code, text in ((404, "Not found"), (405, "Method not allowed"), (500, "Internal error")):
        app.error(code)(lambda err, text=text, code=code: error_response(code, text, _allow(err)))

    # Request checks -----------------------------------------------------------------------

    def require_token() -> auth.Credential:
        """Upstream's auth, checked before parameters: no credential → 401, a wrong or
        revoked one → 403. A request may carry a bearer token or an HMAC signature."""
        request = bottle.request
        signed = request.get_header(auth.SIGNATURE_HEADER)
        if signed is None:
            return credentials.check_bearer(request.get_header("Authorization"))
        query = request.environ.get("QUERY_STRING", "")
        target = request.environ.get("PATH_INFO", "/") + (f"?{query}" if query else "")
        return credentials.check_signature(
            signed,
            request.get_header(auth.TIMESTAMP_HEADER),
            request.method,
            target,
            request.body.read(MAX_SIGNED_BODY),
            time.time(),
        )

    def client_address() -> str:
        """The guest's address: the TCP peer, or X-Real-IP when the peer is a trusted proxy
        (upstream believed X-Real-IP from anyone, so a guest could claim another's IP)."""
        peer = bottle.request.environ.get("REMOTE_ADDR", "")
        forwarded = bottle.request.get_header("X-Real-IP")
        if forwarded and _in_networks(peer, config.trusted_proxies):
            try:
                return str(ipaddress.ip_address(forwarded.strip()))
            except ValueError:
                raise MonitorError(f"bad X-Real-IP header: {forwarded!r}", 422) from None
        return peer

    def take_params() -> tuple[str, str, str]:
        query = bottle.request.query
        unique_id = _required(query, "unique_id")
        qualified_repo = _required(query, "qualified_repo")
        run_id = _required(query, "run_id")
        try:
            uuid.UUID(unique_id)  # validated only: artifact names and labels use it as given
        except ValueError:
            raise MonitorError(f"unique_id must be a UUID, got {unique_id!r}", 422) from None
        if not _QUALIFIED_REPO.fullmatch(qualified_repo):
            raise MonitorError(
                f"qualified_repo must be <owner>/<repo>, got {qualified_repo!r}", 422
            )
        if not run_id.isdigit() or not run_id.isascii():
            raise MonitorError(f"run_id must be a number, got {run_id!r}", 422)
        return unique_id, qualified_repo, run_id

    def parse_count(text: str) -> int:
        if not text.isdigit() or not text.isascii():
            raise MonitorError(f"count must be a number, got {text!r}", 422)
        count = int(text)
        if not 1 <= count <= config.take_max_count:
            raise MonitorError(f"count must be 1 to {config.take_max_count}, got {count}", 422)
        return count

    def thread_timeout(extra: float = 0.0) -> float:
        return (
            config.monitor_thread_send_timeout.total_seconds()
            + config.monitor_thread_recv_timeout.total_seconds()
            + extra
        )

    def run_take(profile_key: str, count: int, params: tuple[str, str, str]) -> Any:
        unique_id, qualified_repo, run_id = params
        # Upstream waits its recv timeout plus a second per runner.
        timeout = thread_timeout(count)
        return monitor.takes.request(profile_key, count, unique_id, qualified_repo, run_id, timeout)

    # Dashboard ----------------------------------------------------------------------------

    # The last render of the live fragment: (what it showed, body, ETag, when it began).
    # Browsers poll every second; a render of 100 runners costs ~6 ms, and usually nothing
    # has changed. Under load the page changes several times a second, so renders are made
    # one at a time: a poll that waited for another's render takes it if it began after the
    # poll arrived (measured by bench/load.py: every web thread rendering at once made
    # /dashboard.json wait seconds behind them).
    last_render: tuple[tuple[Any, ...], str, str, float] | None = None
    render_lock = threading.Lock()

    def live_state() -> tuple[tuple[Any, ...], Any, Any, dict[str, str]]:
        """What the fragment shows, as values that compare cheaply, and its parts."""
        observation = monitor.observation
        now = monitor.clock()
        health = dashboard.health(
            observation,
            registrations_at=monitor.registrations.fetched_at,
            github_error=monitor.registrations.error,
            rate_limit=getattr(monitor.github, "rate_limit", None),
            now=now,
            poll_interval=config.monitor_poll_interval,
            cache_timeout=config.api_cache_timeout,
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
            boot_logs.generation,
            monitor.holds,
        )
        return shown, observation, health, rebuilds

    def render_live() -> tuple[str, str]:
        """The live fragment and its ETag (a hash of its bytes: the same state, the same tag),
        rendered again only when something it shows has changed."""
        nonlocal last_render
        asked = time.monotonic()
        shown, observation, health, rebuilds = live_state()
        memo = last_render
        if memo is not None and _same(memo[0], shown):
            return memo[1], memo[2]
        with render_lock:
            memo = last_render
            if memo is not None and memo[3] >= asked:
                return memo[1], memo[2]
            started = time.monotonic()
            shown, observation, health, rebuilds = live_state()
            if memo is not None and _same(memo[0], shown):
                return memo[1], memo[2]
            body = render(
                "fragment",
                observation=observation,
                profiles=dashboard.overview(
                    observation,
                    list(config.profiles),
                    monitor.guests.addresses,
                    monitor.guests.screenshots.version,
                    rebuilds,
                    has_boot_log=boot_logs.exists,
                ),
                health=health,
                events=models.recent_events(EVENTS_SHOWN),
                holds=monitor.holds,
                drained=monitor.holds.drained_profiles(config.profiles),
                history=[
                    wire.take_record_json(row) for row in models.recent_takes(HISTORY_SHOWN)
                ],
                seconds=dashboard.format_seconds,
            )
            etag = '"' + hashlib.sha256(body.encode()).hexdigest()[:20] + '"'
            last_render = (shown, body, etag, started)
            return body, etag

    @app.get("/")
    def index() -> str:
        fragment, etag = render_live()
        return render("index", config=config, fragment=fragment, etag=etag)

    @app.get("/dashboard.html")
    def dashboard_html() -> bottle.HTTPResponse:
        if monitor.observation is None:
            raise MonitorError(NOT_READY, 503)
        body, etag = render_live()
        headers = {"ETag": etag, "Cache-Control": "no-cache"}
        if etag in _etags(bottle.request.get_header("If-None-Match", "")):
            return bottle.HTTPResponse(status=304, headers=headers)
        return bottle.HTTPResponse(body, content_type=HTML, headers=headers)

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
        return _json(
            {
                "observed_at": observation.at.isoformat() if observation else None,
                "github_error": monitor.registrations.error,
                "libvirt_error": observation.error if observation else None,
            }
        )

    openapi = openapi_document(config.take_max_count)

    @app.get("/openapi.json")
    def openapi_json() -> bottle.HTTPResponse:
        return bottle.HTTPResponse(openapi, content_type=JSON)

    # Reservations -------------------------------------------------------------------------

    @app.post("/profile/<profile_key>/take")
    @app.post("/profile/<profile_key>/take/<count>")
    def take(profile_key: str, count: str = "1") -> bottle.HTTPResponse:
        require_token()
        number = parse_count(count)
        return _json(run_take(profile_key, number, take_params()))

    select_limiter = (
        FixedWindowLimiter(config.select_runner_rate_limit, SELECT_WINDOW_SECONDS)
        if config.select_runner_rate_limit
        else None
    )

    @app.post("/select-runner")
    def select_runner() -> bottle.HTTPResponse:
        if config.queue_member:
            raise MonitorError("Tokenless select is disabled due to `queue_member` setting", 409)
        params = take_params()
        unique_id, qualified_repo, run_id = params
        # Anyone who can open a pull request can call this: a repository gets so many
        # selects a minute, counted before its artifact is fetched from GitHub.
        limit_headers: dict[str, str] = {}
        if select_limiter is not None:
            now = time.time()
            decision = select_limiter.hit(qualified_repo.lower(), now)
            limit_headers = decision.headers()
            if not decision.allowed:
                limit_headers["Retry-After"] = str(decision.retry_after(now))
                raise MonitorError(
                    f"too many tokenless selects for {qualified_repo}: at most "
                    f"{decision.limit} a minute",
                    429,
                    limit_headers,
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
        profile_key, count = tokenless.validate_select(
            monitor.github,
            allowed_prefix=config.allowed_qualified_repo_prefix,
            max_age=config.tokenless_select_artifact_max_age,
            unique_id=unique_id,
            qualified_repo=qualified_repo,
            run_id=run_id,
            now=monitor.clock(),
        )
        if not 1 <= count <= config.take_max_count:
            raise MonitorError(
                f"Bad self_hosted_runner_count in artifact: {count} (1 to {config.take_max_count})",
                403,
            )
        return _json(run_take(profile_key, count, params))

    # Guests (identified by their own token, or by their address) --------------------------

    address_only = config.guest_auth == "address"

    def guest_token() -> str:
        """The token the guest was given through libvirt, sent as `Authorization: Bearer`."""
        scheme, _, token = bottle.request.get_header("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise MonitorError(
                "Authorization: Bearer <guest token> required (the guest's SMBIOS OEM string "
                "monitor-guest-token=…)",
                401,
            )
        return token.strip()

    @app.get("/github-jitconfig")
    def github_jitconfig() -> bottle.HTTPResponse:
        if address_only:
            return _json(monitor.guests.jit_config_for(client_address()))
        return _json(monitor.guests.jit_config_for_token(guest_token()))

    @app.get("/boot")
    def boot() -> bottle.HTTPResponse:
        if address_only:
            script = monitor.guests.boot_script_for(client_address())
        else:
            script = monitor.guests.boot_script_for_token(guest_token())
        return bottle.HTTPResponse(script, content_type=TEXT)

    @app.post("/boot-log")
    def boot_log_upload() -> bottle.HTTPResponse:
        if address_only:
            runner_id = monitor.guests.runner_for_address(client_address()).id
        else:
            runner_id = monitor.guests.runner_for_guest_token(guest_token()).id
        length = bottle.request.content_length
        if length > boot_logs.max_bytes:  # refused before reading it
            raise MonitorError(f"a boot log chunk of {length} bytes is too big", 413)
        chunk = bottle.request.body.read(boot_logs.max_bytes + 1)
        return _json({"bytes": boot_logs.append(runner_id, chunk)})

    @app.get("/runner/<runner_id>/boot.log")
    def runner_boot_log(runner_id: str) -> bottle.HTTPResponse:
        text = boot_logs.read(_runner_id(runner_id))
        # A guest wrote it: never let a browser take it for HTML.
        headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
        return bottle.HTTPResponse(text, content_type=TEXT, headers=headers)

    # Screenshots --------------------------------------------------------------------------

    @app.get("/profile/<profile_key>/screenshot.png")
    def profile_screenshot(profile_key: str) -> bottle.HTTPResponse:
        if profile_key not in config.profiles:
            raise MonitorError(f"No profile with key: {profile_key}", 404)
        return _png_file(config.data_path / "profiles" / profile_key / "screenshot.png")

    @app.get("/runner/<runner_id>/screenshot.png")
    def runner_screenshot(runner_id: str) -> bottle.HTTPResponse:
        number = _runner_id(runner_id)
        return _png_file(config.data_path / "runners" / str(number) / "screenshot.png")

    @app.get("/runner/<runner_id>/thumbnail.png")
    def runner_thumbnail(runner_id: str) -> bottle.HTTPResponse:
        number = _runner_id(runner_id)
        return _png_file(config.data_path / "runners" / str(number) / "thumbnail.png")

    @app.get("/runner/<runner_id>/screenshot/now")
    def runner_screenshot_now(runner_id: str) -> bottle.HTTPResponse:
        png = monitor.guests.screenshot_now(_runner_id(runner_id))
        return bottle.HTTPResponse(png, content_type=PNG, headers={"Cache-Control": "no-store"})

    # Policy override ----------------------------------------------------------------------

    @app.get("/policy/override")
    def get_override() -> bottle.HTTPResponse:
        override = monitor.override
        return _json(override.to_json() if override is not None else None)

    @app.post("/policy/override")
    def post_override() -> bottle.HTTPResponse:
        require_token()
        counts = {}
        for key, value in bottle.request.query.allitems():
            if not value.isdigit() or not value.isascii() or int(value) > MAX_OVERRIDE_COUNT:
                raise MonitorError(
                    f"{key}: expected an integer from 0 to {MAX_OVERRIDE_COUNT}, got {value!r}",
                    422,
                )
            counts[key] = int(value)
        override = monitor.call(lambda: monitor.set_override(counts), thread_timeout())
        return _json(override.to_json())

    @app.delete("/policy/override")
    def delete_override() -> bottle.HTTPResponse:
        require_token()
        override = monitor.call(monitor.clear_override, thread_timeout())
        return _json(override.to_json() if override is not None else None)

    # Operator actions and the event log ---------------------------------------------------

    @app.post("/runner/<runner_id>/destroy")
    def destroy_runner(runner_id: str) -> bottle.HTTPResponse:
        require_token()
        number = _runner_id(runner_id)
        force = bottle.request.query.get("force", "") in ("1", "true", "yes")
        return _json(monitor.call(lambda: monitor.request_destroy(number, force), thread_timeout()))

    @app.get("/events")
    def events() -> bottle.HTTPResponse:
        query = bottle.request.query
        limit = _bounded(query, "limit", EVENTS_SHOWN, 1, EVENTS_MAX)
        runner = query.get("runner_id")
        rows = models.recent_events(limit, None if runner is None else _runner_id(runner))
        return _json([wire.event_json(event) for event in rows])

    # Reservation history ------------------------------------------------------------------

    @app.get("/reservations")
    def reservations() -> bottle.HTTPResponse:
        query = bottle.request.query
        page = _bounded(query, "page", 1, 1, 1_000_000)
        per_page = _bounded(query, "per_page", HISTORY_PAGE, 1, HISTORY_PAGE_MAX)
        sort = _single(query, "sort") or "asked_at"
        if sort not in models.HISTORY_SORTS:
            raise MonitorError(f"sort must be one of {', '.join(models.HISTORY_SORTS)}", 422)
        order = _single(query, "order") or "desc"
        if order not in ("asc", "desc"):
            raise MonitorError("order must be asc or desc", 422)
        profile = query.getunicode("profile") or None
        repo = query.getunicode("qualified_repo") or None
        total, rows = models.take_history(
            page=page,
            per_page=per_page,
            sort=sort,
            descending=order == "desc",
            profile=profile,
            qualified_repo=repo,
        )
        body = {
            "total": total,
            "page": page,
            "per_page": per_page,
            "reservations": [wire.take_record_json(row) for row in rows],
        }
        response = _json(body)
        last = max(1, -(-total // per_page))
        links = []
        for rel, number in (("next", page + 1), ("prev", page - 1), ("first", 1), ("last", last)):
            if 1 <= number <= last and (rel not in ("next", "prev") or number != page):
                params = {**dict(query.allitems()), "page": str(number)}
                target = "/reservations?" + urllib.parse.urlencode(params)
                links.append(f'<{target}>; rel="{rel}"')
        response.set_header("Link", ", ".join(links))
        return response

    # Drain, pause and maintenance ---------------------------------------------------------

    def hold(change: Any) -> bottle.HTTPResponse:
        require_token()
        holds = monitor.call(change, thread_timeout())
        return _json(holds.to_json())

    @app.get("/holds")
    def get_holds() -> bottle.HTTPResponse:
        return _json(monitor.holds.to_json())

    @app.post("/profile/<profile_key>/drain")
    def drain(profile_key: str) -> bottle.HTTPResponse:
        return hold(lambda: monitor.set_drained(profile_key, True))

    @app.delete("/profile/<profile_key>/drain")
    def undrain(profile_key: str) -> bottle.HTTPResponse:
        return hold(lambda: monitor.set_drained(profile_key, False))

    @app.post("/host/pause")
    def pause() -> bottle.HTTPResponse:
        return hold(lambda: monitor.set_paused(True))

    @app.delete("/host/pause")
    def resume() -> bottle.HTTPResponse:
        return hold(lambda: monitor.set_paused(False))

    @app.post("/host/maintenance")
    def maintenance_on() -> bottle.HTTPResponse:
        return hold(lambda: monitor.set_maintenance(True))

    @app.delete("/host/maintenance")
    def maintenance_off() -> bottle.HTTPResponse:
        return hold(lambda: monitor.set_maintenance(False))

    # API credentials --------------------------------------------------------------------

    @app.post("/revoke/<sha256>")
    def revoke(sha256: str) -> bottle.HTTPResponse:
        """Revoke an API token or HMAC secret by its SHA-256 (rerobots' POST /revoke)."""
        caller = require_token()
        if not _SHA256_HEX.fullmatch(sha256):
            raise MonitorError("expected the SHA-256 of a token as 64 hex digits", 422)
        credential = credentials.find(sha256.lower())
        if credential is None:
            raise MonitorError("no API token or HMAC secret has that SHA-256", 404)
        models.revoke_credential(credential.sha256, credential.name, monitor.clock())
        credentials.revoke(credential.sha256)
        message = f"API credential {credential.name!r} revoked by {caller.name!r}"
        log.warning("%s", message)
        models.record_event("revoke", message)
        return _json({"revoked": credential.name, "kind": credential.kind})

    # Static trees for guests --------------------------------------------------------------

    @app.get("/image-deps/")
    @app.get("/image-deps/<path:path>")
    def image_deps(path: str = "") -> Any:
        return _static(config.image_deps_dir, path, "/image-deps/")

    @app.get("/cache/servo/")
    @app.get("/cache/servo/<path:path>")
    def cached_servo(path: str = "") -> Any:
        # Dotfiles included: guests `git clone http://…/cache/servo/.git` (dumb HTTP).
        return _static(config.main_repo_path, path, "/cache/servo/")

    @app.get("/static/<path:path>")
    def static(path: str) -> Any:
        return _static(STATIC, path, "/static/")

    return app


def openapi_document(take_max_count: int) -> str:
    """monitor/openapi.json as this monitor serves it: with its own `take_max_count` as the
    largest `count` a take accepts."""
    document = json.loads(OPENAPI.read_text(encoding="utf-8"))
    document["components"]["parameters"]["Count"]["schema"]["maximum"] = take_max_count
    return json.dumps(document, indent=2)


def _allow(error: bottle.HTTPResponse) -> dict[str, str]:
    """The `Allow` header Bottle puts on a 405, kept in our answer (RFC 9110 requires it)."""
    allow = error.get_header("Allow")
    return {"Allow": allow} if allow else {}


def _single(query: bottle.FormsDict, name: str) -> str | None:
    """A query parameter given at most once (a repeated one is a 422, not the last copy)."""
    values = query.getall(name)
    if len(values) > 1:
        raise MonitorError(f"{name} may be given once, got {len(values)} values", 422)
    return values[0] if values else None


def _bounded(query: bottle.FormsDict, name: str, default: int, low: int, high: int) -> int:
    text = _single(query, name)
    if text is None or text == "":
        return default
    if not text.isdigit() or not text.isascii() or not low <= int(text) <= high:
        raise MonitorError(f"{name} must be a number from {low} to {high}, got {text!r}", 422)
    return int(text)


def _required(query: bottle.FormsDict, name: str) -> str:
    value = query.get(name)
    if value is None or value == "":
        raise MonitorError(f"missing query parameter {name}", 422)
    return query.getunicode(name) or value


def _runner_id(text: str) -> int:
    # Bounded: SQLite integers are 64-bit (a larger one was a 500, found by schemathesis).
    if not text.isdigit() or not text.isascii() or len(text) > 18:
        raise MonitorError(f"runner id must be a number below 10^18, got {text!r}", 422)
    return int(text)


def _in_networks(address: str, networks: Any) -> bool:
    parsed = parse_address(address)
    return parsed is not None and any(parsed in network for network in networks)


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


def _etags(header: str) -> set[str]:
    """The entity tags of an If-None-Match header (weak ones compared as strong: the page
    only asks whether its copy is current)."""
    return {tag.strip().removeprefix("W/") for tag in header.split(",") if tag.strip()}


def _same(old: tuple[Any, ...], new: tuple[Any, ...]) -> bool:
    return all(a is b or a == b for a, b in zip(old, new, strict=True))
