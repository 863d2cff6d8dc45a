"""API credentials: named tokens kept as SHA-256 hashes, HMAC-signed requests, their scopes
(reserve, operate, admin) on every credential route, revocation (`POST /revoke/<sha256>`)
that outlives a restart and its undoing (`DELETE`). Through WebTest with the real monitor
thread and store (and waitress where the raw request line matters); GitHub and libvirt are
the hand-written fakes of tests/fakes.py."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import logging
import time

import pytest
import webtest

from monitor import auth
from monitor import config as config_module
from monitor import models
from monitor import web
from monitor.errors import ConfigError
from monitor.errors import MonitorError
from monitor.serving import BackgroundServer
from tests.support.configs import write_config
from tests.support.constants import API_TOKEN
from tests.support.constants import JSON
from tests.support.rigs import Rig

CI_TOKEN = "ci-workflows-token-0123456789"  # scopes = ["reserve"]
OPS_TOKEN = "ops-token-abcdefghijklmnop"  # scopes = ["operate"]
ADMIN_TOKEN = "admin-token-qrstuvwxyz012345"  # scopes = ["admin"]
LEGACY_TOKEN = "legacy-token-0123456789abcdef"  # no scopes: every one, as before scopes
HMAC_SECRET = "buildbot-shared-secret-0123456789"  # MONITOR_HMAC_SCOPES_BUILDBOT=reserve
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


TOKENS_TABLE = f"""
[api_tokens]
ci-workflows = {{ sha256 = "{sha(CI_TOKEN)}", scopes = ["reserve"] }}
ops = {{ sha256 = "{sha(OPS_TOKEN).upper()}", scopes = ["operate"] }}
admin = {{ sha256 = "{sha(ADMIN_TOKEN)}", scopes = ["admin"] }}
legacy = "{sha(LEGACY_TOKEN)}"
"""
ENVIRON = {"MONITOR_HMAC_SECRET_BUILDBOT": HMAC_SECRET, "MONITOR_HMAC_SCOPES_BUILDBOT": "reserve"}
# WebTest's Host header.
HOST = "localhost:80"


@pytest.fixture
def rig(tmp_path, store):
    path = write_config(tmp_path, targets={"linux": 1}, extra=TOKENS_TABLE)
    config = config_module.load(path, environ=ENVIRON)
    rig = Rig(config)
    rig.monitor.start()
    yield rig
    rig.monitor.stop()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def signed(
    method: str,
    target: str,
    body: bytes = b"",
    *,
    secret: str = HMAC_SECRET,
    at: float | None = None,
    host: str = HOST,
) -> dict[str, str]:
    timestamp = str(int(time.time() if at is None else at))
    return {
        auth.TIMESTAMP_HEADER: timestamp,
        auth.SIGNATURE_HEADER: auth.signature(secret, timestamp, method, host, target, body),
    }


def get_override(client: webtest.TestApp, headers: dict[str, str], status: int = 200):
    # DELETE /policy/override needs `operate` and changes nothing when no override is set.
    return client.delete("/policy/override", headers=headers, status=status)


# Config ---------------------------------------------------------------------------------


def test_config_reads_token_hashes_scopes_and_hmac_secrets(rig):
    config = rig.config
    assert config.api_tokens == {
        "ci-workflows": sha(CI_TOKEN),
        "ops": sha(OPS_TOKEN),
        "admin": sha(ADMIN_TOKEN),
        "legacy": sha(LEGACY_TOKEN),
    }
    assert config.api_token_scopes == {
        "ci-workflows": ("reserve",),
        "ops": ("operate",),
        "admin": ("admin",),
    }
    assert config.hmac_secrets == {"buildbot": HMAC_SECRET}
    assert config.hmac_scopes == {"buildbot": ("reserve",)}
    assert HMAC_SECRET not in repr(config)
    # A credential without scopes may do everything: the config says so.
    (warning,) = [w for w in config.warnings if "[api_tokens] legacy" in w]
    assert "may do everything" in warning and 'scopes = ["reserve"]' in warning


def test_an_hmac_secret_without_scopes_has_every_one_with_a_warning(tmp_path):
    path = write_config(tmp_path)
    config = config_module.load(path, environ={"MONITOR_HMAC_SECRET_CI": HMAC_SECRET})
    assert config.hmac_scopes == {}
    assert any("MONITOR_HMAC_SCOPES_CI" in warning for warning in config.warnings)
    credentials = auth.Credentials(
        upstream_token=None, token_hashes={}, hmac_secrets=config.hmac_secrets, revoked=()
    )
    (credential,) = credentials.all
    assert credential.scopes == auth.ALL_SCOPES


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            '[api_tokens]\nci = "plain-token-not-a-hash"\n',
            "[api_tokens] ci: expected the token's SHA-256",
        ),
        ("[api_tokens]\nci = 5\n", "[api_tokens] ci: expected the token's SHA-256"),
        (f'[api_tokens]\n"bad name!" = "{sha("x")}"\n', "[api_tokens] 'bad name!'"),
        ('api_tokens = "x"\n', "[api_tokens]: expected a table"),
        (
            f'[api_tokens]\nci = "{EMPTY_SHA256}"\n',
            "[api_tokens] ci: that is the SHA-256 of the empty",
        ),
        (
            f'[api_tokens]\nci = {{ sha256 = "{EMPTY_SHA256.upper()}", scopes = ["admin"] }}\n',
            "[api_tokens] ci: that is the SHA-256 of the empty",
        ),
        ('[api_tokens]\nci = { scopes = ["admin"] }\n', "[api_tokens] ci.sha256: expected"),
        (
            f'[api_tokens]\nci = {{ sha256 = "{sha("x")}" }}\n',
            "[api_tokens] ci.scopes: expected a non-empty list of reserve, operate, admin",
        ),
        (
            f'[api_tokens]\nci = {{ sha256 = "{sha("x")}", scopes = ["root"] }}\n',
            "[api_tokens] ci.scopes: expected a non-empty list",
        ),
        (
            f'[api_tokens]\nci = {{ sha256 = "{sha("x")}", scopes = [] }}\n',
            "[api_tokens] ci.scopes: expected a non-empty list",
        ),
    ],
)
def test_config_errors_name_the_table_and_key(tmp_path, table, message):
    path = write_config(tmp_path, extra=table)
    with pytest.raises(ConfigError) as error:
        config_module.load(path, environ={})
    assert str(path) in str(error.value) and message in str(error.value)


def test_check_config_refuses_the_hash_of_the_empty_token(tmp_path):
    """An empty bearer token (`Authorization: Bearer `) hashes to it: it must not open the API."""
    path = write_config(tmp_path, extra=f'[api_tokens]\nci = "{EMPTY_SHA256}"\n')
    with pytest.raises(ConfigError, match="empty string"):
        config_module.load(path, environ={})


def test_a_short_hmac_secret_is_refused(tmp_path):
    path = write_config(tmp_path)
    with pytest.raises(ConfigError, match="MONITOR_HMAC_SECRET_CI is shorter than 16"):
        config_module.load(path, environ={"MONITOR_HMAC_SECRET_CI": "short"})


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        (
            {"MONITOR_HMAC_SCOPES_CI": "reserve"},
            "MONITOR_HMAC_SCOPES_CI: no MONITOR_HMAC_SECRET_CI",
        ),
        (
            {"MONITOR_HMAC_SECRET_CI": HMAC_SECRET, "MONITOR_HMAC_SCOPES_CI": "reserve,root"},
            "MONITOR_HMAC_SCOPES_CI: expected a non-empty list of reserve, operate, admin",
        ),
        (
            {"MONITOR_HMAC_SECRET_CI": HMAC_SECRET, "MONITOR_HMAC_SCOPES_CI": " , "},
            "MONITOR_HMAC_SCOPES_CI: expected a non-empty list",
        ),
    ],
)
def test_bad_hmac_scopes_are_refused(tmp_path, environ, message):
    path = write_config(tmp_path)
    with pytest.raises(ConfigError, match=message):
        config_module.load(path, environ=environ)


def test_hmac_scopes_may_be_separated_by_commas_or_spaces(tmp_path):
    path = write_config(tmp_path)
    environ = {"MONITOR_HMAC_SECRET_CI": HMAC_SECRET, "MONITOR_HMAC_SCOPES_CI": "operate, reserve"}
    assert config_module.load(path, environ=environ).hmac_scopes == {"ci": ("reserve", "operate")}


# Bearer tokens -------------------------------------------------------------------------------


@pytest.mark.parametrize("token", [API_TOKEN, OPS_TOKEN, ADMIN_TOKEN, LEGACY_TOKEN])
def test_every_token_with_the_scope_opens_the_route(rig, token):
    assert get_override(rig.client, bearer(token)).json is None


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        (bearer("not-a-token"), 403),
        (bearer(sha(OPS_TOKEN)), 403),  # the hash is not the token
        ({"Authorization": f"Basic {OPS_TOKEN}"}, 403),
        ({"Authorization": "Bearer "}, 403),
    ],
)
def test_missing_or_wrong_tokens_are_refused(rig, headers, status):
    response = get_override(rig.client, headers, status)
    assert "error" in response.json


def test_revoking_a_token_by_its_sha256_closes_it_and_survives_a_restart(rig):
    response = rig.client.post(f"/revoke/{sha(OPS_TOKEN)}", headers=bearer(ADMIN_TOKEN))
    assert response.json == {"revoked": "ops", "kind": "token"}
    refused = get_override(rig.client, bearer(OPS_TOKEN), 403)
    assert "'ops' has been revoked" in refused.json["error"]
    get_override(rig.client, bearer(LEGACY_TOKEN))  # the others still work
    # Again: idempotent.
    rig.client.post(f"/revoke/{sha(OPS_TOKEN).upper()}", headers=bearer(ADMIN_TOKEN))
    # A new app on the same store (a restart) still refuses it.
    restarted = webtest.TestApp(web.make_app(rig.config, rig.monitor))
    get_override(restarted, bearer(OPS_TOKEN), 403)
    get_override(restarted, bearer(API_TOKEN))
    assert models.revoked_credentials() == {sha(OPS_TOKEN)}
    assert any(e.kind == "revoke" and "'ops'" in e.message for e in models.recent_events())


def test_an_admin_undoes_a_revocation_and_that_survives_a_restart(rig):
    rig.client.post(f"/revoke/{sha(OPS_TOKEN)}", headers=bearer(ADMIN_TOKEN))
    get_override(rig.client, bearer(OPS_TOKEN), 403)
    # Only an admin may undo it.
    refused = rig.client.delete(f"/revoke/{sha(OPS_TOKEN)}", headers=bearer(CI_TOKEN), status=403)
    assert "lacks the scope 'admin'" in refused.json["error"]
    response = rig.client.delete(f"/revoke/{sha(OPS_TOKEN).upper()}", headers=bearer(ADMIN_TOKEN))
    assert response.json == {"unrevoked": "ops", "kind": "token"}
    get_override(rig.client, bearer(OPS_TOKEN))
    assert models.revoked_credentials() == set()
    restarted = webtest.TestApp(web.make_app(rig.config, rig.monitor))
    get_override(restarted, bearer(OPS_TOKEN))
    # Undoing what is not revoked changes nothing.
    rig.client.delete(f"/revoke/{sha(OPS_TOKEN)}", headers=bearer(ADMIN_TOKEN))
    assert any(e.kind == "unrevoke" and "'ops'" in e.message for e in models.recent_events())


def test_an_admin_may_revoke_itself_and_then_do_nothing(rig):
    rig.client.post(f"/revoke/{sha(ADMIN_TOKEN)}", headers=bearer(ADMIN_TOKEN))
    rig.client.post(f"/revoke/{sha(CI_TOKEN)}", headers=bearer(ADMIN_TOKEN), status=403)
    rig.client.delete(f"/revoke/{sha(ADMIN_TOKEN)}", headers=bearer(ADMIN_TOKEN), status=403)
    # Upstream's token has every scope: it restores the admin.
    rig.client.delete(f"/revoke/{sha(ADMIN_TOKEN)}", headers=bearer(API_TOKEN))
    rig.client.post(f"/revoke/{sha(CI_TOKEN)}", headers=bearer(ADMIN_TOKEN))


@pytest.mark.parametrize("method", ["post", "delete"])
@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        (f"/revoke/{sha('unknown')}", bearer(ADMIN_TOKEN), 404),
        ("/revoke/not-hex", bearer(ADMIN_TOKEN), 422),
        (f"/revoke/{sha(CI_TOKEN)}", {}, 401),
        (f"/revoke/{sha(CI_TOKEN)}", bearer("wrong"), 403),
        (f"/revoke/{sha(CI_TOKEN)}", bearer(OPS_TOKEN), 403),
    ],
)
def test_revoke_refusals(rig, method, path, headers, status):
    response = getattr(rig.client, method)(path, headers=headers, status=status)
    assert response.content_type == "application/json" and "error" in response.json
    assert models.revoked_credentials() == set()


# Scopes: every credential on every credential route ---------------------------------------

# One request per operation that needs a credential: once past auth it is refused for its
# parameters (422, 404) or changes nothing lasting, so any status but 401/403 means "let in".
SCOPED_REQUESTS = {
    ("post", "/profile/{profile_key}/take"): "/profile/linux/take",
    ("post", "/profile/{profile_key}/take/{count}"): "/profile/linux/take/2",
    ("post", "/runner/{runner_id}/destroy"): "/runner/x/destroy",
    ("post", "/policy/override"): "/policy/override?linux=x",
    ("delete", "/policy/override"): "/policy/override",
    ("post", "/profile/{profile_key}/drain"): "/profile/nope/drain",
    ("delete", "/profile/{profile_key}/drain"): "/profile/nope/drain",
    ("post", "/host/pause"): "/host/pause",
    ("delete", "/host/pause"): "/host/pause",
    ("post", "/host/maintenance"): "/host/maintenance",
    ("delete", "/host/maintenance"): "/host/maintenance",
    ("delete", "/reservation/{unique_id}"): "/reservation/x",
    ("post", "/revoke/{sha256}"): "/revoke/x",
    ("delete", "/revoke/{sha256}"): "/revoke/x",
}
EXPECTED_SCOPES = {
    "/profile/{profile_key}/take": "reserve",
    "/profile/{profile_key}/take/{count}": "reserve",
    "/reservation/{unique_id}": "reserve",
    "/revoke/{sha256}": "admin",
}


def documented_scopes() -> dict[tuple[str, str], str]:
    """Each operation's `x-monitor-scope` in monitor/openapi.json."""
    document = json.loads(web.OPENAPI.read_text(encoding="utf-8"))
    return {
        (method, path): operation["x-monitor-scope"]
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if isinstance(operation, dict) and "x-monitor-scope" in operation
    }


