"""The GitHub REST client: the only module that talks HTTP to GitHub.

It owns the handful of self-hosted-runner and artifact endpoints the monitor uses (spec §9),
turns their JSON into small frozen dataclasses, and turns every failure into `MonitorError`
(`TransientError` for what is worth retrying: timeouts, 5xx, 429, rate-limit 403;
`GitHubRefused` for any other 4xx, with GitHub's status and message). It never
retries by itself; the monitor loop tries again on a later tick. It imports only `errors`,
`policy` (for `Registration`) and urllib3, and never logs or raises the token or a JIT config.

The same client works against api.github.com and against `monitor.standin`; only the
base URL differs.
"""

from __future__ import annotations

import collections
import email.utils
import json
import logging
import re
import threading
import time
import urllib.parse
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from datetime import UTC
from datetime import datetime
from typing import Any
from typing import Protocol
from typing import runtime_checkable
from urllib.parse import urljoin
from urllib.parse import urlsplit

import urllib3

from monitor import __version__
from monitor.errors import MonitorError
from monitor.errors import TransientError
from monitor.policy import Registration

log = logging.getLogger(__name__)

# At least the monitor's reserve pool + its workers + the scheduler: a connection per
# concurrent caller, or each extra one pays a fresh TCP + TLS handshake to GitHub.
POOL_SIZE = 40

API_VERSION = "2022-11-28"
USER_AGENT = f"servo-ci-monitor/{__version__} (+https://github.com/servo/ci-runners)"
PER_PAGE = 100
# A runaway `Link: rel="next"` chain (or a loop) must not hang a worker thread.
MAX_PAGES = 200
MAX_REDIRECTS = 5
# The args artifact is a zip of a few hundred bytes (its file may be 64 KiB at most); the
# whole archive is held in memory, so anything much bigger is refused.
MAX_DOWNLOAD_BYTES = 1024 * 1024
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})

_LINK_RE = re.compile(r'<([^>]*)>\s*;\s*rel="?([^",;]+)"?')
_REPO_PART_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


class GitHubRefused(MonitorError):
    """GitHub answered a 4xx that asking again will not change: a bad token (401), a missing
    permission (403), a scope or runner it does not show (404), a request it rejects (409,
    422). Rate limits are `TransientError` instead.

    A subclass because `monitor check-config --host` must tell these apart to name the fix
    (`github_status`, and `github_message` as GitHub wrote it); to every other caller it is
    the `MonitorError` it always was, with `status` 502 for the web edge.
    """

    def __init__(self, message: str, github_status: int, github_message: str) -> None:
        super().__init__(message, status=502)
        self.github_status = github_status
        self.github_message = github_message


@dataclass(frozen=True)
class JitConfig:
    """A just-in-time runner registration; `encoded_jit_config` is a secret."""

    registration: Registration
    encoded_jit_config: str = field(repr=False)


@dataclass(frozen=True)
class Artifact:
    """One workflow-run artifact, as listed by GitHub."""

    id: int
    name: str
    created_at: datetime
    archive_download_url: str
    expired: bool


@dataclass(frozen=True)
class RateLimit:
    """The primary rate limit, from the `x-ratelimit-*` headers of the latest response."""

    limit: int
    remaining: int
    used: int
    reset_at: datetime
    resource: str


