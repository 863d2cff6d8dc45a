"""The routes a runner guest calls while it boots: its boot script, its JIT config and its
boot log. A guest is identified by the token it was given through libvirt, or by its
address when `guest_auth = "address"`. Runs on waitress' web threads; the lookups go
through the monitor's guest methods, off the monitor thread."""

from __future__ import annotations

import bottle

from monitor.errors import MonitorError
from monitor.web.context import TEXT
from monitor.web.context import WebContext
from monitor.web.context import json_response
from monitor.web.params import client_address
from monitor.web.params import guest_token
from monitor.web.params import parse_runner_id


def add_routes(app: bottle.Bottle, context: WebContext) -> None:
    config = context.config
    monitor = context.monitor
    boot_logs = context.boot_logs
    address_only = config.guest_auth == "address"

    @app.get("/github-jitconfig")
    def github_jitconfig() -> bottle.HTTPResponse:
        if address_only:
            address = client_address(config.trusted_proxies)
            return json_response(monitor.guests.jit_config_for(address))
        return json_response(monitor.guests.jit_config_for_token(guest_token()))

    @app.get("/boot")
    def boot() -> bottle.HTTPResponse:
        if address_only:
            script = monitor.guests.boot_script_for(client_address(config.trusted_proxies))
        else:
            script = monitor.guests.boot_script_for_token(guest_token())
        return bottle.HTTPResponse(script, content_type=TEXT)

    @app.post("/boot-log")
    def boot_log_upload() -> bottle.HTTPResponse:
        if address_only:
            runner_id = monitor.guests.runner_for_address(client_address(config.trusted_proxies)).id
        else:
            runner_id = monitor.guests.runner_for_unspent_token(guest_token()).id
        length = bottle.request.content_length
        if length > boot_logs.max_bytes:  # refused before reading it
            raise MonitorError(f"a boot log chunk of {length} bytes is too big", 413)
        chunk = bottle.request.body.read(boot_logs.max_bytes + 1)
        return json_response({"bytes": boot_logs.append(runner_id, chunk)})

    @app.get("/runner/<runner_id>/boot.log")
    def runner_boot_log(runner_id: str) -> bottle.HTTPResponse:
        text = boot_logs.read(parse_runner_id(runner_id))
        # A guest wrote it: never let a browser take it for HTML.
        headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
        return bottle.HTTPResponse(text, content_type=TEXT, headers=headers)
