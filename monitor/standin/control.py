"""The stand-in's own endpoints under `/_standin/`: the control API over HTTP (for a
stand-in in another process: `python -m monitor.standin`, the end-to-end tests' daemons),
and the endpoints a real runner agent calls with its JIT config.

Runs on the stand-in's waitress threads; the state and the agents take their lock.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

import bottle

from monitor.standin.agents import JobSimulation
from monitor.standin.agents import RunnerAgents
from monitor.standin.state import StandInState

# An encoded JIT config is about 1 KB; an agent call with a much longer body is something else.
MAX_JIT_CONFIG_BYTES = 16 * 1024


class _AgentError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class ControlRoutes:
    """`/_standin/...`: each control endpoint calls the Python method of the same meaning."""

    def __init__(self, state: StandInState, agents: RunnerAgents, jobs: JobSimulation) -> None:
        self.state = state
        self.agents = agents
        self.jobs = jobs

    def install(self, app: bottle.Bottle) -> None:
        state, ctl = self.state, self._control
        app.route("/_standin/runners", "GET", ctl(lambda body: state.runners()))
        app.route("/_standin/runners", "POST", ctl(self._add_runner))
        app.route("/_standin/runners/<runner_id:int>/status", "POST", ctl(self._status))
        app.route("/_standin/runners/<runner_id:int>/busy", "POST", ctl(self._busy))
        app.route("/_standin/runners/<runner_id:int>/finish-job", "POST", ctl(self._finish))
        app.route("/_standin/artifacts", "POST", ctl(self._add_artifact))
        app.route("/_standin/artifacts", "GET", ctl(lambda body: state.artifacts()))
        app.route(
            "/_standin/artifacts/<artifact_id:int>",
            "DELETE",
            ctl(lambda body, artifact_id: state.delete_artifact(artifact_id)),
        )
        app.route("/_standin/faults", "POST", ctl(self._inject_fault))
        app.route("/_standin/faults", "DELETE", ctl(lambda body: state.clear_faults()))
        app.route(
            "/_standin/rate-limit",
            "POST",
            ctl(lambda body: state.exhaust_rate_limit(float(body["reset_in"]))),
        )
        app.route("/_standin/requests", "GET", ctl(lambda body: self._requests()))
        app.route("/_standin/jit-names", "GET", ctl(lambda body: state.jit_names))
        app.route("/_standin/reset", "POST", ctl(lambda body: state.reset()))
        app.route("/_standin/agent", "POST", ctl(self._agent_settings))
        app.route("/_standin/runs/<owner>/<repo>/<run_id:int>", "POST", ctl(self._run))
        app.route("/_standin/job-simulation", "POST", ctl(self._start_jobs))
        app.route("/_standin/job-simulation", "DELETE", ctl(lambda body: self.jobs.stop()))
        app.route("/_standin/agent/online", "POST", self._agent_route(self.agents.online))
        app.route("/_standin/agent/job", "POST", self._agent_route(self.agents.job))
        app.route("/_standin/agent/finish", "POST", self._agent_route(self.agents.finish))

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

    def _add_runner(self, body: dict[str, Any]) -> dict[str, int]:
        runner_id = self.state.add_runner(
            body["scope"],
            body["name"],
            body.get("labels", ["self-hosted", "Linux", "X64"]),
            status=body.get("status", "offline"),
            busy=bool(body.get("busy", False)),
            ephemeral=bool(body.get("ephemeral", False)),
        )
        return {"id": runner_id}

    def _status(self, body: dict[str, Any], runner_id: int) -> None:
        self.state.set_status(runner_id, body["status"])

    def _busy(self, body: dict[str, Any], runner_id: int) -> None:
        self.state.set_busy(runner_id, bool(body["busy"]))

    def _finish(self, body: dict[str, Any], runner_id: int) -> None:
        self.state.finish_job(runner_id)

    def _add_artifact(self, body: dict[str, Any]) -> dict[str, int]:
        files: dict[str, bytes | str] = dict(body.get("files", {}))
        for name, encoded in body.get("files_base64", {}).items():
            files[name] = base64.b64decode(encoded)
        created_at = body.get("created_at")
        artifact_id = self.state.add_artifact(
            body["qualified_repo"],
            body["run_id"],
            body["name"],
            files,
            created_at=datetime.fromisoformat(created_at) if created_at else None,
            expired=bool(body.get("expired", False)),
        )
        return {"id": artifact_id}

    def _inject_fault(self, body: dict[str, Any]) -> None:
        self.state.inject_fault(
            body.get("status"),
            count=int(body.get("count", 1)),
            method=body.get("method"),
            path_contains=body.get("path_contains"),
            retry_after=body.get("retry_after"),
            delay=float(body.get("delay", 0.0)),
            body=body.get("body"),
        )

    def _requests(self) -> list[dict[str, Any]]:
        return [r._asdict() for r in self.state.requests]

    def _agent_settings(self, body: dict[str, Any]) -> None:
        """Change the settings the body names; the others stay as they are."""
        if "online_after" in body:
            value = body["online_after"]
            self.state.agent_online_after = None if value is None else float(value)
        if "busy_lag" in body:
            lag = float(body["busy_lag"])
            if not 0 <= lag < float("inf"):
                raise ValueError(f"busy_lag must be a non-negative number of seconds, not {lag}")
            self.state.busy_lag = lag
        if "job_seconds" in body:
            self.state.agent_job_seconds = float(body["job_seconds"])
        if "hold_jobs" in body:
            self.state.hold_jobs = bool(body["hold_jobs"])

    def _run(self, body: dict[str, Any], owner: str, repo: str, run_id: int) -> None:
        self.state.set_run_status(f"{owner}/{repo}", run_id, body["status"], body.get("conclusion"))

    def _start_jobs(self, body: dict[str, Any]) -> None:
        self.jobs.start(float(body["every"]), float(body["duration"]))


def _control_reply(status: int, body: Any) -> bottle.HTTPResponse:
    return bottle.HTTPResponse(
        body=json.dumps(body), status=status, content_type="application/json; charset=utf-8"
    )