def test_the_document_gives_every_credential_route_its_scope():
    scopes = documented_scopes()
    assert set(scopes) == set(SCOPED_REQUESTS)
    for (_, path), scope in scopes.items():
        assert scope == EXPECTED_SCOPES.get(path, "operate"), path


# name -> (headers for a request, the scopes it has; None: no credential, (): a wrong one)
CALLERS = {
    "none": (lambda method, target: {}, None),
    "wrong token": (lambda method, target: bearer("wrong"), ()),
    "upstream token": (lambda method, target: bearer(API_TOKEN), auth.SCOPES),
    "unscoped token": (lambda method, target: bearer(LEGACY_TOKEN), auth.SCOPES),
    "reserve token": (lambda method, target: bearer(CI_TOKEN), ("reserve",)),
    "operate token": (lambda method, target: bearer(OPS_TOKEN), ("operate",)),
    "admin token": (lambda method, target: bearer(ADMIN_TOKEN), auth.SCOPES),
    "reserve hmac": (lambda method, target: signed(method.upper(), target), ("reserve",)),
}


@pytest.mark.parametrize("caller", sorted(CALLERS))
def test_each_credential_opens_exactly_the_routes_of_its_scopes(rig, caller):
    make_headers, scopes = CALLERS[caller]
    # Each POST before its DELETE, so the holds end as they began.
    operations = sorted(documented_scopes().items(), key=lambda item: item[0][0] == "delete")
    for (method, template), scope in operations:
        target = SCOPED_REQUESTS[(method, template)]
        response = rig.client.request(
            target, method=method.upper(), headers=make_headers(method, target), expect_errors=True
        )
        where = f"{caller}: {method.upper()} {target}"
        answer = response.json if response.content_type == JSON else None
        error = answer.get("error", "") if isinstance(answer, dict) else ""
        if scopes is None:
            assert response.status_int == 401, where
        elif not scopes:
            assert response.status_int == 403 and "wrong" in error, where
        elif scope in scopes:
            assert response.status_int not in (401, 403), (where, response.status_int, error)
        else:
            assert response.status_int == 403, where
            assert f"lacks the scope {scope!r}" in error, (where, error)
    assert rig.monitor.holds.to_json() == {
        "drained_profiles": [],
        "paused": False,
        "maintenance": False,
    }


