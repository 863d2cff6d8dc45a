"""Command line and composition root: the only module that builds the real clients.

    monitor run [--config PATH]           run the daemon (default ./monitor.toml)
    monitor check-config [--config PATH] [--host] [--json]
                                          validate, print profiles and budgets; with --host
                                          check this host live too; exit 0 or 2
    monitor queue [--config PATH]         serve only the global queue ([queue]), no libvirt
    monitor demo [--port N]               libvirt's test driver + the GitHub stand-in

Nothing else reads the process environment: it is handed to `config.load` and
`logs.setup_logging` here.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

from monitor import __version__
from monitor import cli
from monitor import config as config_module
from monitor import logs
from monitor import models
from monitor import policy
from monitor import serving
from monitor import systemd
from monitor.config import Config
from monitor.errors import ConfigError
from monitor.errors import MonitorError
from monitor.hypervisor import Hypervisor

if TYPE_CHECKING:
    from monitor.auth import Credentials
    from monitor.github import GitHub
    from monitor.hypervisor.libvirt_hypervisor import LibvirtHypervisor
    from monitor.queue.service import QueueService
    from monitor.queue.service import RunningEngine

    EngineFactory = Callable[[Config], RunningEngine]

log = logging.getLogger("monitor")

EXIT_CONFIG = 2
# Clients wait on a take for its GitHub label calls (tens of ms, seconds when GitHub is slow),
# so a burst of workflows needs many threads; each is mostly idle.
HTTP_THREADS = 48
# How often the start-up notifier looks whether the first reconcile has happened.
READY_POLL_SECONDS = 0.2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="monitor",
        description="Keeps pools of ephemeral GitHub Actions runner VMs on libvirt.",
    )
    parser.add_argument("--version", action="version", version=f"monitor {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", help="run the monitor daemon")
    run.add_argument(
        "--config", type=Path, default=Path("monitor.toml"), help="default: %(default)s"
    )

    queue = commands.add_parser(
        "queue", help="serve only the global queue of [queue], without libvirt"
    )
    queue.add_argument(
        "--config", type=Path, default=Path("monitor.toml"), help="default: %(default)s"
    )

    check = commands.add_parser("check-config", help="validate a config and print what it means")
    check.add_argument(
        "--config", type=Path, default=Path("monitor.toml"), help="default: %(default)s"
    )
    check.add_argument(
        "--host",
        action="store_true",
        help="also check this host live: libvirt, storage pool, qemu-img, profiles, GitHub, "
        "memory, ports, queue members (one ok/warn/FAIL line each)",
    )
    check.add_argument("--json", action="store_true", help="print the checks as JSON")

    demo = commands.add_parser(
        "demo", help="run against libvirt's test driver and a built-in GitHub stand-in"
    )
    demo.add_argument("--port", type=int, default=8000, help="dashboard port (default 8000)")
    demo.add_argument("--host", default="127.0.0.1", help="dashboard address (default 127.0.0.1)")
    demo.add_argument("--data-dir", type=Path, help="keep demo state here (default: a temp dir)")
    cli.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    logs.setup_logging(os.environ)
    if args.command == "check-config":
        return check_config(args.config, host=args.host, as_json=args.json)
    if args.command in ("run", "queue"):
        try:
            config = load_config(args.config)
        except ConfigError as error:
            print(f"monitor: {error}", file=sys.stderr)
            return EXIT_CONFIG
        return run(config) if args.command == "run" else run_queue(config)
    if args.command == "demo":
        from monitor.demo import demo

        return demo(args.host, args.port, args.data_dir, load_config=load_config, run=run)
    if args.command in cli.COMMANDS:
        return cli.main(args)
    parser.error(f"unknown command {args.command}")
    return EXIT_CONFIG


def load_config(path: Path, environ: dict[str, str] | None = None) -> Config:
    """Load and validate a config, static resource checks included (exit 2 material)."""
    config = config_module.load(path, environ=environ)
    try:
        policy.validate_static(config.profiles, config)
    except MonitorError as error:
        raise ConfigError(f"{path}: [profiles] {error}") from error
    return config


def check_config(path: Path, *, host: bool = False, as_json: bool = False) -> int:
    """`monitor check-config`: exit 0, or 2 for a config (or, with `host`, a host) that
    cannot run runners. Text: the config's summary, then one line per check."""
    from monitor import doctor
    from monitor import preflight

    try:
        config = load_config(path)
    except ConfigError as error:
        if as_json:
            failure = preflight.Check.fail("config", str(error), "correct the key it names")
            print(preflight.render_json([failure]))
        else:
            print(f"monitor: {error}", file=sys.stderr)
        return EXIT_CONFIG
    checks = doctor.host_report(config) if host else doctor.config_checks(config)
    if as_json:
        print(preflight.render_json(checks))
        return preflight.exit_status(checks)
    print(config_module.summary(config))
    if not host:
        for warning in config_module.file_warnings(config):
            print(f"warning: {warning}")
        return 0
    print()
    print(preflight.render_text(checks))
    failures = sum(check.status is preflight.Status.FAIL for check in checks)
    warnings = sum(check.status is preflight.Status.WARN for check in checks)
    print(f"\n{failures} failure(s), {warnings} warning(s)")
    return preflight.exit_status(checks)