@runtime_checkable
class GitHub(Protocol):
    """The GitHub operations the monitor needs, at one scope (a repo or an org), and what the
    adapter counts of its calls (for /metrics and the polling delay)."""

    @property
    def rate_limit(self) -> RateLimit | None:
        """The primary rate limit from the latest answer; None before one said it."""
        ...

    @property
    def api_calls(self) -> Mapping[tuple[str, str], int]:
        """Calls made so far, by (method, HTTP status or "error" when no answer came)."""
        ...

    def list_runners(self) -> list[Registration]:
        """Every self-hosted runner registered at the scope (all pages)."""
        ...

    def get_runner(self, registration_id: int) -> Registration | None:
        """One runner as GitHub sees it now (not a cached list); None if it is gone."""
        ...

    def generate_jitconfig(
        self,
        name: str,
        labels: Sequence[str],
        *,
        runner_group_id: int = 1,
        work_folder: str = "_work",
    ) -> JitConfig:
        """Register a just-in-time runner named `name` and return its config."""
        ...

    def delete_runner(self, registration_id: int) -> bool:
        """Remove a runner registration; False if it was already gone."""
        ...

    def add_labels(self, registration_id: int, labels: Sequence[str]) -> tuple[str, ...]:
        """Append custom labels to a runner; returns the label names it now has."""
        ...

    def remove_label(self, registration_id: int, name: str) -> bool:
        """Remove one custom label from a runner; False if it did not have it."""
        ...

    def list_artifacts(
        self, qualified_repo: str, run_id: str, *, name: str | None = None
    ) -> list[Artifact]:
        """Every artifact of workflow run `run_id` in `qualified_repo` (all pages); with
        `name`, those GitHub finds by that name (one call)."""
        ...

    def download_artifact(self, url: str) -> bytes:
        """The zip archive behind an artifact's `archive_download_url`."""
        ...

    def workflow_run_status(self, qualified_repo: str, run_id: str) -> tuple[str, str | None]:
        """(status, conclusion) of a workflow run, e.g. ("completed", "cancelled")."""
        ...


@dataclass
class _CachedPage:
    etag: str
    body: Any
    next_url: str | None


