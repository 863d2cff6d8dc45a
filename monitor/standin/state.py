"""What the stand-in knows of GitHub's side: runners, artifacts, workflow runs, faults, the
rate limit and the requests it answered, behind one lock; and the Python control API that
tests and `monitor demo` call to change it.

Every public method of `StandInState` takes the lock, so any thread may call it (a test's, a
waitress thread answering a `/_standin/...` request, the job simulation's thread). `Records`
is not locked itself: its users hold `StandInState.lock`.
"""

from __future__ import annotations

import io
import itertools
import math
import threading
import time
import zipfile
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC
from datetime import datetime
from typing import Any
from typing import NamedTuple

RUNNER_VERSION = "2.323.0"
# Labels GitHub applies itself (type "read-only"); everything else a client adds is "custom".
READ_ONLY_LABELS = frozenset({"self-hosted", "linux", "windows", "macos", "x64", "arm64", "arm"})
RATE_LIMIT_WINDOW = 3600
# The label a take puts on the runner it reserves; the job that reserved it waits for it.
RESERVED_FOR = "reserved-for:"


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
class Fault:
    status: int | None
    count: int
    method: str | None
    path_contains: str | None
    retry_after: float | None
    delay: float
    body: str | None = None


@dataclass
class Runner:
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
    # While `busy`, GitHub reports it only from this time on (`StandInState.clock`): the
    # `busy_lag` after its job started. None: at once.
    busy_from: float | None = None

    def reported_busy(self, now: float) -> bool:
        """`busy` as GitHub's API says it at `now`: false during the lag after a job started."""
        return self.busy and (self.busy_from is None or now >= self.busy_from)

    def start_job(self, busy_from: float | None) -> None:
        self.busy, self.busy_from = True, busy_from

    def to_json(self, now: float) -> dict[str, Any]:
        """GitHub's JSON for the runner as the API shows it at `now` (`StandInState.clock`)."""
        return {
            "id": self.id,
            "runner_group_id": self.runner_group_id,
            "name": self.name,
            "os": self.os,
            "status": self.status,
            "busy": self.reported_busy(now),
            "ephemeral": self.ephemeral,
            "labels": [dict(label) for label in self.labels],
            "version": self.version,
        }

    @property
    def reserved_for(self) -> str | None:
        """The id of the job that reserved this runner (its `reserved-for:` label), or None."""
        for label in self.labels:
            name: str = label["name"]
            if name.startswith(RESERVED_FOR):
                return name.removeprefix(RESERVED_FOR)
        return None


@dataclass
class Artifact:
    id: int
    repo: str
    run_id: int
    name: str
    data: bytes
    created_at: datetime
    expired: bool


class Records:
    """Everything `reset()` forgets: the runners, artifacts and runs, pending faults, the
    rate-limit window, and the logs of what was asked. Callers hold `StandInState.lock`."""

    def __init__(self, runner_ids: Iterator[int]) -> None:
        # Shared with the records before this one, so that a test never sees an id reused.
        self.runner_ids = runner_ids
        self.runners: dict[int, Runner] = {}
        self.artifacts: dict[int, Artifact] = {}
        # Signed blob URLs handed out: signature -> (artifact id, monotonic expiry).
        self.blobs: dict[str, tuple[int, float]] = {}
        self.faults: list[Fault] = []
        self.requests: list[RecordedRequest] = []
        self.request_times: list[float] = []
        self.bodies: list[tuple[str, str, Any]] = []
        self.jit_names: list[str] = []
        self.label_ids: dict[str, int] = {}
        self.blob_auth: list[str] = []
        self.agent_calls: list[AgentCall] = []
        # Workflow runs a test has set, by (lower-cased repo, run id): (status, conclusion).
        self.runs: dict[tuple[str, int], tuple[str, str | None]] = {}
        self.rate_limit_used = 0
        self.rate_limit_reset = int(time.time()) + RATE_LIMIT_WINDOW

    def advance(self) -> None:
        """Apply simulated transitions that are due."""
        now = time.monotonic()
        for runner in list(self.runners.values()):
            if runner.done_at is not None and now >= runner.done_at:
                del self.runners[runner.id]
            elif runner.online_at is not None and now >= runner.online_at:
                runner.status, runner.online_at = "online", None
                runner.version = RUNNER_VERSION

    def runner(self, runner_id: int, scope: str | None = None) -> Runner:
        """The runner with this id (in `scope` if given); KeyError if there is none."""
        self.advance()
        runner = self.runners.get(int(runner_id))
        if runner is None or (scope is not None and runner.scope != scope):
            raise KeyError(runner_id)
        return runner

    def new_runner(
        self, scope: str, name: str, labels: tuple[str, ...] | list[str], *, ephemeral: bool
    ) -> Runner:
        runner_id = next(self.runner_ids)
        lowered = {label.lower() for label in labels}
        runner = Runner(
            id=runner_id,
            name=name,
            scope=scope,
            labels=[],
            ephemeral=ephemeral,
            os="macos" if "macos" in lowered else "windows" if "windows" in lowered else "linux",
        )
        self.add_labels(runner, ["self-hosted", *labels])
        self.runners[runner_id] = runner
        return runner

    def add_labels(self, runner: Runner, names: list[str]) -> None:
        have = {label["name"].lower() for label in runner.labels}
        for name in names:
            if name.lower() not in have:
                have.add(name.lower())
                runner.labels.append(self._label(name))

    def _label(self, name: str) -> dict[str, Any]:
        label_id = self.label_ids.setdefault(name.lower(), len(self.label_ids) + 1)
        kind = "read-only" if name.lower() in READ_ONLY_LABELS else "custom"
        return {"id": label_id, "name": name, "type": kind}

    def record_request(self, method: str, path: str, status: int, at: float) -> None:
        self.requests.append(RecordedRequest(method, path, status))
        self.request_times.append(at)

    def refill_rate_limit(self) -> None:
        now = int(time.time())
        if now >= self.rate_limit_reset:
            self.rate_limit_used, self.rate_limit_reset = 0, now + RATE_LIMIT_WINDOW