def tune_interpreter() -> None:
    """Hand the GIL over every 0.5 ms instead of CPython's 5 ms: a take is a chain of hand-
    overs between threads (web, monitor, reserve worker, web), each of which can otherwise
    wait out a busy thread's whole interval. Measured by bench/take_latency.py: p50 about
    0.1 x the GitHub round trip lower."""
    sys.setswitchinterval(0.0005)


def run(
    config: Config,
    *,
    github: GitHub | None = None,
    hypervisor: Hypervisor | None = None,
    on_ready: Callable[[Any], None] | None = None,
    engine_factory: EngineFactory | None = None,
) -> int:
    """Run the daemon until SIGTERM/SIGINT; returns the exit status. With a `[queue]`
    table it serves the queue too (its engine from `engine_factory`, default the real one)."""
    from monitor.github import RestGitHub
    from monitor.hypervisor.libvirt_hypervisor import LibvirtHypervisor
    from monitor.loop import Monitor
    from monitor.scheduler import make_scheduler
    from monitor.web import body_limit
    from monitor.web import credentials_for
    from monitor.web import make_app

    tune_interpreter()
    for warning in (*config.warnings, *config_module.file_warnings(config)):
        log.warning("%s", warning)
    try:
        models.open_store(config.data_path)
    except (MonitorError, OSError) as error:
        # Not transient: restarting will not help (the unit does not restart on exit 2).
        log.critical("cannot open the store in %s: %s", config.data_path, error)
        return EXIT_CONFIG
    if github is None:
        github = RestGitHub(config.github_api_url, config.github_api_scope, config.github_token)
    if hypervisor is None:
        libvirt_hypervisor = LibvirtHypervisor(
            config.libvirt_uri,
            config.libvirt_storage_pool,
            create_default_pool=not config.libvirt_storage_pool_set,
        )
        if not _storage_pool_ready(config, libvirt_hypervisor):
            libvirt_hypervisor.close()
            models.close_store()
            return EXIT_CONFIG
        hypervisor = libvirt_hypervisor
    monitor = Monitor(config, github, hypervisor)
    # One set for both apps: a revocation on the monitor closes the queue to it too.
    credentials = credentials_for(config, models.revoked_credentials())
    listen = " ".join(_listen_address(host, config.listen_port) for host in config.listen_on)
    try:
        server = serving.create_server(
            make_app(config, monitor, credentials),
            body_limit=body_limit,
            listen=listen,
            threads=HTTP_THREADS,
            ident="monitor",
        )
    except OSError as error:
        log.critical("cannot listen on %s: %s", listen, error)
        models.close_store()
        return 1
    queue = None
    if config.queue is not None:
        queue = _start_queue(config, github, credentials, engine_factory)
        if queue is None:
            server.close()
            models.close_store()
            return 1
    scheduler = make_scheduler(monitor)
    monitor.start()
    scheduler.start()
    log.info("monitor %s listening on %s", __version__, listen)
    notifier = systemd.Notifier()
    stopping = threading.Event()
    watchdog = None
    if notifier.enabled:
        threading.Thread(
            target=_notify_when_ready,
            args=(monitor, notifier, stopping),
            name="systemd-ready",
            daemon=True,
        ).start()
        timeout = systemd.watchdog_seconds()
        if timeout is not None:
            watchdog = systemd.Watchdog(notifier, timeout, monitor.ping)
            watchdog.start()

    def on_signal(signum: int, frame: Any) -> None:
        log.info("received %s; shutting down", signal.Signals(signum).name)
        raise SystemExit(0)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    if on_ready is not None:
        on_ready(server)
    try:
        server.run()  # returns on SystemExit/KeyboardInterrupt after closing its sockets
    finally:
        stopping.set()
        notifier.send("STOPPING=1", "STATUS=stopping")
        if watchdog is not None:
            watchdog.stop()
        if queue is not None:
            log.info("stopping the queue")
            queue.close()
        log.info("stopping scheduler and monitor thread")
        scheduler.shutdown(wait=False)
        monitor.stop()
        hypervisor.close()
        models.close_store()
        log.info("stopped")
    return 0


