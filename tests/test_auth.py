"""API credentials: named tokens kept as SHA-256 hashes, HMAC-signed requests, revocation
(`POST /revoke/<sha256>`) that outlives a restart. Through WebTest with the real monitor
thread and store; GitHub and libvirt are the hand-written fakes of tests/fakes.py."""

from __future__ import annotations

import hashlib
import time

import pytest
import webtest

from monitor import auth
from monitor import config as config_module
from monitor import models
from monitor import web
from monitor.errors import ConfigError
from monitor.errors import MonitorError
from tests.support.configs import write_config
from tests.support.constants import API_TOKEN
from tests.support.rigs import Rig

CI_TOKEN = "ci-workflows-token-0123456789"
OPS_TOKEN = "ops-token-abcdefghijklmnop"
HMAC_SECRET = "buildbot-shared-secret-0123456789"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


TOKENS_TABLE = f"""
[api_tokens]
ci-workflows = "{sha(CI_TOKEN)}"
ops = "{sha(OPS_TOKEN).upper()}"
"""


@pytest.fixture
def rig(tmp_path, store):
    path = write_config(tmp_path, targets={"linux": 1}, extra=TOKENS_TABLE)
    config = config_module.load(path, environ={"MONITOR_HMAC_SECRET_BUILDBOT": HMAC_SECRET})
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
) -> dict[str, str]:
    timestamp = str(int(time.time() if at is None else at))
    return {
        auth.TIMESTAMP_HEADER: timestamp,
        auth.SIGNATURE_HEADER: auth.signature(secret, timestamp, method, target, body),
    }


def get_override(client: webtest.TestApp, headers: dict[str, str], status: int = 200):
    # DELETE /policy/override needs a credential and changes nothing when none is set.
    return client.delete("/policy/override", headers=headers, status=status)


# Config ---------------------------------------------------------------------------------


def test_config_reads_token_hashes_and_hmac_secrets(rig):
    config = rig.config
    assert config.api_tokens == {"ci-workflows": sha(CI_TOKEN), "ops": sha(OPS_TOKEN)}
    assert config.hmac_secrets == {"buildbot": HMAC_SECRET}
    assert HMAC_SECRET not in repr(config)


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
    ],
)
def test_config_errors_name_the_table_and_key(tmp_path, table, message):
    path = write_config(tmp_path, extra=table)
    with pytest.raises(ConfigError) as error:
        config_module.load(path, environ={})
    assert str(path) in str(error.value) and message in str(error.value)


def test_a_short_hmac_secret_is_refused(tmp_path):
    path = write_config(tmp_path)
    with pytest.raises(ConfigError, match="MONITOR_HMAC_SECRET_CI is shorter than 16"):
        config_module.load(path, environ={"MONITOR_HMAC_SECRET_CI": "short"})


# Bearer tokens -------------------------------------------------------------------------------


@pytest.mark.parametrize("token", [API_TOKEN, CI_TOKEN, OPS_TOKEN])
def test_every_configured_token_opens_the_token_routes(rig, token):
    assert get_override(rig.client, bearer(token)).json is None


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        (bearer("not-a-token"), 403),
        (bearer(sha(CI_TOKEN)), 403),  # the hash is not the token
        ({"Authorization": f"Basic {CI_TOKEN}"}, 403),
    ],
)
def test_missing_or_wrong_tokens_are_refused(rig, headers, status):
    response = get_override(rig.client, headers, status)
    assert "error" in response.json


def test_revoking_a_token_by_its_sha256_closes_it_and_survives_a_restart(rig):
    response = rig.client.post(f"/revoke/{sha(CI_TOKEN)}", headers=bearer(OPS_TOKEN))
    assert response.json == {"revoked": "ci-workflows", "kind": "token"}
    refused = get_override(rig.client, bearer(CI_TOKEN), 403)
    assert "'ci-workflows' has been revoked" in refused.json["error"]
    get_override(rig.client, bearer(OPS_TOKEN))  # the others still work
    # Again: idempotent.
    rig.client.post(f"/revoke/{sha(CI_TOKEN).upper()}", headers=bearer(OPS_TOKEN))
    # A new app on the same store (a restart) still refuses it.
    restarted = webtest.TestApp(web.make_app(rig.config, rig.monitor))
    get_override(restarted, bearer(CI_TOKEN), 403)
    get_override(restarted, bearer(API_TOKEN))
    assert models.revoked_credentials() == {sha(CI_TOKEN)}
    assert any(e.kind == "revoke" and "ci-workflows" in e.message for e in models.recent_events())


