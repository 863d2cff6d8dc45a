"""The operator's routes, all behind an API credential: destroy a runner and the holds (drain
a profile, pause the host, maintenance), with the `operate` scope; revoking a credential and
undoing that, with `admin`. Runs on waitress' web threads; changes to runners and holds are
handed to the monitor thread with `Monitor.call`."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import bottle

from monitor import auth
from monitor import models
from monitor.errors import MonitorError
from monitor.web.context import WebContext
from monitor.web.context import json_response
from monitor.web.params import parse_runner_id
from monitor.web.params import require_token

log = logging.getLogger(__name__)

_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


def add_routes(app: bottle.Bottle, context: WebContext) -> None:
    _add_destroy_routes(app, context)
    _add_hold_routes(app, context)
    _add_credential_routes(app, context)


def _add_destroy_routes(app: bottle.Bottle, context: WebContext) -> None:
    monitor = context.monitor

    @app.post("/runner/<runner_id>/destroy")
    def destroy_runner(runner_id: str) -> bottle.HTTPResponse:
        require_token(context.credentials, auth.OPERATE)
        number = parse_runner_id(runner_id)
        force = bottle.request.query.get("force", "") in ("1", "true", "yes")
        return json_response(
            monitor.call(lambda: monitor.request_destroy(number, force), context.thread_timeout())
        )


def _add_hold_routes(app: bottle.Bottle, context: WebContext) -> None:
    monitor = context.monitor

    def hold(change: Callable[[], Any]) -> bottle.HTTPResponse:
        require_token(context.credentials, auth.OPERATE)
        holds = monitor.call(change, context.thread_timeout())
        return json_response(holds.to_json())

    @app.get("/holds")
    def get_holds() -> bottle.HTTPResponse:
        return json_response(monitor.holds.to_json())

    @app.post("/profile/<profile_key>/drain")
    def drain(profile_key: str) -> bottle.HTTPResponse:
        return hold(lambda: monitor.set_drained(profile_key, True))

    @app.delete("/profile/<profile_key>/drain")
    def undrain(profile_key: str) -> bottle.HTTPResponse:
        return hold(lambda: monitor.set_drained(profile_key, False))

    @app.post("/host/pause")
    def pause() -> bottle.HTTPResponse:
        return hold(lambda: monitor.set_paused(True))

    @app.delete("/host/pause")
    def resume() -> bottle.HTTPResponse:
        return hold(lambda: monitor.set_paused(False))

    @app.post("/host/maintenance")
    def maintenance_on() -> bottle.HTTPResponse:
        return hold(lambda: monitor.set_maintenance(True))

    @app.delete("/host/maintenance")
    def maintenance_off() -> bottle.HTTPResponse:
        return hold(lambda: monitor.set_maintenance(False))


def _add_credential_routes(app: bottle.Bottle, context: WebContext) -> None:
    credentials = context.credentials

    def known(sha256: str) -> auth.Credential:
        if not _SHA256_HEX.fullmatch(sha256):
            raise MonitorError("expected the SHA-256 of a token as 64 hex digits", 422)
        credential = credentials.find(sha256.lower())
        if credential is None:
            raise MonitorError("no API token or HMAC secret has that SHA-256", 404)
        return credential

    @app.post("/revoke/<sha256>")
    def revoke(sha256: str) -> bottle.HTTPResponse:
        """Revoke an API token or HMAC secret by its SHA-256 (rerobots' POST /revoke)."""
        caller = require_token(credentials, auth.ADMIN)
        credential = known(sha256)
        models.revoke_credential(credential.sha256, credential.name, context.monitor.clock())
        credentials.revoke(credential.sha256)
        message = f"{credential.label} revoked by {caller.label}"
        log.warning("%s", message)
        models.record_event("revoke", message)
        return json_response({"revoked": credential.name, "kind": credential.kind})

    @app.delete("/revoke/<sha256>")
    def unrevoke(sha256: str) -> bottle.HTTPResponse:
        """Undo a revocation: the credential works again (idempotent)."""
        caller = require_token(credentials, auth.ADMIN)
        credential = known(sha256)
        models.unrevoke_credential(credential.sha256)
        credentials.unrevoke(credential.sha256)
        message = f"{credential.label} restored by {caller.label}"
        log.warning("%s", message)
        models.record_event("unrevoke", message)
        return json_response({"unrevoked": credential.name, "kind": credential.kind})