def _storage_pool_ready(config: Config, hypervisor: LibvirtHypervisor) -> bool:
    """At start: without `libvirt_storage_pool`, make the `default` pool a fresh libvirtd
    lacks; with it, refuse to start (False, logged) when libvirt has no such pool. libvirt
    out of reach is not the config's fault: the monitor starts, and checks the pool again
    before its first runner."""
    try:
        if not config.libvirt_storage_pool_set:
            hypervisor.preflight.ensure_pool()
            return True
        missing = hypervisor.preflight.missing_pool()
    except MonitorError as error:
        log.warning("cannot check the storage pool at start (checked again later): %s", error)
        return True
    if missing is not None:
        log.critical(
            "%s: libvirt_storage_pool: %s; fix: %s",
            config.path,
            missing,
            hypervisor.preflight.missing_pool_fix(),
        )
        return False
    return True


def run_queue(
    config: Config,
    *,
    github: GitHub | None = None,
    engine_factory: EngineFactory | None = None,
    on_ready: Callable[[QueueService], None] | None = None,
    stop: threading.Event | None = None,
) -> int:
    """`monitor queue`: serve only the queue until SIGTERM/SIGINT (or `stop` is set); no
    libvirt and no monitor store. GitHub is asked only to check tokenless enqueues."""
    from monitor.github import RestGitHub
    from monitor.web import credentials_for

    if config.queue is None:
        log.critical("%s: [queue]: required table is missing (it is what is served)", config.path)
        return EXIT_CONFIG
    tune_interpreter()
    for warning in config.warnings:
        log.warning("%s", warning)
    if github is None:
        github = RestGitHub(config.github_api_url, config.github_api_scope, config.github_token)
    # Revocations are made on a monitor and kept in its store; a host running only the queue
    # has neither, so its credentials are the configured ones.
    queue = _start_queue(config, github, credentials_for(config, ()), engine_factory)
    if queue is None:
        return 1
    stopping = stop or threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        log.info("received %s; shutting down", signal.Signals(signum).name)
        stopping.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    notifier = systemd.Notifier()
    notifier.send("READY=1", f"STATUS=serving the queue on {' '.join(queue.urls)}")
    if on_ready is not None:
        on_ready(queue)
    try:
        while not stopping.wait(READY_POLL_SECONDS):
            pass
    finally:
        notifier.send("STOPPING=1", "STATUS=stopping")
        queue.close()
        log.info("stopped")
    return 0


def _start_queue(
    config: Config,
    github: GitHub,
    credentials: Credentials,
    engine_factory: EngineFactory | None,
) -> QueueService | None:
    """The queue's engine and servers (monitor/queue/service.py); None, logged, if its store
    cannot be opened or a port cannot be listened on."""
    from monitor.queue import service

    assert config.queue is not None
    factory = engine_factory or service.open_engine_for
    try:
        engine = factory(config)
    except Exception as error:  # noqa: BLE001 - whatever the store's driver raises
        log.critical("cannot open the queue's store %s: %s", config.queue.store_url, error)
        return None
    try:
        return service.serve_queue(config, engine, github=github, credentials=credentials)
    except OSError as error:
        log.critical("cannot serve the queue on port %d: %s", config.queue.listen_port, error)
        return None


def _notify_when_ready(
    monitor: Any, notifier: systemd.Notifier, stopping: threading.Event
) -> None:
    """READY=1 once the first reconcile has observed GitHub and libvirt (until then systemd
    shows the unit as activating, and TimeoutStartSec= bounds the wait)."""
    while not stopping.wait(READY_POLL_SECONDS):
        observation = monitor.observation
        if observation is not None:
            runners = len(observation.runners)
            notifier.send("READY=1", f"STATUS=keeping the pool: {runners} runners")
            log.info("ready: first reconcile done (%d runners); told systemd", runners)
            return


def _listen_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
