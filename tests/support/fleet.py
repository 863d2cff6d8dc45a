"""A fleet on loopback for the global queue's tests and benchmarks: one GitHub stand-in and N
real `monitor run` processes, each a host of its own.

Each member has its own libvirt `test:///default` (the test driver's state is per process),
data directory, port and `github_api_suffix` (`host1`, `host2`, ...; the registrations
`<guest>@hostN` tell whose runner is whose on the one stand-in), the profiles `linux` and
`windows` (targets 2 and 1 by default) and `queue_member = true`. With `queue=True`, the
first member's monitor.toml also gets a `[queue]` table listing every member, so its
`monitor run` serves the queue (`queue_url`). With `queue="alone"`, the queue is a process of
its own instead (`monitor queue --config queue/monitor.toml`, its SQLite store under its own
data_path; `fleet.queue_process`), which a test may kill and start again on the same store.

The stand-in runs in this process (a waitress thread pool): the tests drive it through its
Python methods, the members reach it over HTTP. Every simulated runner agent connects at
once (`agent_online_after = 0`), so a created runner is Idle on the monitor's first look.

    with Fleet(tmp_path, queue=True) as fleet:
        fleet.wait_idle()
        outputs = fleet.run_client("linux", count=2)
        assert len(fleet.reserved_for(outputs["unique_id"])) == 2

Leaving the `with` stops every member (SIGTERM, then SIGKILL after a grace period) and the
stand-in; `close()` returns each member's exit code and log.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import IO
from typing import Any

from monitor.standin import GitHubStandIn
from tests.support.configs import set_settings
from tests.support.configs import write_config
from tests.support.constants import GITHUB_TOKEN
from tests.support.constants import REPO
from tests.support.constants import ROOT
from tests.support.daemons import clean_env
from tests.support.daemons import free_port
from tests.support.waiting import wait_until

CLIENT = ROOT / "tests" / "scripts" / "runner-select.sh"
FALLBACK_LABEL = "ubuntu-22.04"
RESERVED_FOR = "reserved-for:"
DEFAULT_TARGETS = {"linux": 2, "windows": 1}


class Member:
    """One `monitor run` process (or, `command="queue"`, the queue alone: `monitor queue`):
    its directory, config, port and log."""

    def __init__(self, index: int, root: Path, port: int, command: str = "run") -> None:
        self.index = index
        self.command = command
        self.suffix = f"host{index + 1}"
        self.root = root
        self.port = port
        self.config_path = root / "monitor.toml"
        self.log_path = root / "monitor.log"
        self.process: subprocess.Popen[str] | None = None
        self._log: IO[str] | None = None
        self._terminated = False

    @property
    def url(self) -> str:
        """The member's base URL (no trailing /), as `[queue] servers` lists it."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, env: Mapping[str, str] | None = None) -> None:
        """`python -m monitor run --config monitor.toml` (or `queue`), its output appended to
        `log_path` (a file, not a pipe: nobody has to read it for the monitor to go on)."""
        if self.alive:
            raise RuntimeError(f"member {self.suffix} is already running")
        self._log = open(self.log_path, "a")  # noqa: SIM115 - closed in wait()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "monitor", self.command, "--config", str(self.config_path)],
            cwd=self.root,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            text=True,
            env={**clean_env(), **(env or {})},
        )
        self._terminated = False

    def terminate(self) -> None:
        """SIGTERM, once: a second one while the monitor shuts down would end it by the
        signal's default action, not by its own shutdown."""
        if self.process is not None and self.process.poll() is None and not self._terminated:
            self._terminated = True
            self.process.send_signal(signal.SIGTERM)

    def stop(self, grace: float = 30) -> int | None:
        """SIGTERM, then SIGKILL after `grace` seconds; returns the exit code (None if it
        never ran)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.wait()

    def kill(self) -> int | None:
        """SIGKILL at once (a crash); returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.kill()
        return self.wait()

    def wait(self) -> int | None:
        assert self.process is not None
        code = self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def get(self, path: str, timeout: float = 5) -> tuple[int, Any]:
        """GET `path`: (status, parsed JSON body or the text)."""
        return self.request("GET", path, timeout=timeout)

    def request(
        self, method: str, path: str, headers: Mapping[str, str] | None = None, timeout: float = 5
    ) -> tuple[int, Any]:
        """One request to the member: (status, parsed JSON body or the text)."""
        return http_request(method, self.url + path, headers, timeout)

    def counts(self) -> dict[str, dict[str, int]] | None:
        """`profile_runner_counts` of its `/dashboard.json`, or None while it has none (not
        up yet, or 503 before its first look at its runners)."""
        try:
            status, body = self.get("/dashboard.json")
        except OSError:
            return None
        if status != 200 or not isinstance(body, dict):
            return None
        return body.get("profile_runner_counts")