# HMAC-signed requests ---------------------------------------------------------------------


def test_a_signed_take_is_served(rig):
    rig.converge()
    rig.all_online()
    target = rig.take_url()
    (entry,) = rig.client.post(target, headers=signed("POST", target)).json
    assert entry["id"] == 0


def test_the_signature_covers_method_host_target_and_body(rig):
    rig.converge()
    target = "/profile/linux/take?x=1"
    body = b"{}"
    headers = signed("POST", target, body)
    # Another target, method, host or body with the same signature: refused.
    rig.client.post("/profile/linux/take?x=2", params=body, headers=headers, status=403)
    rig.client.post(target, params=b"{ }", headers=headers, status=403)
    rig.client.delete(target, headers=headers, status=405)
    other_host = {**headers, "Host": "other-monitor:8000"}
    rig.client.post(target, params=body, headers=other_host, status=403)
    response = rig.client.post(target, params=body, headers=headers, status=422)
    assert "unique_id" in response.json["error"]  # let in: refused for its parameters


def test_the_signature_covers_the_target_as_sent_not_as_decoded(rig):
    """`/profile/%6Cinux/take` reaches the same route as `/profile/linux/take`, but it is not
    the request that was signed."""
    server = BackgroundServer(rig.client.app, threads=2, name="auth-test")
    try:
        host = f"127.0.0.1:{server.port}"

        def post(raw_target: str, signed_target: str) -> int:
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            try:
                headers = signed("POST", signed_target, host=host)
                connection.request("POST", raw_target, headers=headers)
                return connection.getresponse().status
            finally:
                connection.close()

        assert post("/profile/%6Cinux/take", "/profile/linux/take") == 403
        assert post("/profile/linux/take?%75nique_id=1", "/profile/linux/take?unique_id=1") == 403
        assert post("/profile/%6Cinux/take", "/profile/%6Cinux/take") == 422  # let in
    finally:
        server.close()


