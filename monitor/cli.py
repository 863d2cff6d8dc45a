"""The operator CLI: `monitor status|runners|take|override|drain|undrain|destroy|screenshot|
events|revoke|unrevoke`, talking to a running monitor's HTTP API with the API token of its
config; and `monitor queue-status`, reading the global queue's `/queue.json` on its own port
(`[queue] listen_port`, default 8002).

Tables for people, `--json` for scripts (the API's own JSON, unchanged). Errors are one line
on stderr and exit status 1: the daemon is down, refused the token, or refused the request
(with its message). A bad command line or config is exit status 2. The token is sent only
over https or to a loopback address: on plain http anyone on the path could read it.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
import time
import tomllib
import uuid
from collections.abc import Callable
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from typing import TextIO
from urllib.parse import urlencode
from urllib.parse import urlsplit

import urllib3

from monitor import config as config_module
from monitor.errors import ConfigError
from monitor.queue.views import OUTCOMES

EXIT_FAILED = 1
EXIT_USAGE = 2
# How often `take --wait` asks again while no runner is idle, and `destroy --wait` looks.
POLL_SECONDS = 2.0
COMMANDS = (
    "status",
    "runners",
    "take",
    "override",
    "drain",
    "undrain",
    "pause",
    "resume",
    "maintenance",
    "destroy",
    "screenshot",
    "events",
    "revoke",
    "unrevoke",
    "queue-status",
)
# The queue's port when the config does not say (upstream's).
QUEUE_PORT = 8002


class CliError(Exception):
    """A failure to report in one line (exit status 1)."""


class Client:
    """The monitor's HTTP API at `base_url`, with `token` for the routes that need one.
    `name` is what the messages call the server ("monitor", or "queue")."""

    def __init__(
        self, base_url: str, token: str | None, timeout: float = 30.0, name: str = "monitor"
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.name = name
        self._http = urllib3.PoolManager(retries=False)

    def call(
        self, method: str, path: str, *, auth: bool = False, raw: bool = False, **params: Any
    ) -> Any:
        query = {k: v for k, v in params.items() if v is not None}
        url = self.base_url + path + (("?" + urlencode(query)) if query else "")
        headers = {"Accept": "application/json"}
        if auth:
            if not self.token:
                raise CliError("no API token: set SERVO_CI_MONITOR_API_TOKEN in the config's .env")
            host = _plain_http_host(self.base_url)
            if host is not None:
                raise CliError(
                    f"refusing to send the API token over plain http to {host}, which is not a "
                    "loopback address: use an https:// --url, or the monitor's loopback address"
                )
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            response = self._http.request(method, url, headers=headers, timeout=self.timeout)
        except urllib3.exceptions.HTTPError as error:
            reason = getattr(error, "reason", None) or error
            raise CliError(
                f"cannot reach the {self.name} at {self.base_url}: {_plain(reason)} "
                "(is it running? see `systemctl status monitor`)"
            ) from None
        if response.status >= 400:
            message = _error_message(response)
            if response.status in (401, 403):
                raise CliError(
                    f"the {self.name} refused the API token ({response.status}): {message}"
                )
            raise CliError(f"the {self.name} answered {response.status}: {message}")
        if raw:
            return response.data
        return json.loads(response.data) if response.data else None


def add_commands(commands: Any) -> None:
    """The operator commands, as subcommands of `monitor` (see main.build_parser)."""

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=help_text)
        parser.add_argument(
            "--config", type=Path, default=Path("monitor.toml"), help="default: %(default)s"
        )
        parser.add_argument("--url", help="the monitor's base URL (default: from the config)")
        parser.add_argument("--json", action="store_true", help="the API's JSON, for scripts")
        return parser

    command("status", "profiles, their counts and holds, and the monitor's health")
    runners = command("runners", "every runner with its status, age and reservation")
    runners.add_argument("--profile", help="only this profile's runners")
    take = command("take", "reserve an idle runner, as a workflow does")
    take.add_argument("profile")
    take.add_argument("--count", type=int, default=1)
    take.add_argument("--repo", default="operator/cli", help="qualified_repo (owner/repo)")
    take.add_argument("--run-id", default="0", help="run_id (a number)")
    take.add_argument("--unique-id", help="default: a new UUID")
    take.add_argument("--wait", type=float, metavar="SECONDS", help="ask again while none idle")
    override = command("override", "show, set or cancel the policy override")
    override.add_argument("action", choices=("show", "set", "cancel"))
    override.add_argument("counts", nargs="*", metavar="PROFILE=COUNT", help="for set")
    for name, text in (
        ("drain", "drain a profile: nothing new, busy runners finish"),
        ("undrain", "undrain a profile: its target again"),
    ):
        command(name, text).add_argument("profile")
    command("pause", "pause the host: create and rebuild nothing; runners keep serving")
    command("resume", "resume the host after a pause")
    maintenance = command("maintenance", "maintenance on (every profile drained) or off")
    maintenance.add_argument("state", choices=("on", "off"))
    destroy = command("destroy", "destroy a runner (it is replaced)")
    destroy.add_argument("id", type=int)
    destroy.add_argument("--force", action="store_true", help="even if it is Busy")
    destroy.add_argument("--wait", type=float, metavar="SECONDS", help="until it is gone")
    shot = command("screenshot", "save a fresh screenshot of a runner's screen")
    shot.add_argument("id", type=int)
    shot.add_argument("-o", "--output", type=Path, required=True, help="PNG file to write")
    events = command("events", "the newest events: what the monitor did and why")
    events.add_argument("--limit", type=int, default=20)
    events.add_argument("--runner", type=int, help="only this runner's")
    for name, text in (
        ("revoke", "revoke an API token or HMAC secret (needs the admin scope)"),
        ("unrevoke", "undo a revocation: the credential works again (needs admin)"),
    ):
        command(name, text).add_argument(
            "sha256", help='its SHA-256, as `printf %%s "$TOKEN" | sha256sum` prints it'
        )
    command("queue-status", "the global queue: who waits, in serving order, and its members")


def main(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Run one operator command; returns the exit status."""
    try:
        client = _client(args)
        return _HANDLERS[args.command](client, args, out, err)
    except ConfigError as error:
        print(f"monitor: {error}", file=err)
        return EXIT_USAGE
    except CliError as error:
        print(f"monitor {args.command}: {error}", file=err)
        return EXIT_FAILED


