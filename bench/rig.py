"""Shared set-up for the benchmarks: the GitHub stand-in in a process of its own, and in this
process libvirt's test driver (a private node file), a real `Monitor` with its scheduler, and
waitress servers on 127.0.0.1 that stop by themselves.

`Rig(runners=50)` writes a config with tests.support.configs (profile `linux` with
target = runners), starts everything, and `bring_to_idle()` waits until every runner is
Idle (the stand-in marks each JIT runner online shortly after its registration). Use it as a
context manager; leaving it stops every thread and server it started and removes its files.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path

from monitor import models
from monitor.main import tune_interpreter
from monitor.scheduler import make_scheduler
from tests.support.configs import config_for_test_driver
from tests.support.daemons import StandInProcess
from tests.support.served import monitor_for

PROFILE = "linux"
SCOPE = "/repos/test/servo"


class DiscardedConnections(logging.Filter):
    """Counts (and hides) urllib3's "Connection pool is full, discarding connection": each
    is a GitHub call that found no idle kept-alive connection and will not leave one."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("Connection pool is full"):
            self.count += 1
            return False
        return True


def quiet_logging() -> DiscardedConnections:
    """WARNING and up, without waitress' per-request queue-depth warnings under load."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    discarded = DiscardedConnections()
    logging.getLogger("urllib3.connectionpool").addFilter(discarded)
    return discarded


class Rig:
    """Stand-in + test driver + Monitor (+ scheduler), `runners` linux runners wanted.

    `standin_threads`: waitress threads answering as GitHub. The stand-in's own `start()`
    uses 8, which would let only 8 delayed answers be in progress at once; GitHub answers
    concurrent requests concurrently, so the benchmark serves the stand-in's app itself.
    """

    def __init__(self, runners: int, standin_threads: int = 64) -> None:
        tune_interpreter()  # as `monitor run` does
        self.runners = runners
        self.root = Path(tempfile.mkdtemp(prefix="monitor-bench-"))
        self.standin = StandInProcess(standin_threads)
        self.standin.agent_online_after(0.2)
        self.config = config_for_test_driver(
            self.root,
            self.standin.url,
            {PROFILE: runners},
            available_memory=f"{2 * runners}G",
        )
        self.github, self.hypervisor, self.monitor = monitor_for(self.config)
        self.scheduler = make_scheduler(self.monitor)
        self.monitor.start()
        self.scheduler.start()

    def idle_count(self) -> int:
        observation = self.monitor.observation
        if observation is None:
            return 0
        return sum(r.status.value == "Idle" for r in observation.runners)

    def bring_to_idle(self, timeout: float = 120.0) -> float:
        """Wait until all runners are Idle; returns the seconds it took."""
        started = time.monotonic()
        deadline = started + timeout
        while self.idle_count() < self.runners:
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"only {self.idle_count()}/{self.runners} runners Idle after {timeout:.0f} s"
                )
            for registration in self.standin.runners():
                if registration["status"] != "online":
                    self.standin.set_status(registration["id"], "online")
            # Don't wait api_cache_timeout (30 s) for the next look at GitHub.
            self.monitor.registrations.cache.invalidate()
            time.sleep(0.25)
        # No more simulated agents: runners created later stay as they are.
        self.standin.agent_online_after(None)
        return time.monotonic() - started

    def close(self) -> None:
        self.scheduler.shutdown(wait=False)
        self.monitor.stop()
        self.hypervisor.close()
        models.close_store()
        self.standin.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Rig:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