def test_a_signature_works_once(rig):
    target = "/profile/linux/take"
    headers = signed("POST", target)
    rig.client.post(target, headers=headers, status=422)
    replayed = rig.client.post(target, headers=headers, status=401)
    assert "used before" in replayed.json["error"]


@pytest.mark.parametrize(
    "change",
    [
        lambda value: value + " ",
        lambda value: value + "\t",
        # NO-BREAK SPACE and EM SPACE, in UTF-8 as a client sends them: str.strip() removes
        # them once bottle has decoded the header.
        lambda value: value + "\u00a0".encode().decode("latin-1"),
        lambda value: value + "\u2003".encode().decode("latin-1"),
        lambda value: " " + value,
        lambda value: value.upper().replace("SHA256=", "sha256="),
        lambda value: value.replace("sha256=", "SHA256="),
    ],
)
def test_a_signature_has_one_form_so_a_variant_does_not_replay_it(rig, change):
    target = "/profile/linux/take"
    headers = signed("POST", target)
    rig.client.post(target, headers=headers, status=422)
    variant = {**headers, auth.SIGNATURE_HEADER: change(headers[auth.SIGNATURE_HEADER])}
    response = rig.client.post(target, headers=variant, status=401)
    assert "must be sha256= and 64 lowercase hex digits" in response.json["error"]