def _client(args: argparse.Namespace) -> Client:
    config = config_module.load(args.config)
    queue = args.command == "queue-status"
    url = args.url
    if url is None:
        # A loopback address if the monitor listens on one: the token never leaves the host.
        # The queue listens on the same addresses, on its own port.
        hosts = [{"0.0.0.0": "127.0.0.1", "::": "::1"}.get(h, h) for h in config.listen_on]
        host = next((h for h in hosts if _is_loopback(h)), next(iter(hosts), "127.0.0.1"))
        host = f"[{host}]" if ":" in host else host
        port = queue_port(config, args.config) if queue else config.listen_port
        url = f"http://{host}:{port}"
    return Client(url, config.api_token, name="queue" if queue else "monitor")


def queue_port(config: Any, path: Path) -> int:
    """The queue's port: the config's `[queue] listen_port` (read from the file itself if
    this version's Config does not carry it), else upstream's 8002."""
    port = getattr(config, "queue_listen_port", None)
    if port is None:
        try:
            with path.open("rb") as file:
                table = tomllib.load(file).get("queue")
        except (OSError, tomllib.TOMLDecodeError) as error:  # load() read it a moment ago
            raise ConfigError(f"{path}: cannot read it again: {error}") from None
        port = table.get("listen_port") if isinstance(table, dict) else None
    if port is None:
        return QUEUE_PORT
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"{path}: [queue] listen_port: expected a port (1-65535), got {port!r}")
    return port


