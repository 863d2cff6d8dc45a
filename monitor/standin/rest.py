"""The slice of GitHub's REST API the monitor uses: runners and their labels, JIT configs,
workflow runs, run artifacts and their blob downloads, and the rate limit. Answers as
api.github.com does: `Link` pagination, `ETag`/304, `x-ratelimit-*` headers, JSON errors,
and the faults a test injected.

Runs on the stand-in's waitress threads; each request is answered under the state's lock
(a fault's delay is waited out before taking it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from typing import Any
from urllib.parse import urlencode

import bottle

from monitor.standin.shapes import artifact_json
from monitor.standin.shapes import jit_config
from monitor.standin.shapes import workflow_run
from monitor.standin.state import Fault
from monitor.standin.state import Records
from monitor.standin.state import Runner
from monitor.standin.state import StandInState

log = logging.getLogger(__name__)

DOCS = "https://docs.github.com/rest"
# The signed blob URL GitHub redirects to expires after a minute.
BLOB_URL_LIFETIME = 60.0
MAX_LABELS = 100


@dataclass
class _Reply:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    etag: bool = False


class _ApiError(Exception):
    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


class RestApi:
    """GitHub's routes over `state`; `stopping` ends a fault's delay early when the
    stand-in stops."""

    def __init__(self, state: StandInState, stopping: threading.Event) -> None:
        self.state = state
        self._stopping = stopping

    @property
    def _records(self) -> Records:
        return self.state.records

    def install(self, app: bottle.Bottle) -> None:
        """Add the API's routes to `app`, and GitHub's JSON 404 and 405."""
        api = self._api
        for prefix in ("/repos/<owner>/<repo>", "/orgs/<org>"):
            runners = prefix + "/actions/runners"
            app.route(runners, "GET", api(self._list_runners))
            app.route(runners + "/<runner_id:int>", "GET", api(self._get_runner))
            app.route(runners + "/<runner_id:int>", "DELETE", api(self._delete_runner))
            app.route(runners + "/generate-jitconfig", "POST", api(self._generate_jitconfig))
            labels = runners + "/<runner_id:int>/labels"
            app.route(labels, "GET", api(self._get_labels))
            app.route(labels, "POST", api(self._post_labels))
            app.route(labels, "PUT", api(self._put_labels))
            app.route(labels, "DELETE", api(self._delete_labels))
            app.route(labels + "/<name:path>", "DELETE", api(self._delete_label))
        artifacts = "/repos/<owner>/<repo>/actions"
        app.route(artifacts + "/runs/<run_id:int>", "GET", api(self._get_workflow_run))
        app.route(artifacts + "/runs/<run_id:int>/artifacts", "GET", api(self._list_artifacts))
        app.route(
            artifacts + "/artifacts/<artifact_id:int>", "DELETE", api(self._delete_artifact)
        )
        app.route(
            artifacts + "/artifacts/<artifact_id:int>/<archive_format>",
            "GET",
            api(self._download_artifact),
        )
        app.route("/rate_limit", "GET", api(self._get_rate_limit, counted=False))
        app.route("/_blob/<artifact_id:int>", "GET", self._blob)

        def not_found(error: bottle.HTTPError) -> str:
            bottle.response.content_type = "application/json; charset=utf-8"
            message = "Not Found" if error.status_code == 404 else str(error.status_line)
            return json.dumps({"message": message, "documentation_url": DOCS})

        for code in (404, 405):
            app.error_handler[code] = not_found

    def _api(self, handler: Callable[..., _Reply], *, counted: bool = True) -> Callable[..., Any]:
        """Wrap a GitHub route: faults, auth, rate limit, ETag, logging."""

        def route(**params: Any) -> bottle.HTTPResponse:
            method, path = bottle.request.method, bottle.request.path
            arrived = time.monotonic()
            fault = self._take_fault(method, path)
            if fault is not None:
                if fault.delay:
                    self._stopping.wait(fault.delay)
                if fault.status is not None or fault.body is not None:
                    reply = _fault_reply(fault)
                    return self._respond(method, path, reply, counted=False, at=arrived)
            with self.state.lock:
                exhausted = False
                try:
                    self._check_auth()
                    self._records.refill_rate_limit()
                    used, limit = self._records.rate_limit_used, self.state.rate_limit_limit
                    exhausted = counted and used >= limit
                    if exhausted:
                        raise _ApiError(403, "API rate limit exceeded for user ID 1.")
                    reply = handler(_scope(params), **_route_args(params))
                except _ApiError as e:
                    reply = _error_reply(e.status, e.message, e.headers)
                if reply.etag and reply.status == 200:
                    reply = _conditional(reply)
                # 401s, 304s and refusals for an exhausted limit do not count.
                count = counted and not exhausted and reply.status not in (304, 401)
                return self._respond(method, path, reply, counted=count, at=arrived)

        return route

    def _respond(self, method: str, path: str, reply: _Reply, *, counted: bool, at: float) -> Any:
        with self.state.lock:
            if counted:
                self._records.rate_limit_used += 1
            remaining = max(0, self.state.rate_limit_limit - self._records.rate_limit_used)
            headers = {
                "x-ratelimit-limit": str(self.state.rate_limit_limit),
                "x-ratelimit-remaining": str(remaining),
                "x-ratelimit-used": str(self._records.rate_limit_used),
                "x-ratelimit-reset": str(self._records.rate_limit_reset),
                "x-ratelimit-resource": "core",
                "X-GitHub-Api-Version-Selected": "2022-11-28",
                "X-GitHub-Request-Id": uuid.uuid4().hex[:20].upper(),
                **reply.headers,
            }
            self._records.record_request(method, path, reply.status, at)
        log.debug("%s %s -> %d", method, path, reply.status)
        if reply.body is None:
            body: bytes = b""
        else:
            if isinstance(reply.body, bytes):  # a fault's malformed body, as it is
                body = reply.body
            else:
                body = json.dumps(reply.body, separators=(",", ":")).encode()  # as GitHub
            headers["Content-Type"] = "application/json; charset=utf-8"
        return bottle.HTTPResponse(body=body, status=reply.status, headers=headers)

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self.state.lock:
            for fault in self._records.faults:
                if fault.method not in (None, method):
                    continue
                if fault.path_contains is not None and fault.path_contains not in path:
                    continue
                fault.count -= 1
                if fault.count <= 0:
                    self._records.faults.remove(fault)
                return fault
        return None

    def _check_auth(self) -> None:
        header = bottle.request.get_header("Authorization")
        if not header:
            raise _ApiError(401, "Requires authentication")
        scheme, _, credential = header.strip().partition(" ")
        if scheme.lower() not in ("bearer", "token") or not credential.strip():
            raise _ApiError(401, "Bad credentials")
        if self.state.token is not None and not secrets.compare_digest(
            credential.strip().encode(), self.state.token.encode()
        ):
            raise _ApiError(401, "Bad credentials")

    def _json_body(self) -> Any:
        raw = bottle.request.body.read()
        try:
            body = json.loads(raw or b"null")
        except ValueError as e:
            raise _ApiError(400, "Problems parsing JSON") from e
        self._records.bodies.append((bottle.request.method, bottle.request.path, body))
        if not isinstance(body, dict):
            raise _ApiError(400, "Problems parsing JSON")
        return body

    def _paginate(self, items: list[Any], key: str) -> _Reply:
        query = bottle.request.query
        per_page = min(100, max(1, _int(query.get("per_page"), 30)))
        page = max(1, _int(query.get("page"), 1))
        last = max(1, math.ceil(len(items) / per_page))
        chunk = items[(page - 1) * per_page : page * per_page]
        reply = _Reply(200, {"total_count": len(items), key: chunk}, etag=True)
        if last > 1:
            reply.headers["Link"] = _link_header(page, per_page, last)
        return reply

    def _scoped_runner(self, scope: str, runner_id: int) -> Runner:
        try:
            return self._records.runner(runner_id, scope)
        except KeyError:
            raise _ApiError(404, "Not Found") from None

    # -- GitHub routes (lock held) -----------------------------------------------------------

    # https://docs.github.com/rest/actions/self-hosted-runners#list-self-hosted-runners-for-a-repository
    def _list_runners(self, scope: str) -> _Reply:
        self._records.advance()
        name = bottle.request.query.get("name")
        now = self.state.clock()
        runners = [
            r.to_json(now)
            for r in self._records.runners.values()
            if r.scope == scope and (name is None or r.name == name)
        ]
        return self._paginate(runners, "runners")

    def _get_runner(self, scope: str, runner_id: int) -> _Reply:
        runner = self._scoped_runner(scope, runner_id)
        return _Reply(200, runner.to_json(self.state.clock()), etag=True)

    def _delete_runner(self, scope: str, runner_id: int) -> _Reply:
        runner = self._scoped_runner(scope, runner_id)
        # During the busy lag GitHub does not know either: the runner goes, its job with it.
        if runner.reported_busy(self.state.clock()):
            raise _ApiError(422, f'Bad request - Runner "{runner.name}" is still running a job')
        del self._records.runners[runner.id]
        return _Reply(204)

    # https://docs.github.com/rest/actions/self-hosted-runners#create-configuration-for-a-just-in-time-runner-for-a-repository
    def _generate_jitconfig(self, scope: str) -> _Reply:
        if not self.state.jit_permission:
            # GitHub's words for a fine-grained token without "Administration" (repository)
            # or "Self-hosted runners" (organisation) write access; checked before the body.
            raise _ApiError(403, "Resource not accessible by personal access token")
        body = self._json_body()
        for key in ("name", "runner_group_id", "labels"):
            if key not in body:
                raise _ApiError(422, f'Invalid request.\n\n"{key}" wasn\'t supplied.')
        name, group, labels = body["name"], body["runner_group_id"], body["labels"]
        if not isinstance(name, str) or not name.strip():
            raise _ApiError(422, 'Invalid request.\n\nFor "name", must be a non-empty string.')
        if not isinstance(group, int) or isinstance(group, bool) or group < 1:
            raise _ApiError(422, 'Invalid request.\n\nFor "runner_group_id", must be an integer.')
        _check_labels(labels, minimum=1)
        if not isinstance(body.get("work_folder", "_work"), str):
            raise _ApiError(422, 'Invalid request.\n\nFor "work_folder", must be a string.')
        self._records.advance()
        if any(r.name == name and r.scope == scope for r in self._records.runners.values()):
            raise _ApiError(409, f"Already exists - A runner with the name {name} already exists.")
        runner = self._records.new_runner(scope, name, labels, ephemeral=True)
        runner.runner_group_id = group
        runner.jit_token = secrets.token_hex()
        if self.state.agent_online_after is not None:
            runner.online_at = time.monotonic() + self.state.agent_online_after
        self._records.jit_names.append(name)
        created = runner.to_json(self.state.clock())
        return _Reply(201, {"runner": created, "encoded_jit_config": jit_config(runner)})

    # https://docs.github.com/rest/actions/self-hosted-runners#list-labels-for-a-self-hosted-runner-for-a-repository
    def _get_labels(self, scope: str, runner_id: int) -> _Reply:
        return _labels_reply(self._scoped_runner(scope, runner_id), etag=True)

    def _post_labels(self, scope: str, runner_id: int) -> _Reply:
        body = self._json_body()
        runner = self._scoped_runner(scope, runner_id)
        labels = body.get("labels")
        _check_labels(labels, minimum=1)
        self._records.add_labels(runner, labels)
        return _labels_reply(runner)

    def _put_labels(self, scope: str, runner_id: int) -> _Reply:
        body = self._json_body()
        runner = self._scoped_runner(scope, runner_id)
        labels = body.get("labels")
        _check_labels(labels, minimum=0)
        runner.labels = [label for label in runner.labels if label["type"] == "read-only"]
        self._records.add_labels(runner, labels)
        return _labels_reply(runner)

    def _delete_labels(self, scope: str, runner_id: int) -> _Reply:
        runner = self._scoped_runner(scope, runner_id)
        runner.labels = [label for label in runner.labels if label["type"] == "read-only"]
        return _labels_reply(runner)

    def _delete_label(self, scope: str, runner_id: int, name: str) -> _Reply:
        runner = self._scoped_runner(scope, runner_id)
        match = [label for label in runner.labels if label["name"].lower() == name.lower()]
        if not match:
            raise _ApiError(404, f"Label {name} not found on runner")
        if match[0]["type"] == "read-only":
            raise _ApiError(422, f"Validation Failed: cannot remove read-only label {name}")
        runner.labels.remove(match[0])
        return _labels_reply(runner)

    # https://docs.github.com/rest/actions/artifacts#list-workflow-run-artifacts
    def _list_artifacts(self, scope: str, run_id: int) -> _Reply:
        repo = scope.removeprefix("/repos/")
        query = bottle.request.query
        found = [
            a
            for a in self._records.artifacts.values()
            if a.repo == repo and a.run_id == run_id and query.get("name") in (None, a.name)
        ]
        found.sort(key=lambda a: (a.created_at, a.id), reverse=query.get("direction") != "asc")
        base = _request_base()
        return self._paginate([artifact_json(a, base) for a in found], "artifacts")

    # https://docs.github.com/rest/actions/workflow-runs#get-a-workflow-run
    def _get_workflow_run(self, scope: str, run_id: int) -> _Reply:
        repo = scope.removeprefix("/repos/")
        with self.state.lock:
            runs = self._records.runs
            status, conclusion = runs.get((repo.lower(), run_id), ("in_progress", None))
        return _Reply(200, workflow_run(_request_base(), repo, run_id, status, conclusion))

    # https://docs.github.com/rest/actions/artifacts#download-an-artifact
    def _download_artifact(self, scope: str, artifact_id: int, archive_format: str) -> _Reply:
        artifact = self._records.artifacts.get(artifact_id)
        if artifact is None or f"/repos/{artifact.repo}" != scope or archive_format != "zip":
            raise _ApiError(404, "Not Found")
        if artifact.expired:
            raise _ApiError(410, "Artifact has expired")
        signature = secrets.token_urlsafe(24)
        self._records.blobs[signature] = (artifact.id, time.monotonic() + BLOB_URL_LIFETIME)
        location = f"{_blob_base()}/_blob/{artifact.id}?{urlencode({'sig': signature})}"
        return _Reply(302, headers={"Location": location})

    # https://docs.github.com/rest/actions/artifacts#delete-an-artifact
    def _delete_artifact(self, scope: str, artifact_id: int) -> _Reply:
        artifact = self._records.artifacts.get(artifact_id)
        if artifact is None or f"/repos/{artifact.repo}" != scope:
            raise _ApiError(404, "Not Found")
        del self._records.artifacts[artifact_id]
        return _Reply(204)

    # https://docs.github.com/rest/rate-limit/rate-limit#get-rate-limit-status-for-the-authenticated-user
    def _get_rate_limit(self, scope: str) -> _Reply:
        core = {
            "limit": self.state.rate_limit_limit,
            "remaining": max(0, self.state.rate_limit_limit - self._records.rate_limit_used),
            "reset": self._records.rate_limit_reset,
            "used": self._records.rate_limit_used,
        }
        reset = int(time.time()) + 60

        def fresh(limit: int) -> dict[str, int]:
            return {"limit": limit, "remaining": limit, "reset": reset, "used": 0}

        resources = {
            "core": core,
            "search": fresh(30),
            "graphql": fresh(5000),
            "integration_manifest": fresh(5000),
            "code_search": fresh(10),
            "actions_runner_registration": fresh(10000),
        }
        return _Reply(200, {"resources": resources, "rate": core})

    # The signed blob URL the artifact download redirects to: another host at GitHub, so it
    # takes no GitHub credentials (Azure answers 400 to an unexpected Authorization header).
    def _blob(self, artifact_id: int) -> Any:
        path = bottle.request.path
        with self.state.lock:
            entry = self._records.blobs.get(bottle.request.query.get("sig") or "")
            artifact = self._records.artifacts.get(artifact_id)
            status = 200
            if bottle.request.get_header("Authorization"):
                self._records.blob_auth.append(path)
                status = 400
            elif entry is None or entry[0] != artifact_id or time.monotonic() > entry[1]:
                status = 403
            elif artifact is None:
                status = 404
            self._records.record_request("GET", path, status, time.monotonic())
        if status != 200 or artifact is None:
            return bottle.HTTPResponse(
                body=f"blob request refused ({status})", status=status, content_type="text/plain"
            )
        return bottle.HTTPResponse(
            body=artifact.data,
            status=200,
            headers={
                "Content-Type": "application/zip",
                "Content-Disposition": f'attachment; filename="{artifact.name}.zip"',
            },
        )


def _scope(params: dict[str, Any]) -> str:
    if "org" in params:
        return f"/orgs/{params['org']}"
    if "owner" in params:
        return f"/repos/{params['owner']}/{params['repo']}"
    return ""


def _route_args(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k not in ("owner", "repo", "org")}


def _check_labels(labels: Any, *, minimum: int) -> None:
    if labels is None:
        raise _ApiError(422, 'Invalid request.\n\n"labels" wasn\'t supplied.')
    if (
        not isinstance(labels, list)
        or not all(isinstance(label, str) and label.strip() for label in labels)
        or not minimum <= len(labels) <= MAX_LABELS
    ):
        raise _ApiError(
            422, f'Invalid request.\n\nFor "labels", expected {minimum}..100 non-empty strings.'
        )


def _labels_reply(runner: Runner, *, etag: bool = False) -> _Reply:
    labels = [dict(label) for label in runner.labels]
    return _Reply(200, {"total_count": len(labels), "labels": labels}, etag=etag)


def _error_reply(status: int, message: str, headers: Mapping[str, str] | None = None) -> _Reply:
    body = {"message": message, "documentation_url": DOCS, "status": str(status)}
    return _Reply(status, body, dict(headers or {}))


def _fault_reply(fault: Fault) -> _Reply:
    if fault.body is not None:
        return _Reply(fault.status or 200, fault.body.encode())
    status = fault.status or 500
    messages = {
        403: "API rate limit exceeded for user ID 1.",
        429: "You have exceeded a secondary rate limit. Please wait a few minutes before you "
        "try again.",
        500: "Server Error",
        502: "Server Error",
        503: "Service Unavailable",
    }
    headers: dict[str, str] = {}
    if fault.retry_after is not None:
        headers["Retry-After"] = str(math.ceil(fault.retry_after))
    reply = _error_reply(status, messages.get(status, bottle.HTTP_CODES.get(status, "Error")))
    reply.headers.update(headers)
    if status == 403:
        reply.headers["x-ratelimit-remaining"] = "0"
    return reply


def _conditional(reply: _Reply) -> _Reply:
    """Add an ETag; answer 304 (no body) if the client already has this representation."""
    digest = hashlib.sha256(json.dumps(reply.body, sort_keys=True).encode()).hexdigest()
    etag = f'W/"{digest[:40]}"'
    reply.headers["ETag"] = etag
    wanted = bottle.request.get_header("If-None-Match") or ""
    tags = {tag.strip() for tag in wanted.split(",")}
    if etag in tags or etag.removeprefix("W/") in tags or "*" in tags:
        return _Reply(304, None, {"ETag": etag})
    return reply


def _request_base() -> str:
    scheme, netloc = bottle.request.urlparts[:2]
    return f"{scheme}://{netloc}"


def _blob_base() -> str:
    # Redirect to a different host name for the same server, as GitHub redirects to
    # blob storage: a client that forwards its token across hosts gets caught.
    scheme, netloc = bottle.request.urlparts[:2]
    host, sep, port = netloc.rpartition(":")
    if not sep:
        host, port = netloc, ""
    swapped = {"127.0.0.1": "localhost", "localhost": "127.0.0.1"}.get(host, host)
    return f"{scheme}://{swapped}{':' + port if port else ''}"


def _link_header(page: int, per_page: int, last: int) -> str:
    """GitHub's `Link` header: absolute URLs, the request's other query parameters kept."""
    scheme, netloc, path = bottle.request.urlparts[:3]
    params = [(k, v) for k, v in bottle.request.query.allitems() if k not in ("page", "per_page")]

    def url(target: int) -> str:
        query = urlencode([*params, ("per_page", per_page), ("page", target)])
        return f"<{scheme}://{netloc}{path}?{query}>"

    links = []
    if page > 1:
        links.append(f'{url(min(page - 1, last))}; rel="prev"')
    if page < last:
        links.append(f'{url(page + 1)}; rel="next"')
        links.append(f'{url(last)}; rel="last"')
    if page > 1:
        links.append(f'{url(1)}; rel="first"')
    return ", ".join(links)


def _int(value: str | None, default: int) -> int:
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default
