"""`monitor demo`: the daemon against libvirt's test driver (no real VMs) and the GitHub
stand-in, which plays the runner agents and the jobs, with the two-profile config and the
profiles shipped beside this module. A thread plays Servo's workflows, reserving runners
through the monitor's API as they do.

The demo runs the real daemon: `main` hands it its config loader and `run` (this package
cannot import `main`, which imports it).
"""

from __future__ import annotations

import logging
import random
import secrets
import shutil
import tempfile
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from monitor.standin import GitHubStandIn

log = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).resolve().parent


def demo(
    host: str,
    port: int,
    data_dir: Path | None,
    *,
    load_config: Callable[..., Any],
    run: Callable[[Any], int],
) -> int:
    """Run the demo until SIGTERM/SIGINT; returns `run`'s exit status. `load_config(path,
    environ=…)` loads a config file; `run(config)` runs the daemon on it. State goes to
    `data_dir`, or to a temporary directory removed afterwards."""
    temporary = data_dir is None
    root = Path(tempfile.mkdtemp(prefix="monitor-demo-")) if data_dir is None else data_dir
    root.mkdir(parents=True, exist_ok=True)
    github_token = secrets.token_hex(16)
    standin = GitHubStandIn(token=github_token)
    standin.agent_online_after = 3.0
    github_url = standin.start()
    # Jobs run on the runners the demo's workflows reserve through the monitor's API.
    standin.start_job_simulation(every=1.0, duration=15.0, reserve_idle=False)
    api_token = secrets.token_hex(16)
    stop = threading.Event()
    try:
        config_path = write_demo_config(root, github_url, host, port)
        environ = {"SERVO_CI_MONITOR_API_TOKEN": api_token, "GITHUB_TOKEN": github_token}
        # Beside the config, as on a real host: `monitor status --config <dir>/monitor.toml`
        # and `monitor check-config --host` work against the running demo.
        dotenv = root / ".env"
        dotenv.touch(mode=0o600)
        dotenv.write_text("".join(f"{key}={value}\n" for key, value in environ.items()))
        config = load_config(config_path, environ=environ)
        log.info("demo: GitHub stand-in at %s, state in %s", github_url, root)
        log.info("demo: dashboard on http://%s:%d/", host, port)
        workflows = threading.Thread(
            target=demo_workflows,
            args=(_base_url(host, port), api_token, list(config.profiles), stop),
            name="demo-workflows",
            daemon=True,
        )
        workflows.start()
        return run(config)
    finally:
        stop.set()
        standin.stop()
        if temporary:
            shutil.rmtree(root, ignore_errors=True)


def demo_workflows(
    base_url: str, api_token: str, profiles: list[str], stop: threading.Event, every: float = 7.0
) -> None:
    """A trickle of simulated workflow runs reserving runners as Servo's workflows do:
    `POST /profile/<key>/take?unique_id&qualified_repo&run_id` with the API token. Runs on
    its own thread until `stop` is set."""
    run_id = 1000
    while not stop.wait(every):
        run_id += 1
        profile = random.choice(profiles)
        query = f"unique_id={uuid.uuid4()}&qualified_repo=demo/servo&run_id={run_id}"
        request = urllib.request.Request(
            f"{base_url}/profile/{profile}/take?{query}",
            method="POST",
            headers={"Authorization": f"Bearer {api_token}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                answer = response.read().decode()
        except (OSError, urllib.error.HTTPError) as error:
            log.info("demo: workflow run %d could not take a %s runner: %s", run_id, profile, error)
            continue
        log.info("demo: workflow run %d took %s: %s", run_id, profile, answer[:60])


def write_demo_config(root: Path, github_url: str, host: str, port: int) -> Path:
    """Copy the shipped demo profiles and config into `root`, filled in for this run."""
    profiles = root / "profiles"
    if profiles.exists():
        shutil.rmtree(profiles)
    shutil.copytree(DEMO_DIR / "profiles", profiles)
    base_image = root / "demo-base.img"
    if not base_image.exists():
        with open(base_image, "wb") as image:
            image.truncate(64 * 1024 * 1024)  # sparse; the test driver never reads it
    template = (DEMO_DIR / "monitor.toml").read_text()
    text = (
        template.replace("@GITHUB_API_URL@", github_url)
        .replace("@HOST@", host)
        .replace("@PORT@", str(port))
    )
    path = root / "monitor.toml"
    path.write_text(text)
    return path


def _base_url(host: str, port: int) -> str:
    """The dashboard's URL; an IPv6 address goes in brackets."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