@pytest.mark.parametrize(
    "timestamp",
    ["+{now}", " {now}", "{now} ", "{now}.0", "0000{now}", "\uff11{now}", "1e9", "", "-1"],
)
def test_a_timestamp_is_one_to_twelve_ascii_digits(rig, timestamp):
    now = str(int(time.time()))
    text = timestamp.format(now=now)
    target = "/profile/linux/take"
    headers = {
        auth.TIMESTAMP_HEADER: text,
        auth.SIGNATURE_HEADER: auth.signature(HMAC_SECRET, text, "POST", HOST, target, b""),
    }
    if text.isascii():
        response = rig.client.post(target, headers=headers, status=401)
    else:  # not Latin-1: WebTest cannot send it; the pure check still refuses it
        with pytest.raises(MonitorError) as error:
            auth.check_timestamp(text, time.time())
        assert error.value.status == 401
        return
    assert (
        "Unix seconds (1 to 12 digits)" in response.json["error"]
        or "more than" in (response.json["error"])
    )


@pytest.mark.parametrize(
    ("headers", "status", "message"),
    [
        ({auth.SIGNATURE_HEADER: "sha256=00"}, 401, "needs X-Monitor-Timestamp"),
        (signed("POST", "/profile/linux/take", at=time.time() - 3600), 401, "from the monitor's"),
        (
            signed("POST", "/profile/linux/take", secret="another-secret-0123456789"),
            403,
            "wrong request signature",
        ),
    ],
)
def test_bad_signatures_are_refused(rig, headers, status, message):
    response = rig.client.post("/profile/linux/take", headers=headers, status=status)
    assert message in response.json["error"]