class StandInState:
    """GitHub's runners, artifacts, runs and rate limit in memory, and the calls that change
    them or read what was asked.

    `token`: if set, API requests must carry `Authorization: Bearer <token>` (or `token
    <token>`); if None, any credentials are accepted but some must be sent.
    `agent_online_after` (seconds or None) makes each new JIT runner go online that long after
    its config was generated. `agent_job_seconds` is how long a real agent is told to run the
    job it is given; while `hold_jobs` is set, no agent is given one (the jobs wait in GitHub's
    queue), so a test can see a runner Reserved before it is Busy. `busy_lag` (seconds) makes
    the API report a runner whose job started (an agent's or a simulated one) as not busy for
    that long, as GitHub does for 25-60 s; meanwhile it also lets the runner be deleted, job
    and all. It is measured on `clock` (`time.monotonic`; a test may give the stand-in its own
    fake clock). With `jit_permission` false the token may read runners but not register
    them: generate-jitconfig answers 403 as GitHub does for a fine-grained token without
    write access to the runners.
    """

    def __init__(self, token: str | None = None, *, rate_limit: int = 5000) -> None:
        self.token = token
        self.agent_online_after: float | None = None
        self.agent_job_seconds = 5.0
        self.hold_jobs = False
        self.busy_lag = 0.0
        self.jit_permission = True
        self.clock: Callable[[], float] = time.monotonic
        self.rate_limit_limit = rate_limit
        self.lock = threading.RLock()
        self._runner_ids = itertools.count(41_000_000)
        self._artifact_ids = itertools.count(2_900_000_000)
        self.records = Records(self._runner_ids)

    def runners(self) -> list[dict[str, Any]]:
        """Every runner in every scope, as GitHub's JSON plus a `scope` key."""
        with self.lock:
            self.records.advance()
            now = self.clock()
            return [{**r.to_json(now), "scope": r.scope} for r in self.records.runners.values()]

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
        check_status(status)
        with self.lock:
            scope = normal_scope(scope)
            if any(r.name == name and r.scope == scope for r in self.records.runners.values()):
                raise ValueError(f"runner {name!r} already exists in {scope}")
            runner = self.records.new_runner(scope, name, labels, ephemeral=ephemeral)
            runner.status, runner.busy = status, busy
            if status == "online":
                runner.version = RUNNER_VERSION
            return runner.id

    def set_status(self, runner_id: int, status: str) -> None:
        """Set a runner `online` or `offline` (cancels a pending simulated connect)."""
        check_status(status)
        with self.lock:
            runner = self.records.runner(runner_id)
            runner.status, runner.online_at = status, None
            if status == "online":
                runner.version = runner.version or RUNNER_VERSION

    def set_busy(self, runner_id: int, busy: bool) -> None:
        """Mark a runner busy (running a job) or not, as the API reports it at once."""
        with self.lock:
            runner = self.records.runner(runner_id)
            runner.busy, runner.busy_from = bool(busy), None

    def job_started_busy_from(self) -> float | None:
        """When a job starting now shows as busy in the API (None: at once). Lock held."""
        return self.clock() + self.busy_lag if self.busy_lag > 0 else None

    def finish_job(self, runner_id: int) -> None:
        """The runner's job ended: an ephemeral runner deregisters itself."""
        with self.lock:
            runner = self.records.runner(runner_id)
            del self.records.runners[runner.id]

    @property
    def agent_calls(self) -> list[AgentCall]:
        """Every successful agent call so far, oldest first."""
        with self.lock:
            return list(self.records.agent_calls)

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
        with self.lock:
            artifact_id = next(self._artifact_ids)
            self.records.artifacts[artifact_id] = Artifact(
                id=artifact_id,
                repo=qualified_repo,
                run_id=int(run_id),
                name=name,
                data=buffer.getvalue(),
                created_at=created.astimezone(UTC).replace(microsecond=0),
                expired=expired,
            )
            return artifact_id

    def artifacts(self) -> list[dict[str, Any]]:
        """Every artifact not yet deleted, oldest first: id, qualified_repo, run_id, name,
        created_at (RFC 3339), expired."""
        with self.lock:
            return [
                {
                    "id": a.id,
                    "qualified_repo": a.repo,
                    "run_id": a.run_id,
                    "name": a.name,
                    "created_at": a.created_at.isoformat().replace("+00:00", "Z"),
                    "expired": a.expired,
                }
                for a in sorted(self.records.artifacts.values(), key=lambda a: a.id)
            ]

    def delete_artifact(self, artifact_id: int) -> None:
        """Delete an artifact, as `DELETE /repos/<repo>/actions/artifacts/<id>` does (a
        workflow deletes its args artifact once the queue has read it); KeyError if there is
        none."""
        with self.lock:
            del self.records.artifacts[int(artifact_id)]

    def set_run_status(
        self, qualified_repo: str, run_id: int, status: str, conclusion: str | None = None
    ) -> None:
        """Make workflow run `run_id` of `qualified_repo` answer `status` (queued,
        in_progress, completed, …) and `conclusion` (cancelled, success, … once completed).
        A run never set is in progress: takes name runs that exist on GitHub."""
        with self.lock:
            self.records.runs[(qualified_repo.lower(), int(run_id))] = (status, conclusion)

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
        with self.lock:
            self.records.faults.append(
                Fault(
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
        with self.lock:
            self.records.rate_limit_used = self.rate_limit_limit
            self.records.rate_limit_reset = math.ceil(time.time() + reset_in)
            return self.records.rate_limit_reset

    def clear_faults(self) -> None:
        """Drop every pending fault."""
        with self.lock:
            self.records.faults.clear()

    @property
    def requests(self) -> list[RecordedRequest]:
        """(method, path, status) of every API and blob request answered, oldest first."""
        with self.lock:
            return list(self.records.requests)

    @property
    def timed_requests(self) -> list[tuple[float, RecordedRequest]]:
        """`requests`, each with when it arrived (`time.monotonic()`, before any fault's
        delay): to measure a client's retry spacing."""
        with self.lock:
            return list(zip(self.records.request_times, self.records.requests, strict=True))

    @property
    def request_bodies(self) -> list[tuple[str, str, Any]]:
        """(method, path, parsed JSON body) of every API request that carried a body."""
        with self.lock:
            return list(self.records.bodies)

    @property
    def jit_names(self) -> list[str]:
        """Names passed to generate-jitconfig successfully so far."""
        with self.lock:
            return list(self.records.jit_names)

    @property
    def blob_requests_with_authorization(self) -> list[str]:
        """Paths of blob downloads that (wrongly) carried an Authorization header."""
        with self.lock:
            return list(self.records.blob_auth)

    def reset(self) -> None:
        """Forget runners, artifacts, faults, logs and rate-limit use (settings stay)."""
        with self.lock:
            self.records = Records(self._runner_ids)


def normal_scope(scope: str) -> str:
    scope = "/" + scope.strip("/")
    kind, *rest = scope.strip("/").split("/")
    if not ((kind == "repos" and len(rest) == 2) or (kind == "orgs" and len(rest) == 1)):
        raise ValueError(f"scope must be /repos/<owner>/<repo> or /orgs/<org>, not {scope!r}")
    return scope


def check_status(status: str) -> None:
    if status not in ("online", "offline"):
        raise ValueError(f"status must be 'online' or 'offline', not {status!r}")