def test_a_token_may_revoke_itself(rig):
    rig.client.post(f"/revoke/{sha(OPS_TOKEN)}", headers=bearer(OPS_TOKEN))
    rig.client.post(f"/revoke/{sha(CI_TOKEN)}", headers=bearer(OPS_TOKEN), status=403)


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        (f"/revoke/{sha('unknown')}", bearer(CI_TOKEN), 404),
        ("/revoke/not-hex", bearer(CI_TOKEN), 422),
        (f"/revoke/{sha(CI_TOKEN)}", {}, 401),
        (f"/revoke/{sha(CI_TOKEN)}", bearer("wrong"), 403),
    ],
)
def test_revoke_refusals(rig, path, headers, status):
    response = rig.client.post(path, headers=headers, status=status)
    assert response.content_type == "application/json" and "error" in response.json
    assert models.revoked_credentials() == set()


# HMAC-signed requests ---------------------------------------------------------------------


def test_a_signed_take_is_served(rig):
    rig.converge()
    rig.all_online()
    target = rig.take_url()
    (entry,) = rig.client.post(target, headers=signed("POST", target)).json
    assert entry["id"] == 0


def test_the_signature_covers_method_target_and_body(rig):
    rig.converge()
    target = "/policy/override?linux=2"
    body = b"{}"
    headers = signed("POST", target, body)
    # Another target, method or body with the same signature: refused.
    rig.client.post("/policy/override?linux=0", params=body, headers=headers, status=403)
    rig.client.post(target, params=b"{ }", headers=headers, status=403)
    rig.client.delete(target, headers=headers, status=403)
    response = rig.client.post(target, params=body, headers=headers)
    assert response.json["profile_override_counts"] == {"linux": 2}


def test_a_signature_works_once(rig):
    target = "/policy/override"
    headers = signed("DELETE", target)
    rig.client.delete(target, headers=headers)
    replayed = rig.client.delete(target, headers=headers, status=401)
    assert "used before" in replayed.json["error"]


@pytest.mark.parametrize(
    ("headers", "status", "message"),
    [
        ({auth.SIGNATURE_HEADER: "sha256=00"}, 401, "needs X-Monitor-Timestamp"),
        (signed("DELETE", "/policy/override", at=time.time() - 3600), 401, "from the monitor's"),
        (
            signed("DELETE", "/policy/override", secret="another-secret-0123456789"),
            403,
            "wrong request signature",
        ),
    ],
)
def test_bad_signatures_are_refused(rig, headers, status, message):
    response = rig.client.delete("/policy/override", headers=headers, status=status)
    assert message in response.json["error"]


def test_an_hmac_secret_is_revoked_by_its_sha256(rig):
    response = rig.client.post(f"/revoke/{sha(HMAC_SECRET)}", headers=bearer(CI_TOKEN))
    assert response.json == {"revoked": "buildbot", "kind": "hmac"}
    refused = rig.client.delete(
        "/policy/override", headers=signed("DELETE", "/policy/override"), status=403
    )
    assert "'buildbot' has been revoked" in refused.json["error"]


# The pure part -----------------------------------------------------------------------------


def test_credentials_compare_hashes_and_never_keep_plain_tokens():
    credentials = auth.Credentials(
        upstream_token=API_TOKEN,
        token_hashes={"ci": sha(CI_TOKEN)},
        hmac_secrets={},
        revoked=set(),
    )
    assert [c.name for c in credentials.all] == [auth.UPSTREAM_TOKEN_NAME, "ci"]
    assert all(c.secret is None for c in credentials.all)
    assert credentials.check_bearer(f"bearer {CI_TOKEN}").name == "ci"
    with pytest.raises(MonitorError) as error:
        credentials.revoke(sha("nothing"))
    assert error.value.status == 404
