"""Who may use the API's token routes: takes, the policy override, revocation.

Three kinds of credential, each with a name:
- upstream's `SERVO_CI_MONITOR_API_TOKEN` (from `.env`), named after that variable;
- more bearer tokens from `[api_tokens]` in monitor.toml, configured only as their SHA-256,
  so the config file gives away nothing;
- shared secrets of server-to-server callers that sign each request with HMAC-SHA256 instead
  of sending a token (`MONITOR_HMAC_SECRET_<NAME>` in `.env`), as ClusterRunner does.

Any of them is revoked by its SHA-256 (`POST /revoke/<sha256>`, as rerobots does); the web
layer keeps revocations in the store so they outlive a restart. Pure apart from the lock: the
caller passes the request's parts and the time in.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from dataclasses import dataclass

from monitor.errors import MonitorError

UPSTREAM_TOKEN_NAME = "SERVO_CI_MONITOR_API_TOKEN"
SIGNATURE_HEADER = "X-Monitor-Signature"
TIMESTAMP_HEADER = "X-Monitor-Timestamp"
# A signed request is accepted this many seconds either side of its timestamp, and only once.
SIGNATURE_WINDOW_SECONDS = 300


def sha256_hex(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def signature(secret: str, timestamp: str, method: str, target: str, body: bytes) -> str:
    """The `X-Monitor-Signature` value of a request: HMAC-SHA256 over its timestamp, method,
    path with query string, and body, one per line (the body as sent, possibly empty)."""
    message = f"{timestamp}\n{method.upper()}\n{target}\n".encode() + body
    return "sha256=" + hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Credential:
    name: str
    sha256: str
    kind: str  # "token" or "hmac"
    secret: str | None = None  # an HMAC caller's shared secret


class Credentials:
    """The configured credentials, minus the revoked ones."""

    def __init__(
        self,
        *,
        upstream_token: str | None,
        token_hashes: dict[str, str],
        hmac_secrets: dict[str, str],
        revoked: set[str],
    ) -> None:
        tokens = [
            Credential(name, digest.lower(), "token") for name, digest in token_hashes.items()
        ]
        if upstream_token:
            tokens.insert(0, Credential(UPSTREAM_TOKEN_NAME, sha256_hex(upstream_token), "token"))
        self._tokens = tokens
        self._hmac = [
            Credential(name, sha256_hex(secret), "hmac", secret)
            for name, secret in hmac_secrets.items()
        ]
        self._revoked = set(revoked)
        self._seen_signatures: dict[str, float] = {}
        self._lock = threading.Lock()

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
        credential = self.find(sha256.lower())
        if credential is None:
            raise MonitorError("no API token or HMAC secret has that SHA-256", 404)
        with self._lock:
            self._revoked.add(credential.sha256)
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
            raise MonitorError(f"API token {found.name!r} has been revoked", 403)
        return found

    def check_signature(
        self,
        given: str,
        timestamp: str | None,
        method: str,
        target: str,
        body: bytes,
        now: float,
    ) -> Credential:
        """The HMAC caller that signed this request: 401 for a missing or stale timestamp
        or a replayed signature, 403 for a signature no secret makes (or a revoked one)."""
        if timestamp is None:
            raise MonitorError(f"a signed request needs {TIMESTAMP_HEADER} (Unix seconds)", 401)
        try:
            sent_at = int(timestamp)
        except ValueError:
            raise MonitorError(f"{TIMESTAMP_HEADER} must be Unix seconds", 401) from None
        if abs(now - sent_at) > SIGNATURE_WINDOW_SECONDS:
            raise MonitorError(
                f"{TIMESTAMP_HEADER} is more than {SIGNATURE_WINDOW_SECONDS} s from the "
                "monitor's clock",
                401,
            )
        found = None
        for credential in self._hmac:
            assert credential.secret is not None
            expected = signature(credential.secret, timestamp, method, target, body)
            if hmac.compare_digest(expected.encode(), given.strip().encode()):
                found = credential
        if found is None:
            raise MonitorError("wrong request signature", 403)
        if self.is_revoked(found):
            raise MonitorError(f"HMAC secret {found.name!r} has been revoked", 403)
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