class RestGitHub:
    """`GitHub` over the REST API with urllib3 (one keep-alive pool, safe across threads).

    `scope` is `/repos/<owner>/<repo>` or `/orgs/<org>`, as `github_api_scope` upstream.
    """

    def __init__(self, base_url: str, scope: str, token: str, *, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.scope = "/" + scope.strip("/")
        self.timeout = timeout
        self.rate_limit: RateLimit | None = None
        self._token = token
        origin = urlsplit(self.base_url)
        self._origin = (origin.scheme, origin.netloc.lower())
        # One kept-alive connection per concurrent caller: the monitor's workers, the
        # scheduler's refresh job and the web layer's artifact checks (urllib3's default of 1
        # would open and discard a connection per concurrent request).
        self._http = urllib3.PoolManager(retries=False, maxsize=POOL_SIZE)
        self._etag_lock = threading.Lock()
        self._pages: dict[str, _CachedPage] = {}
        # Calls made, by (method, HTTP status or "error" when no answer came): /metrics.
        self.api_calls: collections.Counter[tuple[str, str]] = collections.Counter()

    def __repr__(self) -> str:
        return f"RestGitHub({self.base_url!r}, {self.scope!r})"

    # Reference: https://docs.github.com/en/rest/actions/self-hosted-runners#list-self-hosted-runners-for-a-repository
    def list_runners(self) -> list[Registration]:
        """Every self-hosted runner registered at the scope (all pages).

        Pages are fetched with `If-None-Match`; a 304 reuses the cached page, and does not
        count against the rate limit.
        """
        url: str | None = self._url(f"{self.scope}/actions/runners?per_page={PER_PAGE}")
        seen: list[str] = []
        runners: list[Registration] = []
        while url is not None:
            if url in seen or len(seen) >= MAX_PAGES:
                raise MonitorError(f"GitHub GET {self.scope}/actions/runners: runaway pagination")
            seen.append(url)
            body, url = self._get_page_conditional(url)
            runners.extend(_registration(item) for item in _items(body, "runners"))
        with self._etag_lock:
            # Forget pages that no longer exist (the pool shrank).
            for stale in set(self._pages) - set(seen):
                del self._pages[stale]
        return runners

    # Reference: https://docs.github.com/en/rest/actions/self-hosted-runners#get-a-self-hosted-runner-for-a-repository
    def get_runner(self, registration_id: int) -> Registration | None:
        """One runner as GitHub sees it now; None if it is gone (404).

        Never conditional: a 304 would hand back what an earlier answer said, and the caller
        asks precisely because the list it has may be out of date.
        """
        path = f"{self.scope}/actions/runners/{int(registration_id)}"
        response = self._request("GET", self._url(path), ok=(200, 404))
        if response.status == 404:
            return None
        return _registration(self._json(response, "GET", path))

    # Reference: https://docs.github.com/en/rest/actions/self-hosted-runners#create-configuration-for-a-just-in-time-runner-for-a-repository
    def generate_jitconfig(
        self,
        name: str,
        labels: Sequence[str],
        *,
        runner_group_id: int = 1,
        work_folder: str = "_work",
    ) -> JitConfig:
        """Register a just-in-time runner named `name` and return its config."""
        body = {
            "name": name,
            "runner_group_id": runner_group_id,
            "labels": list(labels),
            "work_folder": work_folder,
        }
        path = f"{self.scope}/actions/runners/generate-jitconfig"
        response = self._request("POST", self._url(path), body=body)
        data = self._json(response, "POST", path)
        try:
            return JitConfig(
                registration=_registration(data["runner"]),
                encoded_jit_config=str(data["encoded_jit_config"]),
            )
        except (KeyError, TypeError) as e:
            raise _malformed("POST", path) from e

    # Reference: https://docs.github.com/en/rest/actions/self-hosted-runners#delete-a-self-hosted-runner-from-a-repository
    def delete_runner(self, registration_id: int) -> bool:
        """Remove a runner registration; False if it was already gone (404)."""
        path = f"{self.scope}/actions/runners/{int(registration_id)}"
        response = self._request("DELETE", self._url(path), ok=(204, 404))
        return response.status == 204

    # Reference: https://docs.github.com/en/rest/actions/self-hosted-runners#add-custom-labels-to-a-self-hosted-runner-for-a-repository
    def add_labels(self, registration_id: int, labels: Sequence[str]) -> tuple[str, ...]:
        """Append custom labels to a runner; returns the label names it now has."""
        path = f"{self.scope}/actions/runners/{int(registration_id)}/labels"
        response = self._request("POST", self._url(path), body={"labels": list(labels)})
        data = self._json(response, "POST", path)
        try:
            return tuple(str(label["name"]) for label in data["labels"])
        except (KeyError, TypeError) as e:
            raise _malformed("POST", path) from e

    # Reference: https://docs.github.com/en/rest/actions/self-hosted-runners#remove-a-custom-label-from-a-self-hosted-runner-for-a-repository
    def remove_label(self, registration_id: int, name: str) -> bool:
        """Remove one custom label from a runner; False if it did not have it (404)."""
        label = urllib.parse.quote(name, safe="")
        path = f"{self.scope}/actions/runners/{int(registration_id)}/labels/{label}"
        response = self._request("DELETE", self._url(path), ok=(200, 404))
        return response.status == 200

    # Reference: https://docs.github.com/en/rest/actions/artifacts#list-workflow-run-artifacts
    def list_artifacts(
        self, qualified_repo: str, run_id: str, *, name: str | None = None
    ) -> list[Artifact]:
        """Every artifact of workflow run `run_id` in `qualified_repo` (all pages).

        Upstream reads only the first page; this follows `Link: rel="next"` to the end.
        With `name`, GitHub lists only the artifacts of that name, and only their first page
        is read: one call, whoever uploaded how many artifacts (the tokenless check's cost
        must not depend on its caller). The arguments come from untrusted callers, so they are
        validated or quoted before they become part of a URL that carries our token.
        """
        path = _run_path(qualified_repo, run_id) + "/artifacts"
        query = f"per_page={PER_PAGE}"
        if name is not None:
            query += "&" + urllib.parse.urlencode({"name": name})
        url: str | None = self._url(f"{path}?{query}")
        seen: list[str] = []
        artifacts: list[Artifact] = []
        while url is not None:
            if url in seen or len(seen) >= MAX_PAGES:
                raise MonitorError(f"GitHub GET {path}: runaway pagination")
            seen.append(url)
            response = self._request("GET", url)
            body = self._json(response, "GET", path)
            artifacts.extend(_artifact(item, path) for item in _items(body, "artifacts"))
            url = _next_link(response, url) if name is None else None
        return artifacts

    # Reference: https://docs.github.com/en/rest/actions/workflow-runs#get-a-workflow-run
    def workflow_run_status(self, qualified_repo: str, run_id: str) -> tuple[str, str | None]:
        """(status, conclusion) of workflow run `run_id` in `qualified_repo`: status is
        queued, in_progress, completed, …; conclusion is None until it completes. Both
        arguments come from a take's labels, so they are validated as for `list_artifacts`."""
        path = _run_path(qualified_repo, run_id)
        body = self._json(self._request("GET", self._url(path)), "GET", path)
        status = body.get("status") if isinstance(body, dict) else None
        conclusion = body.get("conclusion") if isinstance(body, dict) else None
        if not isinstance(status, str) or not isinstance(conclusion, (str, type(None))):
            raise _malformed("GET", path)
        return status, conclusion

    # Reference: https://docs.github.com/en/rest/actions/artifacts#download-an-artifact
    def download_artifact(self, url: str) -> bytes:
        """The zip archive behind an artifact's `archive_download_url`.

        GitHub answers 302 with a short-lived signed URL on another host; redirects are
        followed here so that the token is only ever sent to the API host. Every hop must be
        https (plain http only when the API URL itself is plain http, as a local stand-in),
        and an archive over `MAX_DOWNLOAD_BYTES` is refused: both are `MonitorError` 502.
        """
        current = self._url(url)
        for _ in range(MAX_REDIRECTS + 1):
            self._check_download_hop(current, url)
            response = self._request(
                "GET", current, ok=(200, *REDIRECT_STATUSES), preload_content=False
            )
            if response.status in REDIRECT_STATUSES:
                location = response.headers.get("Location")
                response.drain_conn()
                if not location:
                    path = urlsplit(current).path
                    raise MonitorError(
                        f"GitHub GET {path}: {response.status} without Location", status=502
                    )
                current = urljoin(current, location)
                continue
            return _read_limited(response, urlsplit(current).path)
        raise MonitorError(f"GitHub GET {urlsplit(url).path}: too many redirects", status=502)

    def _check_download_hop(self, current: str, first: str) -> None:
        # A downgrade to plain http would let anyone on the path swap the archive (and read
        # the signed URL); other schemes urllib3 would not even try.
        parts = urlsplit(current)
        allowed = ("https", "http") if self._origin[0] == "http" else ("https",)
        if parts.scheme.lower() not in allowed:
            where = f"{parts.scheme}://{parts.hostname or ''}"[:100]
            raise MonitorError(
                f"GitHub GET {urlsplit(first).path}: refused to download from {where!r} "
                f"(only {' or '.join(allowed)})",
                status=502,
            )

    # -- plumbing ---------------------------------------------------------------------------

    def _url(self, path_or_url: str) -> str:
        if path_or_url.startswith(("http://", "https://")):
            return path_or_url
        return self.base_url + "/" + path_or_url.lstrip("/")

    def _headers(self, url: str, has_body: bool) -> dict[str, str]:
        headers = {"User-Agent": USER_AGENT}
        parts = urlsplit(url)
        # Only the API host gets our credentials; redirect targets (blob storage) and
        # anything else never see the token.
        if (parts.scheme, parts.netloc.lower()) == self._origin:
            headers["Accept"] = "application/vnd.github+json"
            headers["X-GitHub-Api-Version"] = API_VERSION
            if self._token:
                headers["Authorization"] = f"Bearer {self._token}"
        if has_body:
            headers["Content-Type"] = "application/json"
        return headers

    def _request(
        self,
        method: str,
        url: str,
        *,
        body: Any = None,
        ok: Sequence[int] = (200, 201),
        extra_headers: dict[str, str] | None = None,
        preload_content: bool = True,
    ) -> urllib3.BaseHTTPResponse:
        """Send one request; return the response if its status is in `ok`, else raise."""
        path = urlsplit(url).path
        headers = self._headers(url, body is not None)
        if extra_headers:
            headers.update(extra_headers)
        encoded = None if body is None else json.dumps(body).encode()
        started = time.monotonic()
        try:
            response = self._http.request(
                method,
                url,
                body=encoded,
                headers=headers,
                timeout=urllib3.Timeout(connect=self.timeout, read=self.timeout),
                retries=False,
                redirect=False,
                preload_content=preload_content,
            )
        except urllib3.exceptions.HTTPError as e:
            # Only the exception's class: its text can hold the full URL, and a redirect
            # target's query string is a signature.
            log.debug("GitHub %s %s failed: %s", method, path, type(e).__name__)
            self._count(method, "error")
            raise TransientError(self._redact(f"GitHub {method} {path}: {type(e).__name__}")) from e
        log.debug(
            "GitHub %s %s -> %d (%.0f ms)",
            method,
            path,
            response.status,
            (time.monotonic() - started) * 1000,
        )
        self._note_rate_limit(response)
        self._count(method, str(response.status))
        if response.status in ok:
            return response
        if not preload_content:
            # Error bodies are small; cache it so `_message` can read `.data`.
            response.read(cache_content=True)
            response.release_conn()
        raise self._error(method, path, response)

    def _count(self, method: str, status: str) -> None:
        with self._etag_lock:
            self.api_calls[(method, status)] += 1

    def _get_page_conditional(self, url: str) -> tuple[Any, str | None]:
        path = urlsplit(url).path
        with self._etag_lock:
            cached = self._pages.get(url)
        extra = {"If-None-Match": cached.etag} if cached else None
        response = self._request("GET", url, ok=(200, 304), extra_headers=extra)
        if response.status == 304:
            if cached is None:
                raise MonitorError(f"GitHub GET {path}: 304 without a cached page", status=502)
            return cached.body, cached.next_url
        body = self._json(response, "GET", path)
        next_url = _next_link(response, url)
        etag = response.headers.get("ETag")
        with self._etag_lock:
            if etag:
                self._pages[url] = _CachedPage(etag, body, next_url)
            else:
                self._pages.pop(url, None)
        return body, next_url

    def _json(self, response: urllib3.BaseHTTPResponse, method: str, path: str) -> Any:
        try:
            return json.loads(response.data)
        except ValueError as e:
            raise _malformed(method, path) from e

    def _note_rate_limit(self, response: urllib3.BaseHTTPResponse) -> None:
        headers = response.headers
        try:
            limit = int(headers["x-ratelimit-limit"])
            remaining = int(headers["x-ratelimit-remaining"])
            reset = int(headers["x-ratelimit-reset"])
        except (KeyError, ValueError):
            return
        try:
            used = int(headers.get("x-ratelimit-used", limit - remaining))
        except ValueError:
            used = limit - remaining
        self.rate_limit = RateLimit(
            limit=limit,
            remaining=remaining,
            used=used,
            reset_at=datetime.fromtimestamp(reset, UTC),
            resource=headers.get("x-ratelimit-resource", "core"),
        )

    def _error(self, method: str, path: str, response: urllib3.BaseHTTPResponse) -> MonitorError:
        """Map a failed response to the error the caller should see (see module docstring)."""
        status = response.status
        github_message = self._redact(_message(response))
        message = self._redact(f"GitHub {method} {path}: {status} {github_message}")
        retry_after = _retry_after(response.headers.get("Retry-After"))
        remaining = response.headers.get("x-ratelimit-remaining")
        if status >= 500:
            return TransientError(message, retry_after=retry_after)
        # Primary and secondary rate limits answer 403 or 429; see
        # https://docs.github.com/en/rest/using-the-rest-api/rate-limits-for-the-rest-api
        if status == 429 or (status == 403 and (remaining == "0" or retry_after is not None)):
            if retry_after is None and remaining == "0":
                retry_after = self._seconds_until_reset(response)
            if retry_after is None:
                retry_after = 60.0
            log.warning("GitHub rate limit: %s (retry after %.0f s)", message, retry_after)
            return TransientError(message, retry_after=retry_after)
        if 400 <= status < 500:
            return GitHubRefused(message, status, github_message)
        return MonitorError(message, status=502)

    def _seconds_until_reset(self, response: urllib3.BaseHTTPResponse) -> float | None:
        try:
            reset = int(response.headers["x-ratelimit-reset"])
        except (KeyError, ValueError):
            return None
        return max(0.0, reset - time.time())

    def _redact(self, text: str) -> str:
        # Belt and braces: a peer echoing our credentials must not get them logged.
        if self._token and self._token in text:
            text = text.replace(self._token, "[REDACTED]")
        return text


def _registration(data: Any) -> Registration:
    try:
        return Registration(
            id=int(data["id"]),
            name=str(data["name"]),
            status=str(data["status"]),
            busy=bool(data["busy"]),
            labels=tuple(str(label["name"]) for label in data.get("labels") or ()),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise MonitorError("GitHub sent a malformed runner", status=502) from e


def _artifact(data: Any, path: str) -> Artifact:
    try:
        created_at = datetime.fromisoformat(str(data["created_at"]))
        if created_at.tzinfo is None:
            created_at = created_at.replace(tzinfo=UTC)
        return Artifact(
            id=int(data["id"]),
            name=str(data["name"]),
            created_at=created_at.astimezone(UTC),
            archive_download_url=str(data["archive_download_url"]),
            expired=bool(data.get("expired", False)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise _malformed("GET", path) from e


def _items(body: Any, key: str) -> list[Any]:
    if not isinstance(body, dict) or not isinstance(body.get(key), list):
        raise MonitorError(f"GitHub sent a page without {key!r}", status=502)
    return body[key]


def _malformed(method: str, path: str) -> MonitorError:
    return MonitorError(f"GitHub {method} {path}: malformed response", status=502)


def _run_path(qualified_repo: str, run_id: str) -> str:
    """`/repos/<owner>/<repo>/actions/runs/<run_id>`, refusing anything that could leave that
    path: both come from untrusted callers, and the URL carries our token."""
    owner, _, repo = qualified_repo.partition("/")
    if not (_is_repo_part(owner) and _is_repo_part(repo)):
        raise MonitorError(f"Invalid qualified_repo: {qualified_repo!r}")
    if not run_id.isascii() or not run_id.isdigit():
        raise MonitorError(f"Invalid run_id: {run_id!r}")
    return f"/repos/{owner}/{repo}/actions/runs/{run_id}"


def _is_repo_part(part: str) -> bool:
    return bool(_REPO_PART_RE.match(part)) and part not in (".", "..")


def _message(response: urllib3.BaseHTTPResponse) -> str:
    """The `message` of a GitHub JSON error body, else the reason phrase."""
    try:
        data = json.loads(response.data)
        if isinstance(data, dict) and isinstance(data.get("message"), str):
            return data["message"][:300]
    except ValueError:
        pass
    return response.reason or ""


def _retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header (delta-seconds or an HTTP date)."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _next_link(response: urllib3.BaseHTTPResponse, current: str) -> str | None:
    """The `rel="next"` URL of a `Link` header, resolved against the current URL."""
    header = response.headers.get("Link")
    if not header:
        return None
    for target, rels in _LINK_RE.findall(header):
        if "next" in rels.split():
            return urljoin(current, target)
    return None


def _read_limited(response: urllib3.BaseHTTPResponse, path: str) -> bytes:
    too_large = MonitorError(
        f"GitHub GET {path}: artifact larger than {MAX_DOWNLOAD_BYTES} bytes", status=502
    )
    length = response.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > MAX_DOWNLOAD_BYTES:
        response.close()  # refused before a byte of the body is read
        raise too_large
    try:
        data = response.read(MAX_DOWNLOAD_BYTES + 1)
    except urllib3.exceptions.HTTPError as e:
        response.close()
        raise TransientError(f"GitHub GET {path}: {type(e).__name__}") from e
    if len(data) > MAX_DOWNLOAD_BYTES:
        # Unread bytes remain: drop the connection rather than return it to the pool.
        response.close()
        raise too_large
    response.release_conn()
    return data
