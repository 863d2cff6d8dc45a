"""The queue's composition: its engine over its store and members, its app, and its servers
on `[queue] listen_port` on every `listen_on` address. `main` calls `open_engine_for` (or a
test's factory) and `serve_queue`, for `monitor run` (beside the monitor) and `monitor queue`
(alone, without libvirt).

Threads: the engine's own (its dispatcher, started by `serve_queue`), and one waitress loop
per address with its pool of web threads running `web.make_queue_app`'s routes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from monitor import auth
from monitor import tokenless
from monitor.config import Config
from monitor.github import GitHub
from monitor.queue.contracts import QueueEngine
from monitor.queue.engine import open_engine
from monitor.queue.members import HttpMembers
from monitor.queue.web import body_limit
from monitor.queue.web import make_queue_app
from monitor.serving import BackgroundServer

log = logging.getLogger(__name__)

# Web threads per address. A client's take is answered at once (waiting is a 503 with
# Retry-After), so threads are busy for milliseconds; 500 clients polling once a second fit.
QUEUE_HTTP_THREADS = 32


class RunningEngine(QueueEngine, Protocol):
    """A `QueueEngine` with its threads: `start` before serving, `stop` after."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


def open_engine_for(config: Config) -> RunningEngine:
    """The engine `[queue]` configures: its store (`store_url`), the members of
    `servers` reached over HTTP with the monitor API token, `repository_priority`."""
    assert config.queue is not None
    engine: RunningEngine = open_engine(
        config.queue.store_url,
        HttpMembers(config.api_token),
        config.queue.servers,
        repository_priority=config.queue.repository_priority,
    )
    return engine


@dataclass
class QueueService:
    """The queue being served: `close` stops the servers, then the engine (once)."""

    engine: RunningEngine
    servers: list[BackgroundServer]
    closed: bool = False

    @property
    def urls(self) -> list[str]:
        return [server.url for server in self.servers]

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for server in self.servers:
            server.close()
        self.engine.stop()


def serve_queue(
    config: Config,
    engine: RunningEngine,
    *,
    github: GitHub,
    credentials: auth.Credentials,
    threads: int = QUEUE_HTTP_THREADS,
) -> QueueService:
    """Start `engine` and serve it on `[queue] listen_port` on every `listen_on` address.
    `github` is only for tokenless enqueues' artifact checks. Raises OSError when an address
    cannot be listened on (nothing is left running then)."""
    assert config.queue is not None
    validator = tokenless.TokenlessValidator(
        github,
        allowed_prefix=config.allowed_qualified_repo_prefix,
        max_age=config.tokenless_select_artifact_max_age,
        calls_per_hour=config.tokenless_github_calls_per_hour,
    )
    app = make_queue_app(engine, config, validator, credentials)
    servers: list[BackgroundServer] = []
    # The engine first: a client enqueueing at once finds it polling members already.
    engine.start()
    try:
        for host in config.listen_on:
            servers.append(
                BackgroundServer(
                    app,
                    host=host,
                    port=config.queue.listen_port,
                    threads=threads,
                    name="queue",
                    body_limit=body_limit,
                )
            )
    except OSError:
        for server in servers:
            server.close()
        engine.stop()
        raise
    log.info("queue listening on %s", " ".join(server.url for server in servers))
    return QueueService(engine, servers)
