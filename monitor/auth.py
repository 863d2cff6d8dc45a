"""Who may use the API's credential routes, and for what.

Three kinds of credential, each with a name:
- upstream's `SERVO_CI_MONITOR_API_TOKEN` (from `.env`), named after that variable;
- more bearer tokens from `[api_tokens]` in monitor.toml, configured only as their SHA-256,
  so the config file gives away nothing;
- shared secrets of server-to-server callers that sign each request with HMAC-SHA256 instead
  of sending a token (`MONITOR_HMAC_SECRET_<NAME>` in `.env`), as ClusterRunner does.

Each credential has scopes: `reserve` (takes), `operate` (override, holds, destroy) and
`admin` (everything, revocation included). Upstream's token, and a token or secret configured
without scopes, has every one, as before scopes existed.

Any credential is revoked by its SHA-256 (`POST /revoke/<sha256>`, as rerobots does) and
restored by `DELETE /revoke/<sha256>`; the web layer keeps revocations in the store so they
outlive a restart. Pure apart from the lock: the caller passes the request's parts and the
time in. No secret, token or signature appears in a message or a `repr`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import threading
from collections.abc import Iterable
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field

from monitor.config import API_SCOPES
from monitor.errors import MonitorError

UPSTREAM_TOKEN_NAME = "SERVO_CI_MONITOR_API_TOKEN"
SIGNATURE_HEADER = "X-Monitor-Signature"
TIMESTAMP_HEADER = "X-Monitor-Timestamp"
# A signed request is accepted this many seconds either side of its timestamp, and only once.
SIGNATURE_WINDOW_SECONDS = 300

SCOPES = API_SCOPES
RESERVE, OPERATE, ADMIN = SCOPES
ALL_SCOPES = frozenset(API_SCOPES)

# The only forms accepted, so that one request has exactly one signature string: the replay
# check compares what the HMAC check verified (a trailing space or a capital hex digit would
# otherwise make a "new" signature of the same request).
_SIGNATURE = re.compile(r"sha256=[0-9a-f]{64}")
_TIMESTAMP = re.compile(r"[0-9]{1,12}")


def sha256_hex(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def signature(secret: str, timestamp: str, method: str, host: str, target: str, body: bytes) -> str:
    """The `X-Monitor-Signature` value of a request: HMAC-SHA256 over its timestamp, method,
    Host header and request target (the path and query exactly as sent on the request line),
    one per line, then the body as sent (possibly empty)."""
    message = f"{timestamp}\n{method.upper()}\n{host}\n{target}\n".encode() + body
    return "sha256=" + hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def check_timestamp(timestamp: str | None, now: float) -> int:
    """A signed request's `X-Monitor-Timestamp` as Unix seconds: 401 if missing, not 1 to 12
    ASCII digits, or more than the window away from `now`. Cheap, so the web layer checks it
    before it reads the body."""
    if timestamp is None:
        raise MonitorError(f"a signed request needs {TIMESTAMP_HEADER} (Unix seconds)", 401)
    if not _TIMESTAMP.fullmatch(timestamp):
        raise MonitorError(f"{TIMESTAMP_HEADER} must be Unix seconds (1 to 12 digits)", 401)
    sent_at = int(timestamp)
    if abs(now - sent_at) > SIGNATURE_WINDOW_SECONDS:
        raise MonitorError(
            f"{TIMESTAMP_HEADER} is more than {SIGNATURE_WINDOW_SECONDS} s from the "
            "monitor's clock",
            401,
        )
    return sent_at


@dataclass(frozen=True)
class Credential:
    name: str
    sha256: str
    kind: str  # "token" or "hmac"
    scopes: frozenset[str] = ALL_SCOPES
    secret: str | None = field(default=None, repr=False)  # an HMAC caller's shared secret

    @property
    def label(self) -> str:
        return f"{'API token' if self.kind == 'token' else 'HMAC secret'} {self.name!r}"

    def allows(self, scope: str) -> bool:
        return ADMIN in self.scopes or scope in self.scopes


class Credentials:
    """The configured credentials, minus the revoked ones."""

    def __init__(
        self,
        *,
        upstream_token: str | None,
        token_hashes: Mapping[str, str],
        hmac_secrets: Mapping[str, str],
        revoked: Iterable[str],
        token_scopes: Mapping[str, Iterable[str]] | None = None,
        hmac_scopes: Mapping[str, Iterable[str]] | None = None,
    ) -> None:
        token_scopes = token_scopes or {}
        hmac_scopes = hmac_scopes or {}
        tokens = [
            Credential(name, digest.lower(), "token", _scopes(token_scopes.get(name)))
            for name, digest in token_hashes.items()
        ]
        if upstream_token:
            tokens.insert(0, Credential(UPSTREAM_TOKEN_NAME, sha256_hex(upstream_token), "token"))
        self._tokens = tokens
        self._hmac = [
            Credential(name, sha256_hex(secret), "hmac", _scopes(hmac_scopes.get(name)), secret)
            for name, secret in hmac_secrets.items()
        ]
        self._revoked = set(revoked)
        self._seen_signatures: dict[str, float] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Credentials {', '.join(c.label for c in self.all)}>"

    @property
    def all(self) -> list[Credential]:
        return self._tokens + self._hmac

    def find(self, sha256: str) -> Credential | None:
        return next((c for c in self.all if hmac.compare_digest(c.sha256, sha256)), None)

    def is_revoked(self, credential: Credential) -> bool:
        with self._lock:
            return credential.sha256 in self._revoked

    def revoke(self, sha256: str) -> Credential:
        """Revoke the credential with this SHA-256 (idempotent); MonitorError 404 if none."""
        credential = self._known(sha256)
        with self._lock:
            self._revoked.add(credential.sha256)
        return credential

    def unrevoke(self, sha256: str) -> Credential:
        """Undo the revocation of the credential with this SHA-256 (idempotent); 404 if no
        credential has it."""
        credential = self._known(sha256)
        with self._lock:
            self._revoked.discard(credential.sha256)
        return credential

    def _known(self, sha256: str) -> Credential:
        credential = self.find(sha256.lower())
        if credential is None:
            raise MonitorError("no API token or HMAC secret has that SHA-256", 404)
        return credential

    @staticmethod
    def authorize(credential: Credential, scope: str) -> Credential:
        """`credential` if it has `scope` (or `admin`); 403 naming the scope otherwise."""
        if not credential.allows(scope):
            raise MonitorError(
                f"{credential.label} lacks the scope {scope!r} this route needs "
                f"(it has: {', '.join(sorted(credential.scopes))})",
                403,
            )
        return credential

    def check_bearer(self, authorization: str | None) -> Credential:
        """The credential an `Authorization: Bearer <token>` header carries: 401 without
        one, 403 for a wrong or revoked token."""
        if authorization is None:
            raise MonitorError(
                "Authorization: Bearer <monitor API token> (or a signed request) required", 401
            )
        scheme, _, token = authorization.partition(" ")
        digest = sha256_hex(token.strip()) if scheme.lower() == "bearer" else ""
        # Every configured hash is compared, in constant time, whatever matched.
        found = None
        for credential in self._tokens:
            if hmac.compare_digest(credential.sha256, digest):
                found = credential
        if found is None:
            raise MonitorError("wrong monitor API token", 403)
        if self.is_revoked(found):
            raise MonitorError(f"{found.label} has been revoked", 403)
        return found

    def check_signature(
        self,
        given: str,
        timestamp: str | None,
        method: str,
        host: str,
        target: str,
        body: bytes,
        now: float,
    ) -> Credential:
        """The HMAC caller that signed this request: 401 for a malformed signature, a
        missing, malformed or stale timestamp or a replayed signature, 403 for a signature no
        secret makes (or a revoked one)."""
        check_timestamp(timestamp, now)
        assert timestamp is not None
        if not _SIGNATURE.fullmatch(given):
            raise MonitorError(
                f"{SIGNATURE_HEADER} must be sha256= and 64 lowercase hex digits", 401
            )
        found = None
        for credential in self._hmac:
            assert credential.secret is not None
            expected = signature(credential.secret, timestamp, method, host, target, body)
            if hmac.compare_digest(expected.encode(), given.encode()):
                found = credential
        if found is None:
            raise MonitorError("wrong request signature", 403)
        if self.is_revoked(found):
            raise MonitorError(f"{found.label} has been revoked", 403)
        with self._lock:
            # A signature is good for one request: a captured one cannot be sent again.
            self._seen_signatures = {
                seen: at
                for seen, at in self._seen_signatures.items()
                if now - at <= 2 * SIGNATURE_WINDOW_SECONDS
            }
            if given in self._seen_signatures:
                raise MonitorError("this request signature was used before", 401)
            self._seen_signatures[given] = now
        return found


def _scopes(configured: Iterable[str] | None) -> frozenset[str]:
    """A credential's scopes: every one when none are configured (as before scopes)."""
    return ALL_SCOPES if configured is None else frozenset(configured)