# Commands -----------------------------------------------------------------------------------


def _status(client: Client, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    health = client.call("GET", "/healthz")
    dashboard = client.call("GET", "/dashboard.json")
    if args.json:
        return _print_json(out, {"health": health, "dashboard": dashboard})
    holds = dashboard.get("holds", {})
    drained = set(holds.get("drained_profiles", []))
    print(f"observed at  {health['observed_at'] or 'not yet'}", file=out)
    print(f"GitHub       {health['github_error'] or 'ok'}", file=out)
    print(f"libvirt      {health['libvirt_error'] or 'ok'}", file=out)
    for key, blocker in sorted(health.get("blocked_profiles", {}).items()):
        print(f"blocked      {key}: {blocker['subject']}: {blocker['detail']}", file=out)
        print(f"             fix: {blocker['fix']}", file=out)
    on_hold = [name for name in ("paused", "maintenance") if holds.get(name)]
    print(f"host         {', '.join(on_hold) or 'running'}", file=out)
    rows = [
        [
            key,
            f"{c['healthy']}/{c['target']}",
            c["idle"],
            c["reserved"],
            c["busy"],
            c["started_or_crashed"],
            "drained" if key in drained or holds.get("maintenance") else "",
        ]
        for key, c in sorted(dashboard["profile_runner_counts"].items())
    ]
    print(file=out)
    _table(out, ["PROFILE", "HEALTHY", "IDLE", "RESERVED", "BUSY", "STARTING", "HOLD"], rows)
    return 0


def _runners(client: Client, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    dashboard = client.call("GET", "/dashboard.json")
    profiles = list(dashboard["profile_runner_counts"])
    runners = [
        r
        for r in dashboard["runners"]
        if args.profile is None or _profile_of(r, profiles) == args.profile
    ]
    if args.json:
        return _print_json(out, runners)
    now = time.time()
    rows = []
    for entry in runners:
        runner = entry["runner"]
        created = runner["created_time"]["secs_since_epoch"]
        labels = [label["name"] for label in (runner.get("registration") or {}).get("labels", [])]
        reserved = next((x.split(":", 1)[1] for x in labels if x.startswith("reserved-for:")), "")
        rows.append(
            [
                entry["id"],
                _profile_of(entry, profiles),
                entry["status"],
                _age(now - created),
                runner.get("ipv4_address") or "",
                reserved,
            ]
        )
    _table(out, ["ID", "PROFILE", "STATUS", "AGE", "IPV4", "RESERVED FOR"], rows)
    return 0


def _take(client: Client, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    unique_id = args.unique_id or str(uuid.uuid4())
    path = f"/profile/{args.profile}/take" + (f"/{args.count}" if args.count != 1 else "")

    def ask() -> Any:
        return client.call(
            "POST",
            path,
            auth=True,
            unique_id=unique_id,
            qualified_repo=args.repo,
            run_id=args.run_id,
        )

    answer = _waiting(ask, args.wait, err, f"waiting for an idle {args.profile} runner")
    if args.json:
        return _print_json(out, answer)
    if not answer:
        print(f"no idle {args.profile} runner (take {unique_id} answered null)", file=out)
        return EXIT_FAILED
    for entry in answer:
        print(f"reserved runner {entry['id']} for {unique_id}", file=out)
    return 0


def _override(client: Client, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if args.action == "show":
        answer = client.call("GET", "/policy/override")
    elif args.action == "cancel":
        answer = client.call("DELETE", "/policy/override", auth=True)
    else:
        if not args.counts:
            raise CliError("override set needs PROFILE=COUNT arguments")
        counts = {}
        for item in args.counts:
            key, sep, value = item.partition("=")
            if not sep or not key or not value.isdigit():
                raise CliError(f"expected PROFILE=COUNT, got {item!r}")
            counts[key] = value
        answer = client.call("POST", "/policy/override", auth=True, **counts)
    if args.json:
        return _print_json(out, answer)
    if answer is None:
        print("no override", file=out)
        return 0
    targets = answer["profile_target_counts"]
    rows = [
        [key, count, targets.get(key, "")]
        for key, count in sorted(answer["profile_override_counts"].items())
    ]
    if args.action == "cancel":
        print("override cancelled; it was:", file=out)
    _table(out, ["PROFILE", "OVERRIDE", "TARGET"], rows)
    return 0


def _drain(client: Client, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    method = "POST" if args.command == "drain" else "DELETE"
    holds = client.call(method, f"/profile/{args.profile}/drain", auth=True)
    if args.json:
        return _print_json(out, holds)
    what = "drained" if args.command == "drain" else "undrained"
    print(
        f"{args.profile} {what}; drained now: {', '.join(holds['drained_profiles']) or 'none'}",
        file=out,
    )
    return 0


def _host(client: Client, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if args.command == "maintenance":
        path, on = "/host/maintenance", args.state == "on"
    else:
        path, on = "/host/pause", args.command == "pause"
    holds = client.call("POST" if on else "DELETE", path, auth=True)
    if args.json:
        return _print_json(out, holds)
    state = [name for name in ("paused", "maintenance") if holds[name]]
    print(f"host: {', '.join(state) or 'running'}", file=out)
    return 0


def _destroy(client: Client, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    answer = client.call(
        "POST", f"/runner/{args.id}/destroy", auth=True, force="1" if args.force else None
    )
    if args.wait is not None:

        def gone() -> Any:
            runners = client.call("GET", "/dashboard.json")["runners"]
            return all(r["id"] != args.id for r in runners) or None

        _waiting(gone, args.wait, err, f"waiting for runner {args.id} to be gone")
    if args.json:
        return _print_json(out, answer)
    done = "destroyed" if args.wait is not None else "will be destroyed at the next pass"
    print(f"runner {args.id} ({answer['status']}) {done}", file=out)
    return 0


def _screenshot(client: Client, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    png = client.call("GET", f"/runner/{args.id}/screenshot/now", raw=True)
    try:
        args.output.write_bytes(png)
    except OSError as error:
        raise CliError(f"cannot write {args.output}: {error.strerror}") from None
    if args.json:
        return _print_json(out, {"id": args.id, "file": str(args.output), "bytes": len(png)})
    print(f"saved runner {args.id}'s screen to {args.output} ({len(png)} bytes)", file=out)
    return 0


def _events(client: Client, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    events = client.call("GET", "/events", limit=args.limit, runner_id=args.runner)
    if args.json:
        return _print_json(out, events)
    rows = [
        [e["at"][:19].replace("T", " "), e["kind"], e["runner_id"] or "", e["message"]]
        for e in reversed(events)
    ]
    _table(out, ["TIME (UTC)", "KIND", "RUNNER", "WHY"], rows)
    return 0


def _revoke(client: Client, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    method = "POST" if args.command == "revoke" else "DELETE"
    answer = client.call(method, f"/revoke/{args.sha256}", auth=True)
    if args.json:
        return _print_json(out, answer)
    kind = "API token" if answer["kind"] == "token" else "HMAC secret"
    name = answer["revoked" if args.command == "revoke" else "unrevoked"]
    done = "revoked" if args.command == "revoke" else "works again"
    print(f"{kind} {name!r} {done}", file=out)
    return 0


def _queue_status(client: Client, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    queue = client.call("GET", "/queue.json")
    if args.json:
        return _print_json(out, queue)
    # The four outcomes in their order, then any other the queue counts.
    known = {name: queue["outcomes"].get(name, 0) for name in OUTCOMES}
    outcomes = ", ".join(f"{k} {n}" for k, n in {**known, **queue["outcomes"]}.items())
    print(f"taken at  {queue['taken_at']}", file=out)
    print(f"outcomes  {outcomes}", file=out)
    print(file=out)
    rows = [
        [
            e["position"],
            e["unique_id"],
            e["profile"],
            e["count"],
            f"{e['qualified_repo']} #{e['run_id']}",
            _age(e["waiting_seconds"]),
            e["state"] + (f" (priority {e['priority']})" if e["priority"] else ""),
        ]
        for e in queue["entries"]
    ]
    _table(out, ["POS", "UNIQUE ID", "PROFILE", "COUNT", "REPO", "WAITING", "STATE"], rows)
    print(file=out)
    rows = []
    for m in queue["members"]:
        data = "fresh" if m["fresh"] else f"STALE ({m['error'] or 'no answer'})"
        counts = m["counts"] or {"": None}
        for key, c in counts.items():
            numbers = ["", "", ""] if c is None else [c["idle"], c["healthy"], c["target"]]
            rows.append([m["url"], data, key, *numbers])
    _table(out, ["MEMBER", "DATA", "PROFILE", "IDLE", "HEALTHY", "TARGET"], rows)
    return 0


_HANDLERS: dict[str, Callable[[Client, argparse.Namespace, TextIO, TextIO], int]] = {
    "status": _status,
    "runners": _runners,
    "take": _take,
    "override": _override,
    "drain": _drain,
    "undrain": _drain,
    "pause": _host,
    "resume": _host,
    "maintenance": _host,
    "destroy": _destroy,
    "screenshot": _screenshot,
    "events": _events,
    "revoke": _revoke,
    "unrevoke": _revoke,
    "queue-status": _queue_status,
}


# Helpers ------------------------------------------------------------------------------------


def _plain_http_host(base_url: str) -> str | None:
    """The host of a plain-http URL that is not a loopback address (None otherwise)."""
    parts = urlsplit(base_url)
    if parts.scheme.lower() == "https":
        return None
    host = parts.hostname or ""
    return None if _is_loopback(host) else host or base_url


def _is_loopback(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _waiting(ask: Callable[[], Any], wait: float | None, err: TextIO, what: str) -> Any:
    """`ask()` until it gives something (or once without `wait`), showing progress on stderr:
    a counter that rewrites its line on a terminal, a line per try otherwise."""
    answer = ask()
    if wait is None or answer:
        return answer
    started = time.monotonic()
    tty = err.isatty()
    while not answer:
        waited = time.monotonic() - started
        if waited >= wait:
            if tty:
                print(file=err)
            raise CliError(f"gave up {what} after {wait:.0f} s")
        line = f"{what}: {waited:4.0f} s of {wait:.0f} s"
        print(("\r" + line) if tty else line, end="" if tty else "\n", file=err, flush=True)
        time.sleep(min(POLL_SECONDS, max(0.0, wait - waited)))
        answer = ask()
    if tty:
        print(file=err)
    return answer


def _table(out: TextIO, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [list(header), *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)
    if not rows:
        print("(none)", file=out)


def _print_json(out: TextIO, data: Any) -> int:
    json.dump(data, out, indent=2, sort_keys=True)
    print(file=out)
    return 0


def _profile_of(entry: dict[str, Any], profiles: Sequence[str]) -> str:
    """The profile of a runner, from its guest name `<prefix>-<profile>.<id>`."""
    name = entry["runner"].get("guest_name") or ""
    suffix = f".{entry['id']}"
    matches = [key for key in profiles if name.endswith(f"-{key}{suffix}")]
    return max(matches, key=len, default="")


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _error_message(response: urllib3.BaseHTTPResponse) -> str:
    try:
        return str(json.loads(response.data)["error"])
    except (ValueError, KeyError, TypeError):
        return response.reason or "error"


def _plain(reason: Any) -> str:
    text = str(reason)
    if "Connection refused" in text:
        return "connection refused"
    return text.split(": ", 1)[-1][:200]
