"""Request parsing for the routes: query parameters, path parameters, credentials and the
client's address. Plain functions over `bottle.request` (the web thread's own request) that
raise `MonitorError` with the status a bad input deserves (422 for a malformed parameter,
401/403 for credentials)."""

from __future__ import annotations

import ipaddress
import re
import time
import urllib.parse
from typing import Any

import bottle

from monitor import auth
from monitor.errors import MonitorError
from monitor.guests import parse_address

# GitHub's own limits are 39 characters for an owner and 100 for a repository; the bounds keep
# junk out of rate-limit keys, labels and logs.
_QUALIFIED_REPO = re.compile(r"[A-Za-z0-9_.-]{1,100}/[A-Za-z0-9_.-]{1,100}")
# A UUID as `uuidgen` prints it: lower case on Linux, upper case on macOS. Kept as given (the
# args artifact's name and its unique_id line hold the caller's spelling), and nothing but hex
# digits and hyphens reaches labels and logs.
_UNIQUE_ID = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
# Run ids are 64-bit integers.
_MAX_RUN_ID_DIGITS = 20
# How much of a bad value an error message repeats.
_SHOWN = 100
# Token routes take no body; a signed request's is hashed up to this much.
MAX_SIGNED_BODY = 1 << 20


def require_token(credentials: auth.Credentials, scope: str) -> auth.Credential:
    """Upstream's auth, checked before parameters: no credential → 401, a wrong or revoked
    one → 403, one without `scope` → 403 naming it. A request may carry a bearer token or an
    HMAC signature; a signature's timestamp is checked before the body is read."""
    request = bottle.request
    signed = request.get_header(auth.SIGNATURE_HEADER)
    if signed is None:
        credential = credentials.check_bearer(request.get_header("Authorization"))
        return credentials.authorize(credential, scope)
    timestamp = request.get_header(auth.TIMESTAMP_HEADER)
    now = time.time()
    auth.check_timestamp(timestamp, now)
    credential = credentials.check_signature(
        signed,
        timestamp,
        request.method,
        request.environ.get("HTTP_HOST", ""),
        request_target(request.environ),
        request.body.read(MAX_SIGNED_BODY),
        now,
    )
    return credentials.authorize(credential, scope)


def request_target(environ: dict[str, Any]) -> str:
    """The request target as the client sent it on the request line (what a signature
    covers): waitress' REQUEST_URI, else rebuilt from the WSGI path and query."""
    raw = environ.get("REQUEST_URI")
    if raw:
        return str(raw)
    path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "/")
    query = environ.get("QUERY_STRING", "")
    quoted = urllib.parse.quote(path.encode("latin-1"), safe="/!$&'()*+,;=:@-._~")
    return quoted + (f"?{query}" if query else "")


def guest_token() -> str:
    """The token the guest was given through libvirt, sent as `Authorization: Bearer`."""
    scheme, _, token = bottle.request.get_header("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise MonitorError(
            "Authorization: Bearer <guest token> required (the guest's SMBIOS OEM string "
            "monitor-guest-token=…)",
            401,
        )
    return token.strip()


def client_address(trusted_proxies: Any) -> str:
    """The guest's address: the TCP peer, or X-Real-IP when the peer is a trusted proxy
    (upstream believed X-Real-IP from anyone, so a guest could claim another's IP)."""
    peer = bottle.request.environ.get("REMOTE_ADDR", "")
    forwarded = bottle.request.get_header("X-Real-IP")
    if forwarded and _in_networks(peer, trusted_proxies):
        try:
            return str(ipaddress.ip_address(forwarded.strip()))
        except ValueError:
            raise MonitorError(f"bad X-Real-IP header: {forwarded!r}", 422) from None
    return peer


def take_params() -> tuple[str, str, str]:
    """A take's `unique_id`, `qualified_repo` and `run_id`, each required and checked."""
    query = bottle.request.query
    unique_id = required_param(query, "unique_id")
    qualified_repo = required_param(query, "qualified_repo")
    run_id = required_param(query, "run_id")
    parse_unique_id(unique_id)
    if not _QUALIFIED_REPO.fullmatch(qualified_repo):
        raise MonitorError(
            f"qualified_repo must be <owner>/<repo>, got {qualified_repo[:_SHOWN]!r}", 422
        )
    if not run_id.isdigit() or not run_id.isascii() or len(run_id) > _MAX_RUN_ID_DIGITS:
        raise MonitorError(f"run_id must be a number, got {run_id[:_SHOWN]!r}", 422)
    return unique_id, qualified_repo, run_id


def parse_unique_id(text: str) -> str:
    """A workflow job's `unique_id` (a UUID, as given) or a 422."""
    if not _UNIQUE_ID.fullmatch(text):
        raise MonitorError(
            "unique_id must be a UUID as uuidgen prints it (8-4-4-4-12 hex digits), "
            f"got {text[:_SHOWN]!r}",
            422,
        )
    return text


def parse_count(text: str, take_max_count: int) -> int:
    if not text.isdigit() or not text.isascii():
        raise MonitorError(f"count must be a number, got {text!r}", 422)
    count = int(text)
    if not 1 <= count <= take_max_count:
        raise MonitorError(f"count must be 1 to {take_max_count}, got {count}", 422)
    return count


def parse_runner_id(text: str) -> int:
    # Bounded: SQLite integers are 64-bit (a larger one was a 500, found by schemathesis).
    if not text.isdigit() or not text.isascii() or len(text) > 18:
        raise MonitorError(f"runner id must be a number below 10^18, got {text!r}", 422)
    return int(text)


def single_param(query: bottle.FormsDict, name: str) -> str | None:
    """A query parameter given at most once (a repeated one is a 422, not the last copy)."""
    values = query.getall(name)
    if len(values) > 1:
        raise MonitorError(f"{name} may be given once, got {len(values)} values", 422)
    return values[0] if values else None


def bounded_param(query: bottle.FormsDict, name: str, default: int, low: int, high: int) -> int:
    text = single_param(query, name)
    if text is None or text == "":
        return default
    if not text.isdigit() or not text.isascii() or not low <= int(text) <= high:
        raise MonitorError(f"{name} must be a number from {low} to {high}, got {text!r}", 422)
    return int(text)


def required_param(query: bottle.FormsDict, name: str) -> str:
    value = query.get(name)
    if value is None or value == "":
        raise MonitorError(f"missing query parameter {name}", 422)
    return query.getunicode(name) or value


def etags(header: str) -> set[str]:
    """The entity tags of an If-None-Match header (weak ones compared as strong: the page
    only asks whether its copy is current)."""
    return {tag.strip().removeprefix("W/") for tag in header.split(",") if tag.strip()}


def _in_networks(address: str, networks: Any) -> bool:
    parsed = parse_address(address)
    return parsed is not None and any(parsed in network for network in networks)