class Fleet:
    """A stand-in and `members` monitor processes under `root` (see the module docstring).

    `targets`: profile -> target_count on every member. `queue`: write the `[queue]` table
    (servers = every member) into the first member's config. `queue_listen_port`: also write
    `[queue] listen_port = <a free port>` (without it the queue would take upstream's 8002).
    `settings`: more top-level keys for every member (TOML text values, e.g. `{"x": "1"}`);
    `queue_extra`: more lines for the `[queue]` table; `queue="alone"`: the queue in a
    `monitor queue` process of its own (`queue_process`, started with the members). The
    monitors look at GitHub every `api_cache_timeout` = 2 s and tick every second, so a freed
    runner is replaced quickly.
    """

    def __init__(
        self,
        root: Path,
        members: int = 3,
        *,
        targets: Mapping[str, int] | None = None,
        queue: bool | str = False,
        queue_listen_port: bool = True,
        queue_extra: str = "",
        settings: Mapping[str, str] | None = None,
        standin_threads: int = 16,
        start: bool = True,
    ) -> None:
        self.root = root
        self.targets = dict(DEFAULT_TARGETS if targets is None else targets)
        self.standin = GitHubStandIn(token=GITHUB_TOKEN)
        self.standin.agent_online_after = 0.0
        self.standin.start(threads=standin_threads)
        if queue not in (False, True, "alone"):
            raise ValueError(f"queue must be False, True or 'alone', not {queue!r}")
        self.members = [Member(i, root / f"host{i + 1}", free_port()) for i in range(members)]
        self.queue_port: int | None = None
        if queue and queue_listen_port:
            self.queue_port = free_port()
        elif queue:
            self.queue_port = 8002  # upstream's and the monitor's default
        for member in self.members:
            in_member = queue is True and member.index == 0
            self._write_config(member, in_member, queue_extra, settings or {})
        self.queue_process: Member | None = None
        if queue == "alone":
            self.queue_process = Member(-1, root / "queue", free_port(), command="queue")
            self.queue_process.suffix = "queue"
            self._write_config(self.queue_process, True, queue_extra, settings or {})
        self._run_ids = iter(range(15_000_000_001, 16_000_000_000))
        if start:
            for member in self.members:
                member.start()
            if self.queue_process is not None:
                self.queue_process.start()

    def _write_config(
        self, member: Member, with_queue: bool, queue_extra: str, settings: Mapping[str, str]
    ) -> None:
        path = write_config(member.root, github_api_url=self.standin.base_url, targets=self.targets)
        set_settings(
            path,
            {
                "github_api_suffix": json.dumps(member.suffix),
                "listen_port": str(member.port),
                "external_base_url": json.dumps(member.url + "/"),
                "queue_member": "true",
                "monitor_poll_interval": "1",
                "api_cache_timeout": "2",
                **settings,
            },
        )
        if with_queue:
            # Appended last: set_settings rewrites `key = ...` lines wherever they are, and
            # `listen_port` is a key of both the top level and `[queue]`.
            servers = ", ".join(json.dumps(m.url) for m in self.members)
            table = f"\n[queue]\nservers = [{servers}]\n"
            if self.queue_port != 8002:
                table += f"listen_port = {self.queue_port}\n"
            table += textwrap.dedent(queue_extra)
            with open(path, "a") as config:
                config.write(table)

    # -- the queue ------------------------------------------------------------------------

    @property
    def queue_url(self) -> str:
        """The queue's base URL (in the first member's `monitor run`, or `queue_process`)."""
        if self.queue_port is None:
            raise RuntimeError("this fleet has no [queue] table (Fleet(queue=True))")
        return f"http://127.0.0.1:{self.queue_port}"

    def queue_request(
        self, method: str, path: str, headers: Mapping[str, str] | None = None, timeout: float = 5
    ) -> tuple[int, Any]:
        """One request to the queue: (status, parsed JSON body or the text)."""
        return http_request(method, self.queue_url + path, headers, timeout)

    def queue_state(self) -> dict[str, Any]:
        """The queue's `/queue.json` (entries in serving order, members, recent outcomes)."""
        status, body = self.queue_request("GET", "/queue.json")
        if status != 200 or not isinstance(body, dict):
            raise AssertionError(f"GET /queue.json: {status} {body!r}")
        return body

    def wait_queue_ready(self, timeout: float = 60) -> None:
        """Wait until the queue answers and sees every member fresh (before that, an enqueue
        is refused: no fresh member has a target for its profile)."""

        def ready() -> bool:
            if self.queue_process is not None and not self.queue_process.alive:
                raise AssertionError(f"the queue exited:\n{self.queue_process.log()}")
            try:
                status, body = self.queue_request("GET", "/healthz")
            except OSError:
                return False
            return status == 200 and body.get("fresh_members") == len(self.members)

        wait_until(ready, "the queue to see every member fresh", timeout, interval=0.1)

    # -- waiting ---------------------------------------------------------------------------

    def wait_idle(self, timeout: float = 90) -> None:
        """Wait until every member shows every profile's pool Idle (idle == target)."""

        def all_idle() -> bool:
            for member in self.members:
                if not member.alive:
                    raise AssertionError(f"member {member.suffix} exited:\n{member.log()}")
                counts = member.counts()
                if counts is None or any(
                    counts.get(profile, {}).get("idle") != target
                    for profile, target in self.targets.items()
                ):
                    return False
            return True

        wait_until(all_idle, "every member's pools to be Idle", timeout, interval=0.2)

    # -- runners on the stand-in -------------------------------------------------------------

    def runners(self, member: int | None = None) -> list[dict[str, Any]]:
        """The stand-in's runners (GitHub's JSON, `labels` as plain names, plus `member`: the
        index of the member whose suffix the name carries, or None), in id order; only
        `member`'s if given."""
        found = []
        for runner in sorted(self.standin.runners(), key=lambda r: r["id"]):
            suffix = runner["name"].rpartition("@")[2]
            owner = next((m.index for m in self.members if m.suffix == suffix), None)
            if member is None or owner == member:
                labels = [label["name"] for label in runner["labels"]]
                found.append({**runner, "labels": labels, "member": owner})
        return found

    def reserved_for(self, unique_id: str) -> list[dict[str, Any]]:
        """The runners carrying `reserved-for:<unique_id>`."""
        return [r for r in self.runners() if RESERVED_FOR + unique_id in r["labels"]]

    def reserved(self) -> list[dict[str, Any]]:
        """Every runner carrying some `reserved-for:` label."""
        return [r for r in self.runners() if any(x.startswith(RESERVED_FOR) for x in r["labels"])]

    def set_busy(self, runner_id: int, busy: bool = True) -> None:
        """GitHub reports the runner busy (a job runs on it), or not. A member counts a
        runner GitHub once reported busy as Busy for as long as it is online (an ephemeral
        runner never takes a second job), so `busy=False` does not make it Idle again:
        `finish_job` frees it."""
        self.standin.set_busy(runner_id, busy)

    def busy_all(self, profile: str | None = None) -> list[int]:
        """Mark every online runner that is not busy busy (of `profile`'s label if given);
        returns their ids."""
        ids = []
        for runner in self.runners():
            if runner["status"] != "online" or runner["busy"]:
                continue
            if profile is not None and f"self-hosted-image:{profile}" not in runner["labels"]:
                continue
            self.standin.set_busy(runner["id"], True)
            ids.append(runner["id"])
        return ids

    def finish_job(self, runner_id: int) -> None:
        """The runner's job ended: the ephemeral runner deregisters, as on GitHub, and its
        member replaces it with a new runner."""
        self.standin.finish_job(runner_id)

    # -- args artifacts ----------------------------------------------------------------------

    def new_run_id(self) -> str:
        """A workflow run id no other client of this fleet used."""
        return str(next(self._run_ids))

    def upload_args(
        self,
        unique_id: str,
        run_id: str,
        profile: str,
        count: int = 1,
        *,
        repo: str = REPO,
        key: str = "self_hosted_image_name",
        created_at: datetime | None = None,
    ) -> int:
        """Upload `servo-ci-runners_<unique_id>` to the run, as actions/runner-select does
        (five lines, spec §10.1; `key` may be `self_hosted_profile`); returns its id."""
        args = (
            f"unique_id={unique_id}\n{key}={profile}\nself_hosted_runner_count={count}\n"
            f"qualified_repo={repo}\nrun_id={run_id}\n"
        )
        name = f"servo-ci-runners_{unique_id}"
        return self.standin.add_artifact(repo, run_id, name, {"args": args}, created_at=created_at)

    def delete_args(self, artifact_id: int) -> None:
        """Delete an artifact (KeyError if it is gone already)."""
        self.standin.delete_artifact(artifact_id)

    # -- the client --------------------------------------------------------------------------

    def client_env(
        self, profile: str, count: int = 1, *, max_retry_time: int = 60, **extra: str
    ) -> dict[str, str]:
        """The environment for tests/scripts/runner-select.sh against this fleet's queue and
        stand-in, for a new run; `extra` adds or overrides variables (e.g. the test hooks
        TAKE_TOKEN, ARGS_ARTIFACT, ENQUEUED_FILE); with QUEUE_URL given, the fleet needs no
        queue of its own (queue processes run beside it)."""
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "QUEUE_URL": extra["QUEUE_URL"] if "QUEUE_URL" in extra else self.queue_url,
            "QUALIFIED_REPO": REPO,
            "RUN_ID": self.new_run_id(),
            "SELF_HOSTED_PROFILE": profile,
            "SELF_HOSTED_COUNT": str(count),
            "GITHUB_HOSTED_LABEL": FALLBACK_LABEL,
            "MAX_RETRY_TIME": str(max_retry_time),
            "GITHUB_API_URL": self.standin.base_url,
            "GITHUB_TOKEN": GITHUB_TOKEN,
            **extra,
        }

    def start_client(
        self, profile: str, count: int = 1, *, max_retry_time: int = 60, **extra: str
    ) -> subprocess.Popen[str]:
        """runner-select.sh in the background; `client_outputs(process)` waits for it. It
        leads a process group of its own: `os.killpg(process.pid, ...)` ends its curl too."""
        return subprocess.Popen(
            ["bash", str(CLIENT)],
            env=self.client_env(profile, count, max_retry_time=max_retry_time, **extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def run_client(
        self, profile: str, count: int = 1, *, max_retry_time: int = 60, **extra: str
    ) -> dict[str, str]:
        """runner-select.sh to its end; returns its outputs (plus `stderr`)."""
        process = self.start_client(profile, count, max_retry_time=max_retry_time, **extra)
        return client_outputs(process, timeout=max_retry_time + 60)

    # -- teardown --------------------------------------------------------------------------

    def close(self) -> dict[str, tuple[int | None, str]]:
        """Stop every member and the stand-in; returns suffix -> (exit code, log)."""
        results = {}
        processes = self.members + ([self.queue_process] if self.queue_process else [])
        for member in processes:  # all at once: they shut down side by side
            member.terminate()
        for member in processes:
            results[member.suffix] = (member.stop(), member.log())
        self.standin.stop()
        return results

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def http_request(
    method: str, url: str, headers: Mapping[str, str] | None = None, timeout: float = 5
) -> tuple[int, Any]:
    """One request: (status, parsed JSON body or the text); OSError if nobody answers."""
    request = urllib.request.Request(url, method=method, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    text = raw.decode(errors="replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def client_outputs(process: subprocess.Popen[str], timeout: float = 120) -> dict[str, str]:
    """Wait for a runner-select.sh process; its `key=value` outputs, plus `stderr`."""
    stdout, stderr = process.communicate(timeout=timeout)
    if process.returncode != 0:
        raise AssertionError(f"runner-select.sh exited {process.returncode}:\n{stderr}")
    outputs = dict(line.split("=", 1) for line in stdout.splitlines())
    outputs["stderr"] = stderr
    return outputs
