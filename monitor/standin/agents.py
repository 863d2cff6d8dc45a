"""The runner side of GitHub: real runner agents calling in, and a simulation of agents and
workflow jobs for tests and `monitor demo`.

A real agent (the end-to-end tests' guests run one, `tests/guest/agent.sh`) is known by the
encoded JIT config it was started with, as GitHub knows a runner by its credentials;
`RunnerAgents` answers it on a waitress thread (or a test's). `JobSimulation` runs on its own
thread and plays both the agents and the jobs. Both change the state under its lock.
"""

from __future__ import annotations

import itertools
import logging
import random
import secrets
import threading
import time
import uuid
from typing import Any

from monitor.standin.shapes import jit_identity
from monitor.standin.state import RUNNER_VERSION
from monitor.standin.state import AgentCall
from monitor.standin.state import Runner
from monitor.standin.state import StandInState

log = logging.getLogger(__name__)


class RunnerAgents:
    """What a real runner agent does. Each call raises KeyError for a config of no current
    runner, PermissionError for one whose credentials are not the runner's, ValueError for
    one that is not a JIT config."""

    def __init__(self, state: StandInState) -> None:
        self.state = state
        self._job_ids = itertools.count(7_000_001)

    def online(self, jit_config: str, address: str | None = None) -> dict[str, Any]:
        """The agent connected: its runner goes online. Returns the runner's JSON."""
        with self.state.lock:
            runner = self._runner(jit_config)
            runner.status, runner.online_at = "online", None
            runner.version = RUNNER_VERSION
            self._record(runner, "online", address)
            return runner.to_json(self.state.clock())

    def job(self, jit_config: str, address: str | None = None) -> dict[str, Any] | None:
        """The agent asks for work: the job it was given, or a new one if the runner is
        online and carries a `reserved-for:` label (the job that reserved it is waiting for
        it, `runs-on: reserved-for:<id>`), which makes it busy; else None."""
        with self.state.lock:
            runner = self._runner(jit_config)
            ready = runner.status == "online" and not runner.busy and not self.state.hold_jobs
            reserved_for = runner.reserved_for
            if runner.job is None and ready and reserved_for is not None:
                job_id = next(self._job_ids)
                runner.job = {
                    "id": job_id,
                    "reserved_for": reserved_for,
                    "seconds": self.state.agent_job_seconds,
                }
                runner.start_job(self.state.job_started_busy_from())
                self._record(runner, "job", address)
                log.info("job %d assigned to %s", job_id, runner.name)
            return None if runner.job is None else dict(runner.job)

    def finish(self, jit_config: str, address: str | None = None) -> None:
        """The agent finished its job: an ephemeral runner's registration is removed, as
        GitHub does; another becomes idle again. RuntimeError if it had no job."""
        with self.state.lock:
            runner = self._runner(jit_config)
            if runner.job is None:
                raise RuntimeError(f"runner {runner.name} has no job to finish")
            self._record(runner, "finish", address)
            if runner.ephemeral:
                del self.state.records.runners[runner.id]
            else:
                runner.busy, runner.busy_from, runner.job = False, None, None

    def _runner(self, jit_config: str) -> Runner:
        agent_id, token = jit_identity(jit_config)
        runner = self.state.records.runner(agent_id)  # KeyError: no such runner (any more)
        if runner.jit_token is None or not secrets.compare_digest(
            token.encode(), runner.jit_token.encode()
        ):
            raise PermissionError(f"credentials of runner {runner.name} do not match")
        return runner

    def _record(self, runner: Runner, call: str, address: str | None) -> None:
        self.state.records.agent_calls.append(AgentCall(runner.id, runner.name, call, address))


class JobSimulation:
    """Simulated workflow jobs, as GitHub and a job would, on a thread named `thread_name`.
    `stopping` (the stand-in shutting down) ends it too."""

    def __init__(self, state: StandInState, stopping: threading.Event, thread_name: str) -> None:
        self.state = state
        self._stopping = stopping
        self._thread_name = thread_name
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._random = random.Random()
        self._run_ids = itertools.count(14_000_000_001)

    def start(self, every: float, duration: float, *, reserve_idle: bool = True) -> None:
        """Every `every` seconds, each online runner that carries a `reserved-for:` label (a
        job is waiting for it) gets its job; with `reserve_idle`, one random online idle runner
        is also reserved and given a job. A job keeps its runner busy for `duration` seconds,
        then the ephemeral runner deregisters."""
        self.stop()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run,
            args=(every, duration, reserve_idle, self._stop),
            name=self._thread_name,
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop starting simulated jobs (running ones still end on time)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(
        self, every: float, duration: float, reserve_idle: bool, stop: threading.Event
    ) -> None:
        while not stop.wait(every) and not self._stopping.is_set():
            with self.state.lock:
                records = self.state.records
                records.advance()
                idle = [
                    r
                    for r in records.runners.values()
                    if r.status == "online" and not r.busy and r.done_at is None
                ]
                # A runner the monitor reserved gets the job that reserved it.
                chosen = [r for r in idle if r.reserved_for is not None]
                unreserved = [r for r in idle if r.reserved_for is None]
                if reserve_idle and unreserved:
                    runner = self._random.choice(unreserved)
                    records.add_labels(runner, self._reservation_labels(runner))
                    chosen.append(runner)
                for runner in chosen:
                    runner.start_job(self.state.job_started_busy_from())
                    runner.done_at = time.monotonic() + duration
                    log.info("simulated job started on %s for %.1f s", runner.name, duration)
        # Let the transitions already scheduled happen even if nobody polls.
        with self.state.lock:
            self.state.records.advance()

    def _reservation_labels(self, runner: Runner) -> list[str]:
        kind, _, rest = runner.scope.strip("/").partition("/")
        repo = rest if kind == "repos" else f"{rest}/demo"
        return [
            f"reserved-for:{uuid.uuid4()}",
            f"reserved-since:{int(time.time())}",
            f"reserved-by:{repo}/actions/runs/{next(self._run_ids)}",
        ]