def test_a_stale_timestamp_is_refused_before_the_body_is_read(rig):
    """The signature needs the body; a request that cannot be good is refused without it."""
    body = io.BytesIO(b"x" * (2 << 20))
    stale = signed("POST", "/profile/linux/take", at=time.time() - 3600)
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/profile/linux/take",
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "HTTP_HOST": HOST,
        "CONTENT_LENGTH": str(len(body.getvalue())),
        "HTTP_X_MONITOR_TIMESTAMP": stale[auth.TIMESTAMP_HEADER],
        "HTTP_X_MONITOR_SIGNATURE": stale[auth.SIGNATURE_HEADER],
        "wsgi.input": body,
        "wsgi.url_scheme": "http",
        "wsgi.errors": io.StringIO(),
    }
    statuses = []
    answer = b"".join(
        rig.client.app(environ, lambda status, headers, *exc_info: statuses.append(status))
    )
    assert statuses[0].startswith("401") and b"more than 300 s" in answer
    assert body.tell() == 0


def test_an_hmac_secret_is_revoked_by_its_sha256(rig):
    response = rig.client.post(f"/revoke/{sha(HMAC_SECRET)}", headers=bearer(ADMIN_TOKEN))
    assert response.json == {"revoked": "buildbot", "kind": "hmac"}
    refused = rig.client.post(
        "/profile/linux/take", headers=signed("POST", "/profile/linux/take"), status=403
    )
    assert "'buildbot' has been revoked" in refused.json["error"]


# Secrets ------------------------------------------------------------------------------------


def test_no_secret_in_reprs_logs_or_errors(rig, caplog):
    secrets = [API_TOKEN, CI_TOKEN, OPS_TOKEN, ADMIN_TOKEN, LEGACY_TOKEN, HMAC_SECRET]
    made = auth.Credentials(
        upstream_token=API_TOKEN,
        token_hashes=rig.config.api_tokens,
        hmac_secrets=rig.config.hmac_secrets,
        revoked=(),
    )
    shown = [repr(rig.config), repr(made), *(repr(c) for c in made.all), str(made.all)]
    caplog.set_level(logging.DEBUG)
    target = "/profile/linux/take"
    good = signed("POST", target)
    answers = [
        rig.client.post(target, headers=bearer(secret + "x"), status=403).text for secret in secrets
    ]
    answers.append(rig.client.post(target, headers=good, status=422).text)
    answers.append(rig.client.post(target, headers=good, status=401).text)  # replayed
    bad = {**good, auth.SIGNATURE_HEADER: good[auth.SIGNATURE_HEADER] + " "}
    answers.append(rig.client.post(target, headers=bad, status=401).text)
    answers.append(rig.client.post(f"/revoke/{sha(OPS_TOKEN)}", headers=bearer(ADMIN_TOKEN)).text)
    answers.append(get_override(rig.client, bearer(OPS_TOKEN), 403).text)
    answers.append(rig.client.post(target, headers=bearer(OPS_TOKEN), status=403).text)
    answers.append(
        rig.client.delete(f"/revoke/{sha(OPS_TOKEN)}", headers=bearer(CI_TOKEN), status=403).text
    )
    logged = [record.getMessage() for record in caplog.records]
    assert any("revoked" in line for line in logged)
    signature = good[auth.SIGNATURE_HEADER].removeprefix("sha256=")
    for text in [*shown, *answers, *logged]:
        for secret in [*secrets, signature]:
            assert secret not in text, (secret, text)


# The pure part -----------------------------------------------------------------------------


def test_credentials_compare_hashes_and_never_keep_plain_tokens():
    credentials = auth.Credentials(
        upstream_token=API_TOKEN,
        token_hashes={"ci": sha(CI_TOKEN)},
        hmac_secrets={},
        revoked=set(),
        token_scopes={"ci": ("reserve",)},
    )
    assert [c.name for c in credentials.all] == [auth.UPSTREAM_TOKEN_NAME, "ci"]
    assert all(c.secret is None for c in credentials.all)
    upstream, ci = credentials.all
    assert upstream.scopes == auth.ALL_SCOPES and ci.scopes == {"reserve"}
    assert credentials.check_bearer(f"bearer {CI_TOKEN}").name == "ci"
    with pytest.raises(MonitorError) as error:
        credentials.revoke(sha("nothing"))
    assert error.value.status == 404
    with pytest.raises(MonitorError) as error:
        credentials.unrevoke(sha("nothing"))
    assert error.value.status == 404
