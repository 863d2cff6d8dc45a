"""A stand-in for the slice of GitHub's REST API the monitor uses, served over real HTTP.

`GitHubStandIn` is a Bottle app on a waitress server thread. It keeps runners per scope
(`/repos/<owner>/<repo>` and `/orgs/<org>`), run artifacts per repository, and a primary
rate limit, and answers the way api.github.com does (shapes from GitHub's OpenAPI
description, `Link` pagination, `ETag`/304, `x-ratelimit-*` headers, JSON errors). Tests and
`monitor demo` drive it through Python methods or the equivalent `/_standin/...` HTTP
endpoints: change runner state, add artifacts, inject faults, and let it play the runner agent
and the jobs. A real agent (the end-to-end tests' guests run one, `tests/guest/agent.sh`) uses
the `/_standin/agent/*` endpoints instead, identified by its JIT config as GitHub knows a
runner by its credentials. It is a test and demo peer: production code never imports it, and
it imports no other monitor module.

Run it alone with `python -m monitor.github_standin --port 9000 [--token T] [--demo]`.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import logging
import math
import random
import secrets
import signal
import threading
import time
import uuid
import zipfile
from collections.abc import Callable
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from datetime import UTC
from datetime import datetime
from datetime import timedelta
from typing import Any
from typing import NamedTuple
from urllib.parse import urlencode

import bottle

from monitor.serving import BackgroundServer

log = logging.getLogger(__name__)

DOCS = "https://docs.github.com/rest"
RUNNER_VERSION = "2.323.0"
# Labels GitHub applies itself (type "read-only"); everything else a client adds is "custom".
READ_ONLY_LABELS = frozenset({"self-hosted", "linux", "windows", "macos", "x64", "arm64", "arm"})
RATE_LIMIT_WINDOW = 3600
# The signed blob URL GitHub redirects to expires after a minute.
BLOB_URL_LIFETIME = 60.0
MAX_LABELS = 100
# An encoded JIT config is about 1 KB; an agent call with a much longer body is something else.
MAX_JIT_CONFIG_BYTES = 16 * 1024


class RecordedRequest(NamedTuple):
    """One request the stand-in answered (compares equal to a plain 3-tuple)."""

    method: str
    path: str
    status: int


class AgentCall(NamedTuple):
    """One successful call of a runner agent: which runner (by its JIT config), what it did
    (`online`, `job` when it was given one, `finish`), and the client address it came from."""

    runner_id: int
    runner_name: str
    call: str
    address: str | None


@dataclass
class _Fault:
    status: int | None
    count: int
    method: str | None
    path_contains: str | None
    retry_after: float | None
    delay: float
    body: str | None = None


@dataclass
class _Runner:
    id: int
    name: str
    scope: str
    labels: list[dict[str, Any]]
    status: str = "offline"
    busy: bool = False
    ephemeral: bool = True
    runner_group_id: int = 1
    os: str = "linux"
    version: str | None = None
    online_at: float | None = None  # monotonic; the simulated agent connects then
    done_at: float | None = None  # monotonic; the simulated job ends then
    jit_token: str | None = None  # the credential in its JIT config (a real agent's proof)
    job: dict[str, Any] | None = None  # the job a real agent was given

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "runner_group_id": self.runner_group_id,
            "name": self.name,
            "os": self.os,
            "status": self.status,
            "busy": self.busy,
            "ephemeral": self.ephemeral,
            "labels": [dict(label) for label in self.labels],
            "version": self.version,
        }


@dataclass
class _Artifact:
    id: int
    repo: str
    run_id: int
    name: str
    data: bytes
    created_at: datetime
    expired: bool

    def to_json(self, base: str) -> dict[str, Any]:
        url = f"{base}/repos/{self.repo}/actions/artifacts/{self.id}"
        return {
            "id": self.id,
            "node_id": base64.b64encode(f"08:Artifact{self.id}".encode()).decode(),
            "name": self.name,
            "size_in_bytes": len(self.data),
            "url": url,
            "archive_download_url": f"{url}/zip",
            "expired": self.expired,
            "created_at": _iso(self.created_at),
            "expires_at": _iso(self.created_at + timedelta(days=1)),
            "updated_at": _iso(self.created_at),
            "digest": "sha256:" + hashlib.sha256(self.data).hexdigest(),
            "workflow_run": {
                "id": self.run_id,
                "repository_id": _repo_id(self.repo),
                "head_repository_id": _repo_id(self.repo),
                "head_branch": "main",
                "head_sha": hashlib.sha1(str(self.run_id).encode()).hexdigest(),
            },
        }


@dataclass
class _Reply:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    etag: bool = False


class _AgentError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _ApiError(Exception):
    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


class GitHubStandIn:
    """GitHub's runner, artifact and rate-limit endpoints, in memory, over HTTP.

    `token`: if set, requests must carry `Authorization: Bearer <token>` (or `token <token>`);
    if None, any credentials are accepted but some must be sent. All control methods are
    thread-safe. `agent_online_after` (seconds or None) makes each new JIT runner go online
    that long after its config was generated. `agent_job_seconds` is how long a real agent
    is told to run the job it is given; while `hold_jobs` is set, no agent is given one (the
    jobs wait in GitHub's queue), so a test can see a runner Reserved before it is Busy.
    """

    def __init__(self, token: str | None = None, *, rate_limit: int = 5000) -> None:
        self.token = token
        self.agent_online_after: float | None = None
        self.agent_job_seconds = 5.0
        self.hold_jobs = False
        self.rate_limit_limit = rate_limit
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._server: BackgroundServer | None = None
        self._base_url: str | None = None
        self._sim_thread: threading.Thread | None = None
        self._sim_stop = threading.Event()
        self._random = random.Random()
        # Ids grow across reset() so that a test never sees one reused.
        self._next_runner_id = 41_000_000
        self._next_artifact_id = 2_900_000_000
        self._next_run_id = 14_000_000_000
        self._next_job_id = 7_000_000
        self._clear_state()
        self.app = self._make_app()

    def _clear_state(self) -> None:
        self._runners: dict[int, _Runner] = {}
        self._artifacts: dict[int, _Artifact] = {}
        self._blobs: dict[str, tuple[int, float]] = {}
        self._faults: list[_Fault] = []
        self._requests: list[RecordedRequest] = []
        self._request_times: list[float] = []
        self._bodies: list[tuple[str, str, Any]] = []
        self._jit_names: list[str] = []
        self._label_ids: dict[str, int] = {}
        self._blob_auth: list[str] = []
        self._agent_calls: list[AgentCall] = []
        # Workflow runs a test has set, by (lower-cased repo, run id): (status, conclusion).
        self._runs: dict[tuple[str, int], tuple[str, str | None]] = {}
        self._rl_used = 0
        self._rl_reset = int(time.time()) + RATE_LIMIT_WINDOW

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, host: str = "127.0.0.1", port: int = 0, threads: int = 8) -> str:
        """Serve on `host:port` (0 picks a free port) from a background thread; returns
        the base URL."""
        if self._server is not None:
            raise RuntimeError("stand-in already started")
        self._stopping.clear()
        self._server = BackgroundServer(
            self.app,
            host=host,
            port=port,
            threads=threads,
            name="github-standin",
            channel_timeout=30,
        )
        self._base_url = self._server.url
        log.info("GitHub stand-in listening on %s", self._base_url)
        return self._base_url

    def stop(self) -> None:
        """Stop the simulations and the server; the port is free when this returns."""
        self.stop_job_simulation()
        self._stopping.set()
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        log.info("GitHub stand-in on %s stopped", self._base_url)

    @property
    def base_url(self) -> str:
        """`http://host:port` of the running server."""
        if self._base_url is None:
            raise RuntimeError("stand-in not started")
        return self._base_url

    def __enter__(self) -> GitHubStandIn:
        if self._server is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- control API -------------------------------------------------------------------------

    def runners(self) -> list[dict[str, Any]]:
        """Every runner in every scope, as GitHub's JSON plus a `scope` key."""
        with self._lock:
            self._advance()
            return [{**r.to_json(), "scope": r.scope} for r in self._runners.values()]

    def add_runner(
        self,
        scope: str,
        name: str,
        labels: tuple[str, ...] | list[str] = ("self-hosted", "Linux", "X64"),
        *,
        status: str = "offline",
        busy: bool = False,
        ephemeral: bool = False,
    ) -> int:
        """Register a runner directly (as `config.sh` would, not JIT); returns its id."""
        _check_status(status)
        with self._lock:
            scope = _normal_scope(scope)
            if any(r.name == name and r.scope == scope for r in self._runners.values()):
                raise ValueError(f"runner {name!r} already exists in {scope}")
            runner = self._new_runner(scope, name, labels, ephemeral=ephemeral)
            runner.status, runner.busy = status, busy
            if status == "online":
                runner.version = RUNNER_VERSION
            return runner.id

    def set_status(self, runner_id: int, status: str) -> None:
        """Set a runner `online` or `offline` (cancels a pending simulated connect)."""
        _check_status(status)
        with self._lock:
            runner = self._runner(runner_id)
            runner.status, runner.online_at = status, None
            if status == "online":
                runner.version = runner.version or RUNNER_VERSION

    def set_busy(self, runner_id: int, busy: bool) -> None:
        """Mark a runner busy (running a job) or not."""
        with self._lock:
            self._runner(runner_id).busy = bool(busy)

    def finish_job(self, runner_id: int) -> None:
        """The runner's job ended: an ephemeral runner deregisters itself."""
        with self._lock:
            runner = self._runner(runner_id)
            del self._runners[runner.id]

    # A real runner agent, known by the encoded JIT config it was started with. Each raises
    # KeyError for a config of no current runner, PermissionError for one whose credentials
    # are not the runner's, ValueError for one that is not a JIT config.

    def agent_online(self, jit_config: str, address: str | None = None) -> dict[str, Any]:
        """The agent connected: its runner goes online. Returns the runner's JSON."""
        with self._lock:
            runner = self._agent_runner(jit_config)
            runner.status, runner.online_at = "online", None
            runner.version = RUNNER_VERSION
            self._agent_calls.append(AgentCall(runner.id, runner.name, "online", address))
            return runner.to_json()

    def agent_job(self, jit_config: str, address: str | None = None) -> dict[str, Any] | None:
        """The agent asks for work: the job it was given, or a new one if the runner is
        online and carries a `reserved-for:` label (the job that reserved it is waiting for
        it, `runs-on: reserved-for:<id>`), which makes it busy; else None."""
        with self._lock:
            runner = self._agent_runner(jit_config)
            ready = runner.status == "online" and not runner.busy and not self.hold_jobs
            if runner.job is None and ready:
                reserved_for = next(
                    (
                        label["name"].partition(":")[2]
                        for label in runner.labels
                        if label["name"].startswith("reserved-for:")
                    ),
                    None,
                )
                if reserved_for is not None:
                    self._next_job_id += 1
                    runner.job = {
                        "id": self._next_job_id,
                        "reserved_for": reserved_for,
                        "seconds": self.agent_job_seconds,
                    }
                    runner.busy = True
                    self._agent_calls.append(AgentCall(runner.id, runner.name, "job", address))
                    log.info("job %d assigned to %s", self._next_job_id, runner.name)
            return None if runner.job is None else dict(runner.job)

    def agent_finish(self, jit_config: str, address: str | None = None) -> None:
        """The agent finished its job: an ephemeral runner's registration is removed, as
        GitHub does; another becomes idle again. RuntimeError if it had no job."""
        with self._lock:
            runner = self._agent_runner(jit_config)
            if runner.job is None:
                raise RuntimeError(f"runner {runner.name} has no job to finish")
            self._agent_calls.append(AgentCall(runner.id, runner.name, "finish", address))
            if runner.ephemeral:
                del self._runners[runner.id]
            else:
                runner.busy, runner.job = False, None

    @property
    def agent_calls(self) -> list[AgentCall]:
        """Every successful agent call so far, oldest first."""
        with self._lock:
            return list(self._agent_calls)

    def add_artifact(
        self,
        qualified_repo: str,
        run_id: str | int,
        name: str,
        files: Mapping[str, bytes | str],
        created_at: datetime | None = None,
        expired: bool = False,
    ) -> int:
        """Upload an artifact (a real zip of `files`, in order) to a run; returns its id."""
        owner, _, repo = qualified_repo.partition("/")
        if not owner or not repo or "/" in repo:
            raise ValueError(f"qualified_repo must be owner/repo, not {qualified_repo!r}")
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for file_name, content in files.items():
                archive.writestr(file_name, content)
        created = created_at or datetime.now(UTC)
        if created.tzinfo is None:
            created = created.replace(tzinfo=UTC)
        with self._lock:
            artifact_id = self._next_artifact_id
            self._next_artifact_id += 1
            self._artifacts[artifact_id] = _Artifact(
                id=artifact_id,
                repo=qualified_repo,
                run_id=int(run_id),
                name=name,
                data=buffer.getvalue(),
                created_at=created.astimezone(UTC).replace(microsecond=0),
                expired=expired,
            )
            return artifact_id

    def set_run_status(
        self, qualified_repo: str, run_id: int, status: str, conclusion: str | None = None
    ) -> None:
        """Make workflow run `run_id` of `qualified_repo` answer `status` (queued,
        in_progress, completed, …) and `conclusion` (cancelled, success, … once completed).
        A run never set is in progress: takes name runs that exist on GitHub."""
        with self._lock:
            self._runs[(qualified_repo.lower(), int(run_id))] = (status, conclusion)

    def inject_fault(
        self,
        status: int | None,
        *,
        count: int = 1,
        method: str | None = None,
        path_contains: str | None = None,
        retry_after: float | None = None,
        delay: float = 0.0,
        body: str | None = None,
    ) -> None:
        """Make the next `count` matching API requests wait `delay` seconds and then, if
        `status` is set, fail with it (403 also reports the rate limit as exhausted). With
        `body`, the answer is that text as it is (status `status` or 200), labelled JSON:
        a malformed or truncated page."""
        with self._lock:
            self._faults.append(
                _Fault(
                    status=status,
                    count=count,
                    method=method.upper() if method else None,
                    path_contains=path_contains,
                    retry_after=retry_after,
                    delay=delay,
                    body=body,
                )
            )

    def exhaust_rate_limit(self, reset_in: float) -> int:
        """Use up the primary rate limit until `reset_in` seconds from now (rounded up to
        a whole second): every counted API request is refused with 403,
        `x-ratelimit-remaining: 0` and `x-ratelimit-reset` (no Retry-After), as GitHub does,
        until the window resets. Returns the reset time (epoch seconds)."""
        with self._lock:
            self._rl_used = self.rate_limit_limit
            self._rl_reset = math.ceil(time.time() + reset_in)
            return self._rl_reset

    def clear_faults(self) -> None:
        """Drop every pending fault."""
        with self._lock:
            self._faults.clear()

    @property
    def requests(self) -> list[RecordedRequest]:
        """(method, path, status) of every API and blob request answered, oldest first."""
        with self._lock:
            return list(self._requests)

    @property
    def timed_requests(self) -> list[tuple[float, RecordedRequest]]:
        """`requests`, each with when it arrived (`time.monotonic()`, before any fault's
        delay): to measure a client's retry spacing."""
        with self._lock:
            return list(zip(self._request_times, self._requests, strict=True))

    @property
    def request_bodies(self) -> list[tuple[str, str, Any]]:
        """(method, path, parsed JSON body) of every API request that carried a body."""
        with self._lock:
            return list(self._bodies)

    @property
    def jit_names(self) -> list[str]:
        """Names passed to generate-jitconfig successfully so far."""
        with self._lock:
            return list(self._jit_names)

    @property
    def blob_requests_with_authorization(self) -> list[str]:
        """Paths of blob downloads that (wrongly) carried an Authorization header."""
        with self._lock:
            return list(self._blob_auth)

    def reset(self) -> None:
        """Forget runners, artifacts, faults, logs and rate-limit use (settings stay)."""
        with self._lock:
            self._clear_state()

    def start_job_simulation(
        self, every: float, duration: float, *, reserve_idle: bool = True
    ) -> None:
        """Simulate workflow jobs, as GitHub and a job would: every `every` seconds, each
        online runner that carries a `reserved-for:` label (a job is waiting for it) gets
        its job; with `reserve_idle`, one random online idle runner is also reserved and
        given a job. A job keeps its runner busy for `duration` seconds, then the ephemeral
        runner deregisters."""
        self.stop_job_simulation()
        self._sim_stop = threading.Event()
        self._sim_thread = threading.Thread(
            target=self._simulate_jobs,
            args=(every, duration, reserve_idle, self._sim_stop),
            name=f"github-standin-jobs:{id(self):x}",
            daemon=True,
        )
        self._sim_thread.start()

    def stop_job_simulation(self) -> None:
        """Stop starting simulated jobs (running ones still end on time)."""
        self._sim_stop.set()
        if self._sim_thread is not None:
            self._sim_thread.join(timeout=5)
            self._sim_thread = None

    # -- simulation --------------------------------------------------------------------------

    def _advance(self) -> None:
        """Apply simulated transitions that are due (call with the lock held)."""
        now = time.monotonic()
        for runner in list(self._runners.values()):
            if runner.done_at is not None and now >= runner.done_at:
                del self._runners[runner.id]
            elif runner.online_at is not None and now >= runner.online_at:
                runner.status, runner.online_at = "online", None
                runner.version = RUNNER_VERSION

    def _simulate_jobs(
        self, every: float, duration: float, reserve_idle: bool, stop: threading.Event
    ) -> None:
        while not stop.wait(every) and not self._stopping.is_set():
            with self._lock:
                self._advance()
                idle = [
                    r
                    for r in self._runners.values()
                    if r.status == "online" and not r.busy and r.done_at is None
                ]
                # A runner the monitor reserved gets the job that reserved it.
                chosen = [r for r in idle if _is_reserved(r)]
                unreserved = [r for r in idle if not _is_reserved(r)]
                if reserve_idle and unreserved:
                    runner = self._random.choice(unreserved)
                    self._add_labels(runner, self._reservation_labels(runner))
                    chosen.append(runner)
                for runner in chosen:
                    runner.busy = True
                    runner.done_at = time.monotonic() + duration
                    log.info("simulated job started on %s for %.1f s", runner.name, duration)
        # Let the transitions already scheduled happen even if nobody polls.
        with self._lock:
            self._advance()

    def _reservation_labels(self, runner: _Runner) -> list[str]:
        kind, _, rest = runner.scope.strip("/").partition("/")
        repo = rest if kind == "repos" else f"{rest}/demo"
        self._next_run_id += 1
        return [
            f"reserved-for:{uuid.uuid4()}",
            f"reserved-since:{int(time.time())}",
            f"reserved-by:{repo}/actions/runs/{self._next_run_id}",
        ]

    # -- state helpers (lock held) -----------------------------------------------------------

    def _runner(self, runner_id: int, scope: str | None = None) -> _Runner:
        self._advance()
        runner = self._runners.get(int(runner_id))
        if runner is None or (scope is not None and runner.scope != scope):
            raise KeyError(runner_id)
        return runner

    def _agent_runner(self, jit_config: str) -> _Runner:
        agent_id, token = _jit_identity(jit_config)
        runner = self._runner(agent_id)  # KeyError: no such runner (any more)
        if runner.jit_token is None or not secrets.compare_digest(
            token.encode(), runner.jit_token.encode()
        ):
            raise PermissionError(f"credentials of runner {runner.name} do not match")
        return runner

    def _label(self, name: str) -> dict[str, Any]:
        label_id = self._label_ids.setdefault(name.lower(), len(self._label_ids) + 1)
        kind = "read-only" if name.lower() in READ_ONLY_LABELS else "custom"
        return {"id": label_id, "name": name, "type": kind}

    def _add_labels(self, runner: _Runner, names: list[str]) -> None:
        have = {label["name"].lower() for label in runner.labels}
        for name in names:
            if name.lower() not in have:
                have.add(name.lower())
                runner.labels.append(self._label(name))

    def _new_runner(
        self, scope: str, name: str, labels: tuple[str, ...] | list[str], *, ephemeral: bool
    ) -> _Runner:
        runner_id = self._next_runner_id
        self._next_runner_id += 1
        lowered = {label.lower() for label in labels}
        runner = _Runner(
            id=runner_id,
            name=name,
            scope=scope,
            labels=[],
            ephemeral=ephemeral,
            os="macos" if "macos" in lowered else "windows" if "windows" in lowered else "linux",
        )
        self._add_labels(runner, ["self-hosted", *labels])
        self._runners[runner_id] = runner
        return runner

    # -- HTTP --------------------------------------------------------------------------------

    def _make_app(self) -> bottle.Bottle:
        app = bottle.Bottle(catchall=True)
        api, ctl = self._api, self._control
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
            artifacts + "/artifacts/<artifact_id:int>/<archive_format>",
            "GET",
            api(self._download_artifact),
        )
        app.route("/rate_limit", "GET", api(self._get_rate_limit, counted=False))
        app.route("/_blob/<artifact_id:int>", "GET", self._blob)

        app.route("/_standin/runners", "GET", ctl(lambda body: self.runners()))
        app.route("/_standin/runners", "POST", ctl(self._ctl_add_runner))
        app.route("/_standin/runners/<runner_id:int>/status", "POST", ctl(self._ctl_status))
        app.route("/_standin/runners/<runner_id:int>/busy", "POST", ctl(self._ctl_busy))
        app.route("/_standin/runners/<runner_id:int>/finish-job", "POST", ctl(self._ctl_finish))
        app.route("/_standin/artifacts", "POST", ctl(self._ctl_add_artifact))
        app.route("/_standin/faults", "POST", ctl(self._ctl_inject_fault))
        app.route("/_standin/faults", "DELETE", ctl(lambda body: self.clear_faults()))
        app.route(
            "/_standin/rate-limit",
            "POST",
            ctl(lambda body: self.exhaust_rate_limit(float(body["reset_in"]))),
        )
        app.route("/_standin/requests", "GET", ctl(lambda body: self._ctl_requests()))
        app.route("/_standin/jit-names", "GET", ctl(lambda body: self.jit_names))
        app.route("/_standin/reset", "POST", ctl(lambda body: self.reset()))
        app.route("/_standin/agent", "POST", ctl(self._ctl_agent))
        app.route("/_standin/runs/<owner>/<repo>/<run_id:int>", "POST", ctl(self._ctl_run))
        app.route("/_standin/job-simulation", "POST", ctl(self._ctl_start_jobs))
        app.route("/_standin/job-simulation", "DELETE", ctl(lambda b: self.stop_job_simulation()))
        app.route("/_standin/agent/online", "POST", self._agent_route(self.agent_online))
        app.route("/_standin/agent/job", "POST", self._agent_route(self.agent_job))
        app.route("/_standin/agent/finish", "POST", self._agent_route(self.agent_finish))

        def not_found(error: bottle.HTTPError) -> str:
            bottle.response.content_type = "application/json; charset=utf-8"
            message = "Not Found" if error.status_code == 404 else str(error.status_line)
            return json.dumps({"message": message, "documentation_url": DOCS})

        for code in (404, 405):
            app.error_handler[code] = not_found
        return app

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
            with self._lock:
                exhausted = False
                try:
                    self._check_auth()
                    self._refill_rate_limit()
                    exhausted = counted and self._rl_used >= self.rate_limit_limit
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
        with self._lock:
            if counted:
                self._rl_used += 1
            remaining = max(0, self.rate_limit_limit - self._rl_used)
            headers = {
                "x-ratelimit-limit": str(self.rate_limit_limit),
                "x-ratelimit-remaining": str(remaining),
                "x-ratelimit-used": str(self._rl_used),
                "x-ratelimit-reset": str(self._rl_reset),
                "x-ratelimit-resource": "core",
                "X-GitHub-Api-Version-Selected": "2022-11-28",
                "X-GitHub-Request-Id": uuid.uuid4().hex[:20].upper(),
                **reply.headers,
            }
            self._requests.append(RecordedRequest(method, path, reply.status))
            self._request_times.append(at)
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

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.method not in (None, method):
                    continue
                if fault.path_contains is not None and fault.path_contains not in path:
                    continue
                fault.count -= 1
                if fault.count <= 0:
                    self._faults.remove(fault)
                return fault
        return None

    def _check_auth(self) -> None:
        header = bottle.request.get_header("Authorization")
        if not header:
            raise _ApiError(401, "Requires authentication")
        scheme, _, credential = header.strip().partition(" ")
        if scheme.lower() not in ("bearer", "token") or not credential.strip():
            raise _ApiError(401, "Bad credentials")
        if self.token is not None and not secrets.compare_digest(
            credential.strip().encode(), self.token.encode()
        ):
            raise _ApiError(401, "Bad credentials")

    def _refill_rate_limit(self) -> None:
        now = int(time.time())
        if now >= self._rl_reset:
            self._rl_used, self._rl_reset = 0, now + RATE_LIMIT_WINDOW

    def _json_body(self) -> Any:
        raw = bottle.request.body.read()
        try:
            body = json.loads(raw or b"null")
        except ValueError as e:
            raise _ApiError(400, "Problems parsing JSON") from e
        self._bodies.append((bottle.request.method, bottle.request.path, body))
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

    def _scoped_runner(self, scope: str, runner_id: int) -> _Runner:
        try:
            return self._runner(runner_id, scope)
        except KeyError:
            raise _ApiError(404, "Not Found") from None

    # -- GitHub routes (lock held) -----------------------------------------------------------

    # https://docs.github.com/rest/actions/self-hosted-runners#list-self-hosted-runners-for-a-repository
    def _list_runners(self, scope: str) -> _Reply:
        self._advance()
        name = bottle.request.query.get("name")
        runners = [
            r.to_json()
            for r in self._runners.values()
            if r.scope == scope and (name is None or r.name == name)
        ]
        return self._paginate(runners, "runners")

    def _get_runner(self, scope: str, runner_id: int) -> _Reply:
        return _Reply(200, self._scoped_runner(scope, runner_id).to_json(), etag=True)

    def _delete_runner(self, scope: str, runner_id: int) -> _Reply:
        runner = self._scoped_runner(scope, runner_id)
        if runner.busy:
            raise _ApiError(422, f'Bad request - Runner "{runner.name}" is still running a job')
        del self._runners[runner.id]
        return _Reply(204)

    # https://docs.github.com/rest/actions/self-hosted-runners#create-configuration-for-a-just-in-time-runner-for-a-repository
    def _generate_jitconfig(self, scope: str) -> _Reply:
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
        self._advance()
        if any(r.name == name and r.scope == scope for r in self._runners.values()):
            raise _ApiError(409, f"Already exists - A runner with the name {name} already exists.")
        runner = self._new_runner(scope, name, labels, ephemeral=True)
        runner.runner_group_id = group
        runner.jit_token = secrets.token_hex()
        if self.agent_online_after is not None:
            runner.online_at = time.monotonic() + self.agent_online_after
        self._jit_names.append(name)
        return _Reply(201, {"runner": runner.to_json(), "encoded_jit_config": _jit_config(runner)})

    # https://docs.github.com/rest/actions/self-hosted-runners#list-labels-for-a-self-hosted-runner-for-a-repository
    def _get_labels(self, scope: str, runner_id: int) -> _Reply:
        return _labels_reply(self._scoped_runner(scope, runner_id), etag=True)

    def _post_labels(self, scope: str, runner_id: int) -> _Reply:
        body = self._json_body()
        runner = self._scoped_runner(scope, runner_id)
        labels = body.get("labels")
        _check_labels(labels, minimum=1)
        self._add_labels(runner, labels)
        return _labels_reply(runner)

    def _put_labels(self, scope: str, runner_id: int) -> _Reply:
        body = self._json_body()
        runner = self._scoped_runner(scope, runner_id)
        labels = body.get("labels")
        _check_labels(labels, minimum=0)
        runner.labels = [label for label in runner.labels if label["type"] == "read-only"]
        self._add_labels(runner, labels)
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
            for a in self._artifacts.values()
            if a.repo == repo and a.run_id == run_id and query.get("name") in (None, a.name)
        ]
        found.sort(key=lambda a: (a.created_at, a.id), reverse=query.get("direction") != "asc")
        base = _request_base()
        return self._paginate([a.to_json(base) for a in found], "artifacts")

    # https://docs.github.com/rest/actions/workflow-runs#get-a-workflow-run
    def _get_workflow_run(self, scope: str, run_id: int) -> _Reply:
        repo = scope.removeprefix("/repos/")
        with self._lock:
            status, conclusion = self._runs.get((repo.lower(), run_id), ("in_progress", None))
        return _Reply(200, _workflow_run(_request_base(), repo, run_id, status, conclusion))

    # https://docs.github.com/rest/actions/artifacts#download-an-artifact
    def _download_artifact(self, scope: str, artifact_id: int, archive_format: str) -> _Reply:
        artifact = self._artifacts.get(artifact_id)
        if artifact is None or f"/repos/{artifact.repo}" != scope or archive_format != "zip":
            raise _ApiError(404, "Not Found")
        if artifact.expired:
            raise _ApiError(410, "Artifact has expired")
        signature = secrets.token_urlsafe(24)
        self._blobs[signature] = (artifact.id, time.monotonic() + BLOB_URL_LIFETIME)
        location = f"{_blob_base()}/_blob/{artifact.id}?{urlencode({'sig': signature})}"
        return _Reply(302, headers={"Location": location})

    # https://docs.github.com/rest/rate-limit/rate-limit#get-rate-limit-status-for-the-authenticated-user
    def _get_rate_limit(self, scope: str) -> _Reply:
        core = {
            "limit": self.rate_limit_limit,
            "remaining": max(0, self.rate_limit_limit - self._rl_used),
            "reset": self._rl_reset,
            "used": self._rl_used,
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
        with self._lock:
            entry = self._blobs.get(bottle.request.query.get("sig") or "")
            artifact = self._artifacts.get(artifact_id)
            status = 200
            if bottle.request.get_header("Authorization"):
                self._blob_auth.append(path)
                status = 400
            elif entry is None or entry[0] != artifact_id or time.monotonic() > entry[1]:
                status = 403
            elif artifact is None:
                status = 404
            self._requests.append(RecordedRequest("GET", path, status))
            self._request_times.append(time.monotonic())
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

    # -- control routes ----------------------------------------------------------------------

    def _control(self, handler: Callable[..., Any]) -> Callable[..., Any]:
        def route(**params: Any) -> Any:
            raw = bottle.request.body.read()
            try:
                body = json.loads(raw) if raw else {}
                result = handler(body, **params)
            except (ValueError, TypeError) as e:
                return _control_reply(400, {"error": str(e)})
            except KeyError as e:
                return _control_reply(404, {"error": f"no such runner or key: {e}"})
            return _control_reply(200, result)

        return route

    def _agent_route(self, call: Callable[[str, str | None], Any]) -> Callable[..., Any]:
        """An agent endpoint: the body is the encoded JIT config as the agent got it. 200 with
        the result as JSON, or 204 when it is None."""

        def route() -> Any:
            raw = bottle.request.body.read(MAX_JIT_CONFIG_BYTES + 1)
            try:
                if len(raw) > MAX_JIT_CONFIG_BYTES:
                    raise _AgentError(413, "that is no JIT config: too long")
                if not raw.isascii():
                    raise _AgentError(422, "that is no JIT config: not ASCII")
                try:
                    result = call(raw.decode().strip(), bottle.request.remote_addr)
                except ValueError as e:
                    raise _AgentError(422, str(e)) from e
                except PermissionError as e:
                    raise _AgentError(401, str(e)) from e
                except RuntimeError as e:
                    raise _AgentError(409, str(e)) from e
                except KeyError:
                    raise _AgentError(404, "no runner has this JIT config") from None
            except _AgentError as e:
                return _control_reply(e.status, {"error": str(e)})
            if result is None:
                return bottle.HTTPResponse(status=204)
            return _control_reply(200, result)

        return route

    def _ctl_add_runner(self, body: dict[str, Any]) -> dict[str, int]:
        runner_id = self.add_runner(
            body["scope"],
            body["name"],
            body.get("labels", ["self-hosted", "Linux", "X64"]),
            status=body.get("status", "offline"),
            busy=bool(body.get("busy", False)),
            ephemeral=bool(body.get("ephemeral", False)),
        )
        return {"id": runner_id}

    def _ctl_status(self, body: dict[str, Any], runner_id: int) -> None:
        self.set_status(runner_id, body["status"])

    def _ctl_busy(self, body: dict[str, Any], runner_id: int) -> None:
        self.set_busy(runner_id, bool(body["busy"]))

    def _ctl_finish(self, body: dict[str, Any], runner_id: int) -> None:
        self.finish_job(runner_id)

    def _ctl_add_artifact(self, body: dict[str, Any]) -> dict[str, int]:
        files: dict[str, bytes | str] = dict(body.get("files", {}))
        for name, encoded in body.get("files_base64", {}).items():
            files[name] = base64.b64decode(encoded)
        created_at = body.get("created_at")
        artifact_id = self.add_artifact(
            body["qualified_repo"],
            body["run_id"],
            body["name"],
            files,
            created_at=datetime.fromisoformat(created_at) if created_at else None,
            expired=bool(body.get("expired", False)),
        )
        return {"id": artifact_id}

    def _ctl_inject_fault(self, body: dict[str, Any]) -> None:
        self.inject_fault(
            body.get("status"),
            count=int(body.get("count", 1)),
            method=body.get("method"),
            path_contains=body.get("path_contains"),
            retry_after=body.get("retry_after"),
            delay=float(body.get("delay", 0.0)),
            body=body.get("body"),
        )

    def _ctl_requests(self) -> list[dict[str, Any]]:
        return [r._asdict() for r in self.requests]

    def _ctl_agent(self, body: dict[str, Any]) -> None:
        value = body.get("online_after")
        self.agent_online_after = None if value is None else float(value)
        if "job_seconds" in body:
            self.agent_job_seconds = float(body["job_seconds"])
        if "hold_jobs" in body:
            self.hold_jobs = bool(body["hold_jobs"])

    def _ctl_run(self, body: dict[str, Any], owner: str, repo: str, run_id: int) -> None:
        self.set_run_status(f"{owner}/{repo}", run_id, body["status"], body.get("conclusion"))

    def _ctl_start_jobs(self, body: dict[str, Any]) -> None:
        self.start_job_simulation(float(body["every"]), float(body["duration"]))


# -- module helpers ------------------------------------------------------------------------


def _scope(params: dict[str, Any]) -> str:
    if "org" in params:
        return f"/orgs/{params['org']}"
    if "owner" in params:
        return f"/repos/{params['owner']}/{params['repo']}"
    return ""


def _route_args(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k not in ("owner", "repo", "org")}


def _normal_scope(scope: str) -> str:
    scope = "/" + scope.strip("/")
    kind, *rest = scope.strip("/").split("/")
    if not ((kind == "repos" and len(rest) == 2) or (kind == "orgs" and len(rest) == 1)):
        raise ValueError(f"scope must be /repos/<owner>/<repo> or /orgs/<org>, not {scope!r}")
    return scope


def _check_status(status: str) -> None:
    if status not in ("online", "offline"):
        raise ValueError(f"status must be 'online' or 'offline', not {status!r}")


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


def _labels_reply(runner: _Runner, *, etag: bool = False) -> _Reply:
    labels = [dict(label) for label in runner.labels]
    return _Reply(200, {"total_count": len(labels), "labels": labels}, etag=etag)


def _error_reply(status: int, message: str, headers: Mapping[str, str] | None = None) -> _Reply:
    body = {"message": message, "documentation_url": DOCS, "status": str(status)}
    return _Reply(status, body, dict(headers or {}))


def _fault_reply(fault: _Fault) -> _Reply:
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


def _control_reply(status: int, body: Any) -> bottle.HTTPResponse:
    return bottle.HTTPResponse(
        body=json.dumps(body), status=status, content_type="application/json; charset=utf-8"
    )


def _jit_config(runner: _Runner) -> str:
    """A config shaped like GitHub's: base64 JSON of base64 `.runner`/`.credentials` files."""

    def b64(value: Any) -> str:
        return base64.b64encode(json.dumps(value).encode()).decode()

    files = {
        ".runner": b64(
            {
                "AgentId": str(runner.id),
                "AgentName": runner.name,
                "PoolId": str(runner.runner_group_id),
                "ServerUrl": "https://pipelinesghubeus1.actions.githubusercontent.com/standin/",
                "WorkFolder": "_work",
                "Ephemeral": "true",
            }
        ),
        ".credentials": b64({"Scheme": "OAuthAccessToken", "Data": {"token": runner.jit_token}}),
        ".credentials_rsaparams": b64({"d": secrets.token_urlsafe(32)}),
    }
    return b64(files)


def _jit_identity(encoded: str) -> tuple[int, str]:
    """(runner id, credential token) of an encoded JIT config as `_jit_config` makes them;
    ValueError if it is not one."""
    try:
        files = json.loads(base64.b64decode(encoded, validate=True))
        runner = json.loads(base64.b64decode(files[".runner"], validate=True))
        credentials = json.loads(base64.b64decode(files[".credentials"], validate=True))
        agent_id, token = int(runner["AgentId"]), credentials["Data"]["token"]
    except (ValueError, TypeError, KeyError) as e:  # binascii.Error is a ValueError
        raise ValueError(f"that is no JIT config: {type(e).__name__}") from None
    if not isinstance(token, str):
        raise ValueError("that is no JIT config: no credential token")
    return agent_id, token


def _workflow_run(
    base: str, repo: str, run_id: int, status: str, conclusion: str | None
) -> dict[str, Any]:
    """A Workflow Run as GET /repos/{owner}/{repo}/actions/runs/{run_id} answers it (the
    fields GitHub's schema requires; the monitor reads `status` and `conclusion`)."""
    url = f"{base}/repos/{repo}/actions/runs/{run_id}"
    sha = hashlib.sha1(str(run_id).encode()).hexdigest()
    created = _iso(datetime.fromtimestamp(1_700_000_000 + run_id % 10_000_000, UTC))
    repository = _minimal_repository(base, repo)
    return {
        "id": run_id,
        "name": "CI",
        "node_id": base64.b64encode(f"WorkflowRun{run_id}".encode()).decode(),
        "head_branch": "main",
        "head_sha": sha,
        "path": ".github/workflows/main.yml",
        "display_title": "CI",
        "run_number": run_id % 100_000,
        "run_attempt": 1,
        "event": "push",
        "status": status,
        "conclusion": conclusion,
        "workflow_id": 1,
        "url": url,
        "html_url": f"https://github.com/{repo}/actions/runs/{run_id}",
        "pull_requests": [],
        "created_at": created,
        "updated_at": created,
        "run_started_at": created,
        "jobs_url": f"{url}/jobs",
        "logs_url": f"{url}/logs",
        "check_suite_url": f"{base}/repos/{repo}/check-suites/{run_id}",
        "artifacts_url": f"{url}/artifacts",
        "cancel_url": f"{url}/cancel",
        "rerun_url": f"{url}/rerun",
        "workflow_url": f"{base}/repos/{repo}/actions/workflows/1",
        "head_commit": {
            "id": sha,
            "tree_id": sha,
            "message": "CI",
            "timestamp": created,
            "author": {"name": "Servo", "email": "servo@example.org"},
            "committer": {"name": "Servo", "email": "servo@example.org"},
        },
        "repository": repository,
        "head_repository": repository,
    }


# The URL fields a Minimal Repository must have, as <name>_url -> path under the repo's URL.
_REPOSITORY_URLS = {
    name: f"/{path}"
    for name, path in {
        "archive": "{archive_format}{/ref}",
        "assignees": "assignees{/user}",
        "blobs": "git/blobs{/sha}",
        "branches": "branches{/branch}",
        "collaborators": "collaborators{/collaborator}",
        "comments": "comments{/number}",
        "commits": "commits{/sha}",
        "compare": "compare/{base}...{head}",
        "contents": "contents/{+path}",
        "contributors": "contributors",
        "deployments": "deployments",
        "downloads": "downloads",
        "events": "events",
        "forks": "forks",
        "git_commits": "git/commits{/sha}",
        "git_refs": "git/refs{/sha}",
        "git_tags": "git/tags{/sha}",
        "hooks": "hooks",
        "issue_comment": "issues/comments{/number}",
        "issue_events": "issues/events{/number}",
        "issues": "issues{/number}",
        "keys": "keys{/key_id}",
        "labels": "labels{/name}",
        "languages": "languages",
        "merges": "merges",
        "milestones": "milestones{/number}",
        "notifications": "notifications{?since,all,participating}",
        "pulls": "pulls{/number}",
        "releases": "releases{/id}",
        "stargazers": "stargazers",
        "statuses": "statuses/{sha}",
        "subscribers": "subscribers",
        "subscription": "subscription",
        "tags": "tags",
        "teams": "teams",
        "trees": "git/trees{/sha}",
    }.items()
}


def _minimal_repository(base: str, repo: str) -> dict[str, Any]:
    owner, _, name = repo.partition("/")
    url = f"{base}/repos/{repo}"
    user = f"{base}/users/{owner}"
    return {
        "id": _repo_id(repo),
        "node_id": base64.b64encode(f"Repository{_repo_id(repo)}".encode()).decode(),
        "name": name,
        "full_name": repo,
        "private": False,
        "fork": False,
        "description": None,
        "html_url": f"https://github.com/{repo}",
        "url": url,
        **{f"{field}_url": url + path for field, path in _REPOSITORY_URLS.items()},
        "owner": {
            "login": owner,
            "id": _repo_id(owner),
            "node_id": base64.b64encode(f"User{owner}".encode()).decode(),
            "avatar_url": f"https://avatars.githubusercontent.com/{owner}",
            "gravatar_id": "",
            "url": user,
            "html_url": f"https://github.com/{owner}",
            "type": "Organization",
            "site_admin": False,
            **{
                f"{field}_url": f"{user}/{path}"
                for field, path in {
                    "events": "events{/privacy}",
                    "followers": "followers",
                    "following": "following{/other_user}",
                    "gists": "gists{/gist_id}",
                    "organizations": "orgs",
                    "received_events": "received_events",
                    "repos": "repos",
                    "starred": "starred{/owner}{/repo}",
                    "subscriptions": "subscriptions",
                }.items()
            },
        },
    }


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _repo_id(repo: str) -> int:
    return int(hashlib.sha1(repo.encode()).hexdigest()[:7], 16)


def _int(value: str | None, default: int) -> int:
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def main(argv: list[str] | None = None) -> int:
    """Serve the stand-in until Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--token", help="accept only this token (default: any)")
    parser.add_argument("--demo", action="store_true", help="play the runner agent and jobs")
    parser.add_argument("--agent-online-after", type=float, default=3.0, metavar="SECONDS")
    parser.add_argument("--job-every", type=float, default=10.0, metavar="SECONDS")
    parser.add_argument("--job-duration", type=float, default=30.0, metavar="SECONDS")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    standin = GitHubStandIn(token=args.token)
    if args.demo:
        standin.agent_online_after = args.agent_online_after
    base_url = standin.start(args.host, args.port)
    if args.demo:
        standin.start_job_simulation(args.job_every, args.job_duration)
    print(f"GitHub stand-in listening on {base_url}", flush=True)

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        while not done.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        standin.stop()
    return 0


def _is_reserved(runner: _Runner) -> bool:
    return any(label["name"].startswith("reserved-for:") for label in runner.labels)


if __name__ == "__main__":
    raise SystemExit(main())
