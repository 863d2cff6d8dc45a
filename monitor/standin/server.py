"""`GitHubStandIn`: the stand-in's state served over HTTP by a waitress server thread, with
the runner agents and the job simulation attached."""

from __future__ import annotations

import logging
import threading
from typing import Any

import bottle

from monitor.serving import BackgroundServer
from monitor.standin.agents import JobSimulation
from monitor.standin.agents import RunnerAgents
from monitor.standin.control import ControlRoutes
from monitor.standin.rest import RestApi
from monitor.standin.state import StandInState

log = logging.getLogger(__name__)


class GitHubStandIn(StandInState):
    """GitHub's runner, artifact and rate-limit endpoints, in memory, over HTTP.

    The settings and the control methods are `StandInState`'s; all are thread-safe. `app` is
    the Bottle app, for a caller that serves it itself.
    """

    def __init__(self, token: str | None = None, *, rate_limit: int = 5000) -> None:
        super().__init__(token, rate_limit=rate_limit)
        self._stopping = threading.Event()
        self._server: BackgroundServer | None = None
        self._base_url: str | None = None
        self._agents = RunnerAgents(self)
        self._jobs = JobSimulation(self, self._stopping, f"github-standin-jobs:{id(self):x}")
        self.app = bottle.Bottle(catchall=True)
        RestApi(self, self._stopping).install(self.app)
        ControlRoutes(self, self._agents, self._jobs).install(self.app)

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

    # A real runner agent, known by the encoded JIT config it was started with: see
    # `RunnerAgents` for what each call does and raises.

    def agent_online(self, jit_config: str, address: str | None = None) -> dict[str, Any]:
        """The agent connected: its runner goes online. Returns the runner's JSON."""
        return self._agents.online(jit_config, address)

    def agent_job(self, jit_config: str, address: str | None = None) -> dict[str, Any] | None:
        """The agent asks for work: the job it was given or gets now, else None."""
        return self._agents.job(jit_config, address)

    def agent_finish(self, jit_config: str, address: str | None = None) -> None:
        """The agent finished its job: an ephemeral runner is deregistered."""
        self._agents.finish(jit_config, address)

    def start_job_simulation(
        self, every: float, duration: float, *, reserve_idle: bool = True
    ) -> None:
        """Simulate workflow jobs, as GitHub and a job would: every `every` seconds, each
        online runner that carries a `reserved-for:` label (a job is waiting for it) gets
        its job; with `reserve_idle`, one random online idle runner is also reserved and
        given a job. A job keeps its runner busy for `duration` seconds, then the ephemeral
        runner deregisters."""
        self._jobs.start(every, duration, reserve_idle=reserve_idle)

    def stop_job_simulation(self) -> None:
        """Stop starting simulated jobs (running ones still end on time)."""
        self._jobs.stop()
