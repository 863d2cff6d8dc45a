"""`python -m monitor.standin --port 9000 [--token T] [--demo] [--no-jit-permission]`: serve
the stand-in alone until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from monitor.standin.server import GitHubStandIn


def main(argv: list[str] | None = None) -> int:
    """Serve the stand-in until Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m monitor.standin",
        description="A stand-in for the slice of GitHub's REST API the monitor uses.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--token", help="accept only this token (default: any)")
    parser.add_argument("--demo", action="store_true", help="play the runner agent and jobs")
    parser.add_argument(
        "--no-jit-permission",
        dest="jit_permission",
        action="store_false",
        help="refuse generate-jitconfig with 403, as GitHub does for a token that may list "
        "runners but not register them",
    )
    parser.add_argument("--agent-online-after", type=float, default=3.0, metavar="SECONDS")
    parser.add_argument("--job-every", type=float, default=10.0, metavar="SECONDS")
    parser.add_argument("--job-duration", type=float, default=30.0, metavar="SECONDS")
    parser.add_argument(
        "--busy-lag",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="report a runner busy only this long after its job started, as GitHub may",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    standin = GitHubStandIn(token=args.token)
    standin.busy_lag = args.busy_lag
    standin.jit_permission = args.jit_permission
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


if __name__ == "__main__":
    raise SystemExit(main())
