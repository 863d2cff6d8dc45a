"""The GitHub stand-in, over raw HTTP, checked against GitHub's OpenAPI description."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs
from urllib.parse import quote
from urllib.parse import urlsplit

import pytest
import urllib3
from openapi_schema_validator import OAS30Validator

from monitor.standin import GitHubStandIn
from tests.support.under_pytest import standin_fixtures
from tests.support.waiting import wait_until

TOKEN = "standin-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REPO = "/repos/servo/servo"
ORG = "/orgs/servo"
SPEC = json.loads((Path(__file__).parent / "fixtures" / "github-openapi-subset.json").read_text())
PATHS = SPEC["paths"]
LINK_RE = re.compile(r'<(?P<url>[^>]+)>; rel="(?P<rel>[a-z]+)"')


def response_schema(path: str, method: str, status: str = "200") -> dict[str, Any]:
    return PATHS[path][method]["responses"][status]["content"]["application/json"]["schema"]


def validate(body: Any, path: str, method: str, status: str = "200") -> None:
    OAS30Validator(response_schema(path, method, status)).validate(body)


server, standin = standin_fixtures(TOKEN)


class Client:
    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.http = urllib3.PoolManager(retries=False, timeout=5.0)

    def __call__(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        auth: bool = True,
    ) -> urllib3.BaseHTTPResponse:
        url = path if path.startswith("http") else self.base_url + path
        sent = {**(AUTH if auth else {}), **(headers or {})}
        return self.http.request(
            method, url, json=body, headers=sent, redirect=False, retries=False
        )

    def json(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        response = self(method, path, body)
        assert response.status == status, response.data
        return response.json()


@pytest.fixture
def api(standin: GitHubStandIn) -> Client:
    return Client(standin.base_url)


def jit(api: Client, scope: str = REPO, name: str = "ci-runner-a.1@ci0", **extra: Any) -> Any:
    body = {"name": name, "runner_group_id": 1, "labels": ["self-hosted", "X64", "a"], **extra}
    return api.json("POST", f"{scope}/actions/runners/generate-jitconfig", body, status=201)


# -- runners ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scope", "spec_prefix"), [(REPO, "/repos/{owner}/{repo}"), (ORG, "/orgs/{org}")]
)
def test_runner_endpoints_match_schema(api: Client, scope: str, spec_prefix: str):
    created = jit(api, scope)
    validate(created, spec_prefix + "/actions/runners/generate-jitconfig", "post", "201")
    runner_id = created["runner"]["id"]

    listing = api.json("GET", f"{scope}/actions/runners")
    one = api.json("GET", f"{scope}/actions/runners/{runner_id}")

    validate(listing, spec_prefix + "/actions/runners", "get")
    validate(one, spec_prefix + "/actions/runners/{runner_id}", "get")
    assert listing["total_count"] == 1 and listing["runners"] == [one]
    assert one == created["runner"]


def test_jit_runner_shape(api: Client):
    runner = jit(api)["runner"]

    assert isinstance(runner["id"], int) and runner["id"] > 1000
    assert (runner["os"], runner["status"], runner["busy"]) == ("linux", "offline", False)
    assert (runner["ephemeral"], runner["runner_group_id"]) == (True, 1)
    assert [(label["name"], label["type"]) for label in runner["labels"]] == [
        ("self-hosted", "read-only"),
        ("X64", "read-only"),
        ("a", "custom"),
    ]


def test_scopes_are_separate(standin: GitHubStandIn, api: Client):
    runner_id = jit(api, REPO)["runner"]["id"]
    jit(api, ORG)  # the same name is fine in another scope

    assert api.json("GET", f"{ORG}/actions/runners")["total_count"] == 1
    assert api("GET", f"{ORG}/actions/runners/{runner_id}").status == 404
    assert api("DELETE", f"/repos/servo/other/actions/runners/{runner_id}").status == 404
    assert {r["scope"] for r in standin.runners()} == {REPO, ORG}


def test_jitconfig_duplicate_name_conflicts(standin: GitHubStandIn, api: Client):
    jit(api)
    response = api("POST", f"{REPO}/actions/runners/generate-jitconfig", jit_body())

    assert response.status == 409
    assert "already exists" in response.json()["message"]
    assert standin.jit_names == ["ci-runner-a.1@ci0"]


def jit_body(**changes: Any) -> dict[str, Any]:
    body = {"name": "ci-runner-a.1@ci0", "runner_group_id": 1, "labels": ["self-hosted"]}
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


@pytest.mark.parametrize(
    "body",
    [
        jit_body(name=None),
        jit_body(runner_group_id=None),
        jit_body(labels=None),
        jit_body(labels=[]),
        jit_body(labels="self-hosted"),
        jit_body(runner_group_id="1"),
    ],
)
def test_jitconfig_invalid_body_is_422(standin: GitHubStandIn, api: Client, body: dict):
    response = api("POST", f"{REPO}/actions/runners/generate-jitconfig", body)

    assert response.status == 422
    validate(
        response.json(), "/repos/{owner}/{repo}/actions/runners/generate-jitconfig", "post", "422"
    )
    assert standin.runners() == []


def test_delete_runner(standin: GitHubStandIn, api: Client):
    runner_id = jit(api)["runner"]["id"]

    first = api("DELETE", f"{REPO}/actions/runners/{runner_id}")
    second = api("DELETE", f"{REPO}/actions/runners/{runner_id}")

    assert (first.status, first.data) == (204, b"")
    assert second.status == 404
    assert second.json()["message"] == "Not Found" and "documentation_url" in second.json()
    assert standin.runners() == []


def test_delete_busy_runner_is_422(standin: GitHubStandIn, api: Client):
    runner_id = jit(api)["runner"]["id"]
    standin.set_busy(runner_id, True)

    response = api("DELETE", f"{REPO}/actions/runners/{runner_id}")

    assert response.status == 422
    validate(response.json(), "/repos/{owner}/{repo}/actions/runners/{runner_id}", "delete", "422")


# -- labels ----------------------------------------------------------------------------------


def test_label_endpoints(api: Client):
    runner_id = jit(api)["runner"]["id"]
    path = f"{REPO}/actions/runners/{runner_id}/labels"
    spec = "/repos/{owner}/{repo}/actions/runners/{runner_id}/labels"

    def names(body: Any) -> list[str]:
        assert body["total_count"] == len(body["labels"])
        return [label["name"] for label in body["labels"]]

    listed = api.json("GET", path)
    validate(listed, spec, "get")
    assert names(listed) == ["self-hosted", "X64", "a"]

    added = api.json("POST", path, {"labels": ["reserved-for:u", "a", "reserved-by:o/r/x/1"]})
    validate(added, spec, "post")
    assert names(added) == ["self-hosted", "X64", "a", "reserved-for:u", "reserved-by:o/r/x/1"]

    # Label names may hold slashes; they travel percent-encoded.
    removed = api.json("DELETE", f"{path}/{quote('reserved-by:o/r/x/1', safe='')}")
    validate(removed, spec + "/{name}", "delete")
    assert names(removed) == ["self-hosted", "X64", "a", "reserved-for:u"]
    assert api("DELETE", f"{path}/nope").status == 404
    assert api("DELETE", f"{path}/self-hosted").status == 422

    replaced = api.json("PUT", path, {"labels": ["b", "c"]})
    validate(replaced, spec, "put")
    assert names(replaced) == ["self-hosted", "X64", "b", "c"]

    cleared = api.json("DELETE", path)
    validate(cleared, spec, "delete")
    assert names(cleared) == ["self-hosted", "X64"]
    assert all(label["type"] == "read-only" for label in cleared["labels"])

    assert api("POST", path, {"labels": []}).status == 422
    assert api("POST", path, {"nope": 1}).status == 422
    assert api("GET", f"{REPO}/actions/runners/1/labels").status == 404


# -- pagination and conditional requests -----------------------------------------------------


def test_runner_pagination_and_link_header(standin: GitHubStandIn, api: Client):
    ids = [standin.add_runner(REPO, f"ci-runner-x.{n}@ci0") for n in range(250)]

    default = api("GET", f"{REPO}/actions/runners")
    first = api("GET", f"{REPO}/actions/runners?per_page=100")
    middle = api("GET", f"{REPO}/actions/runners?per_page=100&page=2")
    last = api("GET", f"{REPO}/actions/runners?per_page=100&page=3")
    capped = api("GET", f"{REPO}/actions/runners?per_page=1000")

    assert len(default.json()["runners"]) == 30
    assert len(capped.json()["runners"]) == 100
    pages = [first.json(), middle.json(), last.json()]
    assert [p["total_count"] for p in pages] == [250, 250, 250]
    assert [r["id"] for p in pages for r in p["runners"]] == ids

    def links(response: urllib3.BaseHTTPResponse) -> dict[str, tuple[str, dict[str, list[str]]]]:
        found = {}
        for match in LINK_RE.finditer(response.headers["Link"]):
            parts = urlsplit(match["url"])
            assert f"{parts.scheme}://{parts.netloc}" == standin.base_url  # absolute
            found[match["rel"]] = (parts.path, parse_qs(parts.query))
        return found

    path = f"{REPO}/actions/runners"
    assert links(first) == {
        "next": (path, {"per_page": ["100"], "page": ["2"]}),
        "last": (path, {"per_page": ["100"], "page": ["3"]}),
    }
    assert set(links(middle)) == {"prev", "next", "last", "first"}
    assert links(last) == {
        "prev": (path, {"per_page": ["100"], "page": ["2"]}),
        "first": (path, {"per_page": ["100"], "page": ["1"]}),
    }
    assert re.fullmatch(
        r'(<http://[^>]+>; rel="[a-z]+")(, <http://[^>]+>; rel="[a-z]+")*', first.headers["Link"]
    )


def test_no_link_header_on_single_page(api: Client):
    jit(api)
    assert "Link" not in api("GET", f"{REPO}/actions/runners").headers


def test_etag_304_does_not_count(standin: GitHubStandIn, api: Client):
    runner_id = jit(api)["runner"]["id"]
    first = api("GET", f"{REPO}/actions/runners")
    etag = first.headers["ETag"]

    again = api("GET", f"{REPO}/actions/runners", headers={"If-None-Match": etag})

    assert again.status == 304 and again.data == b""
    assert again.headers["ETag"] == etag
    assert again.headers["x-ratelimit-remaining"] == first.headers["x-ratelimit-remaining"]
    standin.set_status(runner_id, "online")
    changed = api("GET", f"{REPO}/actions/runners", headers={"If-None-Match": etag})
    assert changed.status == 200 and changed.headers["ETag"] != etag
    assert (
        int(changed.headers["x-ratelimit-remaining"])
        == int(first.headers["x-ratelimit-remaining"]) - 1
    )


# -- artifacts -------------------------------------------------------------------------------


def test_artifact_list_matches_schema_and_paginates(standin: GitHubStandIn, api: Client):
    for n in range(150):
        standin.add_artifact("servo/servo", 77, f"artifact-{n}", {"f.txt": "x"})
    standin.add_artifact("servo/other", 77, "elsewhere", {"f.txt": "x"})
    path = f"{REPO}/actions/runs/77/artifacts"

    first = api("GET", f"{path}?per_page=100")
    second = api("GET", f"{path}?per_page=100&page=2")

    spec = "/repos/{owner}/{repo}/actions/runs/{run_id}/artifacts"
    for page in (first, second):
        validate(page.json(), spec, "get")
    names = [a["name"] for p in (first, second) for a in p.json()["artifacts"]]
    assert sorted(names) == sorted(f"artifact-{n}" for n in range(150))
    assert 'rel="next"' in first.headers["Link"] and 'rel="next"' not in second.headers["Link"]
    assert first.json()["total_count"] == 150
    named = api.json("GET", f"{path}?name=artifact-3")
    assert [a["name"] for a in named["artifacts"]] == ["artifact-3"]


def test_workflow_run_matches_schema_and_follows_what_a_test_sets(
    standin: GitHubStandIn, api: Client
):
    spec = "/repos/{owner}/{repo}/actions/runs/{run_id}"
    running = api.json("GET", f"{REPO}/actions/runs/17000000001")
    validate(running, spec, "get")
    assert (running["id"], running["status"], running["conclusion"]) == (
        17000000001,
        "in_progress",
        None,
    )
    standin.set_run_status("Servo/Servo", 17000000001, "completed", "cancelled")
    done = api.json("GET", f"{REPO}/actions/runs/17000000001")
    validate(done, spec, "get")
    assert (done["status"], done["conclusion"]) == ("completed", "cancelled")
    assert api.json("GET", f"{REPO}/actions/runs/17000000002")["status"] == "in_progress"
    # Over the control API too.
    control = api("POST", "/_standin/runs/servo/servo/5", body={"status": "queued"})
    assert control.status in (200, 204)
    assert api.json("GET", f"{REPO}/actions/runs/5")["status"] == "queued"


def test_artifact_download_redirects_to_blob_host(standin: GitHubStandIn, api: Client):
    artifact_id = standin.add_artifact("servo/servo", "5", "args", {"first": "a=1\n", "b": b"\0"})
    (listed,) = api.json("GET", f"{REPO}/actions/runs/5/artifacts")["artifacts"]

    redirect = api("GET", listed["archive_download_url"])

    assert redirect.status == 302
    location = urlsplit(redirect.headers["Location"])
    assert location.hostname != urlsplit(standin.base_url).hostname  # another host name
    assert location.port == urlsplit(standin.base_url).port
    leaked = api("GET", redirect.headers["Location"])
    assert leaked.status == 400  # blob storage rejects GitHub credentials
    blob = api("GET", redirect.headers["Location"], auth=False)
    assert blob.status == 200 and blob.headers["Content-Type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(blob.data)) as archive:
        assert archive.namelist() == ["first", "b"]
        assert archive.read("first") == b"a=1\n"
    assert listed["size_in_bytes"] == len(blob.data)
    assert api("GET", f"{REPO}/actions/artifacts/{artifact_id}/tar").status == 404
    assert api("GET", f"/repos/servo/other/actions/artifacts/{artifact_id}/zip").status == 404
    forged = redirect.headers["Location"].split("?")[0] + "?sig=forged"
    assert api("GET", forged, auth=False).status == 403


def test_artifact_deleted_over_rest_and_control(standin: GitHubStandIn, api: Client):
    """`DELETE /repos/<repo>/actions/artifacts/<id>` (what `gh api -X DELETE` sends when a
    workflow deletes its args artifact) and `/_standin/artifacts` (the upload and the list
    a test uses instead of actions/upload-artifact)."""
    body = {"qualified_repo": "servo/servo", "run_id": 9, "name": "servo-ci-runners_x"}
    uploaded = api("POST", "/_standin/artifacts", {**body, "files": {"args": "a=1\n"}}, auth=False)
    assert uploaded.status == 200
    artifact_id = uploaded.json()["id"]
    other = standin.add_artifact("servo/servo", 9, "kept", {"f": "x"})
    (listed, _) = api.json("GET", "/_standin/artifacts")
    assert {k: listed[k] for k in ("id", "qualified_repo", "run_id", "name")} == {
        "id": artifact_id,
        **body,
    }
    assert listed["created_at"].endswith("Z") and listed["expired"] is False

    assert api("DELETE", f"/repos/servo/other/actions/artifacts/{artifact_id}").status == 404
    assert api("DELETE", f"{REPO}/actions/artifacts/{artifact_id}", auth=False).status == 401
    deleted = api("DELETE", f"{REPO}/actions/artifacts/{artifact_id}")
    assert (deleted.status, deleted.data) == (204, b"")
    assert api("DELETE", f"{REPO}/actions/artifacts/{artifact_id}").status == 404
    names = [a["name"] for a in api.json("GET", f"{REPO}/actions/runs/9/artifacts")["artifacts"]]
    assert names == ["kept"]

    assert api("DELETE", f"/_standin/artifacts/{other}", auth=False).status == 200
    assert api("DELETE", f"/_standin/artifacts/{other}", auth=False).status == 404
    assert standin.artifacts() == []


def test_expired_artifact_is_410(standin: GitHubStandIn, api: Client):
    artifact_id = standin.add_artifact("servo/servo", "5", "old", {"f": "x"}, expired=True)

    response = api("GET", f"{REPO}/actions/artifacts/{artifact_id}/zip")

    assert response.status == 410
    spec = "/repos/{owner}/{repo}/actions/artifacts/{artifact_id}/{archive_format}"
    validate(response.json(), spec, "get", "410")


# -- rate limit, auth, faults ----------------------------------------------------------------


def test_rate_limit_headers_and_endpoint(api: Client):
    first = api("GET", f"{REPO}/actions/runners")
    second = api("GET", f"{REPO}/actions/runners/1")
    overview = api("GET", "/rate_limit")

    for name in ("limit", "remaining", "used", "reset", "resource"):
        assert f"x-ratelimit-{name}" in second.headers
    assert first.headers["x-ratelimit-limit"] == "5000"
    assert int(first.headers["x-ratelimit-remaining"]) == 4999
    assert int(second.headers["x-ratelimit-remaining"]) == 4998  # 404s count too
    assert second.headers["x-ratelimit-used"] == "2"
    assert int(second.headers["x-ratelimit-reset"]) > time.time()
    validate(overview.json(), "/rate_limit", "get")
    # GET /rate_limit itself does not count.
    assert overview.json()["resources"]["core"]["remaining"] == 4998
    assert overview.headers["x-ratelimit-remaining"] == "4998"


def test_rate_limit_exhaustion_is_403():
    with GitHubStandIn(rate_limit=2) as standin:
        api = Client(standin.base_url)
        statuses = [api("GET", f"{REPO}/actions/runners").status for _ in range(3)]
        refused = api("GET", f"{REPO}/actions/runners")
    assert statuses == [200, 200, 403]
    assert refused.headers["x-ratelimit-remaining"] == "0"
    assert "rate limit exceeded" in refused.json()["message"]


@pytest.mark.parametrize(
    ("headers", "status", "message"),
    [
        ({}, 401, "Requires authentication"),
        ({"Authorization": "Bearer wrong"}, 401, "Bad credentials"),
        ({"Authorization": f"Basic {TOKEN}"}, 401, "Bad credentials"),
        ({"Authorization": f"token {TOKEN}"}, 200, None),
        ({"Authorization": f"Bearer {TOKEN}"}, 200, None),
    ],
)
def test_authentication(api: Client, headers: dict[str, str], status: int, message: str | None):
    response = api("GET", f"{REPO}/actions/runners", headers=headers, auth=False)

    assert response.status == status
    if message:
        assert response.json()["message"] == message
        assert response.json()["documentation_url"].startswith("https://docs.github.com/")


@pytest.mark.parametrize("scope", [REPO, ORG])
def test_without_jit_permission_a_token_lists_but_cannot_register(
    standin: GitHubStandIn, api: Client, scope: str
):
    standin.jit_permission = False
    body = {"name": "ci-runner-a.1@ci0", "runner_group_id": 1, "labels": ["self-hosted"]}

    refused = api("POST", f"{scope}/actions/runners/generate-jitconfig", body)

    assert refused.status == 403
    # GitHub's words for a fine-grained token without write access, in its error shape; not
    # a rate limit (a client must not wait and try again).
    assert refused.json()["message"] == "Resource not accessible by personal access token"
    OAS30Validator(SPEC["components"]["schemas"]["basic-error"]).validate(refused.json())
    assert refused.headers["x-ratelimit-remaining"] != "0" and "Retry-After" not in refused.headers
    assert api.json("GET", f"{scope}/actions/runners")["runners"] == []
    assert standin.jit_names == []


def test_without_configured_token_any_credentials_work():
    with GitHubStandIn() as standin:
        api = Client(standin.base_url)
        assert api("GET", "/rate_limit", headers={"Authorization": "Bearer x"}).status == 200
        assert api("GET", "/rate_limit", auth=False).status == 401


def test_faults_match_and_expire(standin: GitHubStandIn, api: Client):
    standin.inject_fault(503, count=2, method="GET", path_contains="/runners", retry_after=2.5)

    post = api("POST", f"{REPO}/actions/runners/generate-jitconfig", jit_body())
    other = api("GET", "/rate_limit")
    failed = [api("GET", f"{REPO}/actions/runners") for _ in range(2)]
    recovered = api("GET", f"{REPO}/actions/runners")

    assert (post.status, other.status, recovered.status) == (201, 200, 200)
    assert [f.status for f in failed] == [503, 503]
    assert failed[0].headers["Retry-After"] == "3"
    assert set(failed[0].json()) >= {"message", "documentation_url"}
    assert [r.status for r in standin.requests] == [201, 200, 503, 503, 200]


def test_403_fault_reports_exhausted_rate_limit(standin: GitHubStandIn, api: Client):
    standin.inject_fault(403)
    response = api("GET", f"{REPO}/actions/runners")
    assert response.status == 403 and response.headers["x-ratelimit-remaining"] == "0"


def test_fault_delay_and_clear(standin: GitHubStandIn, api: Client):
    standin.inject_fault(None, delay=0.3)
    standin.inject_fault(500, count=5, path_contains="labels")

    started = time.monotonic()
    slow = api("GET", f"{REPO}/actions/runners")
    elapsed = time.monotonic() - started
    standin.clear_faults()

    assert slow.status == 200 and elapsed >= 0.3
    assert api("GET", f"{REPO}/actions/runners/1/labels").status == 404


def test_fault_with_a_malformed_body(standin: GitHubStandIn, api: Client):
    standin.inject_fault(None, method="GET", body='{"total_count": 1, "runners": [')
    standin.inject_fault(502, body="<html>Bad gateway</html>")

    truncated = api("GET", f"{REPO}/actions/runners")
    html = api("GET", f"{REPO}/actions/runners")

    assert (truncated.status, truncated.data) == (200, b'{"total_count": 1, "runners": [')
    assert truncated.headers["Content-Type"].startswith("application/json")
    assert (html.status, html.data) == (502, b"<html>Bad gateway</html>")
    assert api("GET", f"{REPO}/actions/runners").status == 200


def test_exhausted_rate_limit_refuses_until_its_reset(standin: GitHubStandIn, api: Client):
    reset = standin.exhaust_rate_limit(reset_in=1.0)

    refused = api("GET", f"{REPO}/actions/runners")
    started = time.monotonic()
    wait_until(lambda: api("GET", f"{REPO}/actions/runners").status == 200, "the reset", 5, 0.02)
    waited = time.monotonic() - started

    assert refused.status == 403 and refused.headers["x-ratelimit-remaining"] == "0"
    assert "Retry-After" not in refused.headers  # only the reset tells when
    assert refused.headers["x-ratelimit-reset"] == str(reset)
    assert 0 < waited <= 2.5
    assert int(api("GET", "/rate_limit").headers["x-ratelimit-remaining"]) > 0


def test_timed_requests_say_when_each_arrived(standin: GitHubStandIn, api: Client):
    standin.inject_fault(503, delay=0.3)
    before = time.monotonic()
    api("GET", f"{REPO}/actions/runners")
    api("GET", "/rate_limit")
    after = time.monotonic()

    (first, slow), (second, fast) = standin.timed_requests
    assert (slow.status, fast.status) == (503, 200)
    assert before <= first < before + 0.2  # when it came, not when the delay ended
    assert first + 0.3 <= second <= after


# -- control API -----------------------------------------------------------------------------


def test_control_methods(standin: GitHubStandIn, api: Client):
    runner_id = jit(api)["runner"]["id"]

    standin.set_status(runner_id, "online")
    standin.set_busy(runner_id, True)
    (runner,) = standin.runners()
    assert (runner["status"], runner["busy"], runner["scope"]) == ("online", True, REPO)
    with pytest.raises(ValueError):
        standin.set_status(runner_id, "idle")
    with pytest.raises(KeyError):
        standin.set_busy(1, True)

    standin.finish_job(runner_id)
    assert standin.runners() == []
    assert api.json("GET", f"{REPO}/actions/runners")["total_count"] == 0

    standin.reset()
    assert (standin.requests, standin.jit_names, standin.request_bodies) == ([], [], [])


def test_control_over_http(standin: GitHubStandIn, api: Client):
    def control(method: str, path: str, body: Any = None, status: int = 200) -> Any:
        response = api(method, "/_standin" + path, body, auth=False)
        assert response.status == status, response.data
        return response.json()

    runner_id = jit(api)["runner"]["id"]
    control("POST", f"/runners/{runner_id}/status", {"status": "online"})
    control("POST", f"/runners/{runner_id}/busy", {"busy": True})
    assert [(r["status"], r["busy"]) for r in control("GET", "/runners")] == [("online", True)]
    control("POST", f"/runners/{runner_id}/status", {"status": "bogus"}, status=400)
    control("POST", "/runners/1/busy", {"busy": True}, status=404)
    control("POST", f"/runners/{runner_id}/finish-job")
    assert control("GET", "/runners") == []
    added = control("POST", "/runners", {"scope": ORG, "name": "x.1@ci0", "status": "online"})
    assert standin.runners()[0]["id"] == added["id"]

    artifact = control(
        "POST",
        "/artifacts",
        {"qualified_repo": "servo/servo", "run_id": "9", "name": "n", "files": {"a": "b"}},
    )
    listed = api.json("GET", f"{REPO}/actions/runs/9/artifacts")["artifacts"]
    assert [a["id"] for a in listed] == [artifact["id"]]

    control("POST", "/faults", {"status": 502, "path_contains": "/runs/"})
    assert api("GET", f"{REPO}/actions/runs/9/artifacts").status == 502
    control("POST", "/faults", {"body": "{", "path_contains": "/runs/"})
    assert api("GET", f"{REPO}/actions/runs/9/artifacts").data == b"{"
    control("POST", "/faults", {"status": 502})
    control("DELETE", "/faults")
    assert api("GET", "/rate_limit").status == 200
    assert control("GET", "/requests")[-1] == {
        "method": "GET",
        "path": "/rate_limit",
        "status": 200,
    }
    assert control("GET", "/jit-names") == ["ci-runner-a.1@ci0"]
    control("POST", "/rate-limit", {"reset_in": 60})
    assert api("GET", f"{REPO}/actions/runs/9/artifacts").status == 403

    control("POST", "/agent", {"online_after": 0.1, "job_seconds": 2, "hold_jobs": True})
    assert standin.agent_online_after == 0.1
    assert (standin.agent_job_seconds, standin.hold_jobs) == (2.0, True)
    control("POST", "/agent", {"job_seconds": 5, "hold_jobs": False})  # settings outlive reset
    control("POST", "/job-simulation", {"every": 0.05, "duration": 0.1})
    control("DELETE", "/job-simulation")
    control("POST", "/reset")
    assert standin.runners() == [] and standin.requests == []


# -- demo behaviour --------------------------------------------------------------------------


def test_agent_goes_online_after_delay(standin: GitHubStandIn, api: Client):
    standin.agent_online_after = 0.5
    started = time.monotonic()
    runner_id = jit(api)["runner"]["id"]

    def status() -> str:
        return api.json("GET", f"{REPO}/actions/runners/{runner_id}")["status"]

    assert status() == "offline"
    wait_until(lambda: status() == "online", "online", 5, 0.02)
    assert time.monotonic() - started >= 0.5
    assert api.json("GET", f"{REPO}/actions/runners/{runner_id}")["version"]


def test_job_simulation_reserves_runs_and_deregisters(standin: GitHubStandIn, api: Client):
    idle = jit(api)["runner"]["id"]
    offline = jit(api, name="ci-runner-a.2@ci0")["runner"]["id"]
    standin.set_status(idle, "online")

    standin.start_job_simulation(every=0.05, duration=1.0)

    def runner(runner_id: int) -> dict[str, Any] | None:
        return next((r for r in standin.runners() if r["id"] == runner_id), None)

    wait_until(lambda: (runner(idle) or {}).get("busy", False), "busy", 5, 0.02)
    labels = [label["name"] for label in runner(idle)["labels"]]  # type: ignore[index]
    reserved = {name.partition(":")[0]: name.partition(":")[2] for name in labels if ":" in name}
    assert re.fullmatch(r"[0-9a-f-]{36}", reserved["reserved-for"])
    assert 0 <= time.time() - int(reserved["reserved-since"]) < 5
    assert re.fullmatch(r"servo/servo/actions/runs/\d+", reserved["reserved-by"])
    # The job ends: the ephemeral runner deregisters; the offline one was never picked.
    wait_until(lambda: runner(idle) is None, "the runner to go", 5, 0.02)
    assert runner(offline) is not None and not runner(offline)["busy"]  # type: ignore[index]
    standin.stop_job_simulation()


def test_job_simulation_can_serve_only_runners_the_monitor_reserved(
    standin: GitHubStandIn, api: Client
):
    free = jit(api)["runner"]["id"]
    taken = jit(api, name="ci-runner-a.2@ci0")["runner"]["id"]
    for runner_id in (free, taken):
        standin.set_status(runner_id, "online")
    api.json("POST", f"{REPO}/actions/runners/{taken}/labels", {"labels": ["reserved-for:x-y-z"]})

    standin.start_job_simulation(every=0.05, duration=5.0, reserve_idle=False)

    def busy(runner_id: int) -> bool:
        return next(r["busy"] for r in standin.runners() if r["id"] == runner_id)

    wait_until(lambda: busy(taken), "the taken runner busy", 5, 0.02)
    time.sleep(0.3)  # several ticks: the unreserved runner gets no job
    assert not busy(free)
    standin.stop_job_simulation()


# -- a real runner agent (tests/guest/agent.sh) ----------------------------------------------


def agent(api: Client, call: str, body: str | bytes) -> urllib3.BaseHTTPResponse:
    """POST an encoded JIT config to an agent endpoint, as busybox wget --post-data does."""
    data = body.encode() if isinstance(body, str) else body
    return api.http.request(
        "POST",
        f"{api.base_url}/_standin/agent/{call}",
        body=data,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )


def b64json(value: Any) -> str:
    return base64.b64encode(json.dumps(value).encode()).decode()


def test_agent_goes_online_takes_the_reserved_job_and_finishes(standin: GitHubStandIn, api: Client):
    created = jit(api)
    runner_id, config = created["runner"]["id"], created["encoded_jit_config"]
    bystander = jit(api, name="ci-runner-a.2@ci0")["runner"]["id"]
    standin.agent_job_seconds = 2.5

    def registration(number: int) -> urllib3.BaseHTTPResponse:
        return api("GET", f"{REPO}/actions/runners/{number}")

    online = agent(api, "online", config)
    assert online.status == 200 and online.json()["id"] == runner_id
    assert registration(runner_id).json()["status"] == "online"
    # The config names one runner: the other one's agent never connected.
    assert registration(bystander).json()["status"] == "offline"

    # Nobody reserved it: no job for it yet.
    assert agent(api, "job", config).status == 204
    assert not registration(runner_id).json()["busy"]

    labels = {"labels": ["reserved-for:job-1", "reserved-by:servo/servo/actions/runs/7"]}
    api.json("POST", f"{REPO}/actions/runners/{runner_id}/labels", labels)
    standin.hold_jobs = True  # the job waits in GitHub's queue
    assert agent(api, "job", config).status == 204
    standin.hold_jobs = False
    job = agent(api, "job", config)
    assert job.status == 200
    assert job.json() == {"id": job.json()["id"], "reserved_for": "job-1", "seconds": 2.5}
    assert registration(runner_id).json()["busy"]
    assert agent(api, "job", config).json() == job.json()  # asking again: the same job

    assert agent(api, "finish", config).status == 204
    # An ephemeral runner's registration goes when its job is done, as on GitHub.
    assert registration(runner_id).status == 404
    assert agent(api, "job", config).status == 404
    name = "ci-runner-a.1@ci0"
    assert standin.agent_calls == [
        (runner_id, name, "online", "127.0.0.1"),
        (runner_id, name, "job", "127.0.0.1"),
        (runner_id, name, "finish", "127.0.0.1"),
    ]


def test_agent_with_a_config_of_no_runner_is_refused(standin: GitHubStandIn, api: Client):
    created = jit(api)
    runner_id, config = created["runner"]["id"], created["encoded_jit_config"]
    files = json.loads(base64.b64decode(config))
    forged = b64json(
        {
            **files,
            ".credentials": b64json({"Scheme": "OAuthAccessToken", "Data": {"token": "guess"}}),
        }
    )

    # Right runner, wrong credentials (a guest that made up another runner's config).
    assert agent(api, "online", forged).status == 401
    # Not finished before it has a job.
    assert agent(api, "finish", config).status == 409
    api("DELETE", f"{REPO}/actions/runners/{runner_id}")
    # The runner is gone (unregistered by the monitor).
    assert agent(api, "online", config).status == 404
    assert agent(api, "online", "x" * 20_000).status == 413
    assert standin.agent_calls == []


@pytest.mark.parametrize(
    "body",
    [
        "",
        "not base64!",
        b"\xff\xfe",
        b64json(["a list"]),
        b64json({".runner": b64json({"AgentId": "1"})}),  # no credentials
        b64json({".runner": "%%%", ".credentials": b64json({"Data": {"token": "t"}})}),
        b64json({".runner": b64json({}), ".credentials": b64json({"Data": {"token": "t"}})}),
    ],
)
@pytest.mark.parametrize("call", ["online", "job", "finish"])
def test_agent_with_a_garbled_config_is_422(api: Client, call: str, body: str | bytes):
    response = agent(api, call, body)
    assert response.status == 422, response.data
    assert "no JIT config" in response.json()["error"]


# -- lifecycle -------------------------------------------------------------------------------


def test_stop_frees_port_and_threads():
    standin = GitHubStandIn()
    base_url = standin.start()
    port = urlsplit(base_url).port
    keep_alive = Client(base_url)
    assert keep_alive("GET", "/rate_limit").status == 200
    standin.start_job_simulation(every=0.05, duration=1)

    standin.stop()

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))  # raises if the server still held it
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0
    names = {thread.name for thread in threading.enumerate()}
    assert f"github-standin-http:{port}" not in names
    assert f"github-standin-jobs:{id(standin):x}" not in names


def test_runs_as_a_script():
    with standin_script("--token", "t") as (api, line):
        assert line.strip() == f"GitHub stand-in listening on {api.base_url}"
        response = api("GET", "/rate_limit", headers={"Authorization": "token t"}, auth=False)
        assert response.status == 200
        assert api("GET", "/rate_limit", headers={"Authorization": "token x"}).status == 401


def test_the_script_can_refuse_jit_configs():
    with standin_script("--no-jit-permission") as (api, line):
        assert "listening" in line
        body = {"name": "ci-runner-a.1@ci0", "runner_group_id": 1, "labels": ["self-hosted"]}
        assert api("POST", f"{REPO}/actions/runners/generate-jitconfig", body).status == 403
        assert api("GET", f"{REPO}/actions/runners").status == 200


@contextlib.contextmanager
def standin_script(*args: str) -> Iterator[tuple[Client, str]]:
    """`python -m monitor.standin` with `args` on a free port: a client for it and the first
    line it printed. Stopped with Ctrl-C afterwards, which must end it cleanly."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "monitor.standin", "--port", str(port), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent.parent,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        yield Client(f"http://127.0.0.1:{port}"), line
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# -- busy lag: GitHub reports a job's runner busy only some seconds after the job started --------


class FakeSeconds:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_busy_lag_hides_a_started_job_from_the_api_and_lets_its_runner_be_deleted(
    standin: GitHubStandIn, api: Client
):
    clock = FakeSeconds()
    standin.clock, standin.busy_lag = clock, 45
    created = [jit(api, name=f"ci-runner-a.{n}@ci0") for n in (1, 2)]
    for runner in created:
        config = runner["encoded_jit_config"]
        assert agent(api, "online", config).status == 200
        path = f"{REPO}/actions/runners/{runner['runner']['id']}/labels"
        api.json("POST", path, {"labels": ["reserved-for:job"]})
        assert agent(api, "job", config).status == 200  # the job started

    def reported(runner: Any) -> bool:
        one = api.json("GET", f"{REPO}/actions/runners/{runner['runner']['id']}")
        listed = api.json("GET", f"{REPO}/actions/runners")["runners"]
        (same,) = [r for r in listed if r["id"] == one["id"]]
        assert same["busy"] is one["busy"]
        return one["busy"]

    clock.now += 44.9
    assert not reported(created[0])
    validate(
        api.json("GET", f"{REPO}/actions/runners/{created[0]['runner']['id']}"),
        "/repos/{owner}/{repo}/actions/runners/{runner_id}",
        "get",
    )
    # GitHub does not know about the job yet: deleting the runner kills it.
    assert api("DELETE", f"{REPO}/actions/runners/{created[0]['runner']['id']}").status == 204
    assert agent(api, "finish", created[0]["encoded_jit_config"]).status == 404
    clock.now += 0.1
    assert reported(created[1])
    assert api("DELETE", f"{REPO}/actions/runners/{created[1]['runner']['id']}").status == 422
    assert agent(api, "finish", created[1]["encoded_jit_config"]).status == 204


def test_simulated_jobs_lag_too_and_set_busy_does_not(standin: GitHubStandIn, api: Client):
    clock = FakeSeconds()
    standin.clock, standin.busy_lag = clock, 30
    simulated = jit(api)["runner"]["id"]
    standin.set_status(simulated, "online")
    direct = jit(api, name="ci-runner-a.2@ci0")["runner"]["id"]
    standin.set_busy(direct, True)
    standin.start_job_simulation(every=0.02, duration=60, reserve_idle=True)
    wait_until(lambda: standin.records.runners[simulated].busy, "a simulated job", 5, 0.02)
    standin.stop_job_simulation()
    busy = {r["id"]: r["busy"] for r in standin.runners()}
    assert busy == {simulated: False, direct: True}
    clock.now += 30
    assert {r["id"]: r["busy"] for r in standin.runners()} == {simulated: True, direct: True}


def test_agent_settings_change_only_what_the_body_names(standin: GitHubStandIn, api: Client):
    def post(body: Any, status: int = 200) -> None:
        response = api("POST", "/_standin/agent", body, auth=False)
        assert response.status == status, response.data

    post({"online_after": 0.5, "busy_lag": 45})
    post({"job_seconds": 3})
    post({"hold_jobs": False})
    assert (standin.agent_online_after, standin.busy_lag, standin.agent_job_seconds) == (
        0.5,
        45.0,
        3.0,
    )
    post({"online_after": None, "busy_lag": 0})
    assert (standin.agent_online_after, standin.busy_lag) == (None, 0.0)
    post({"busy_lag": -1}, status=400)
    post({"busy_lag": "soon"}, status=400)
    assert standin.busy_lag == 0.0


def test_the_script_takes_a_busy_lag():
    with standin_script("--busy-lag", "45") as (api, line):
        assert "listening" in line
        created = jit(api)
        config, runner_id = created["encoded_jit_config"], created["runner"]["id"]
        assert agent(api, "online", config).status == 200
        api.json(
            "POST", f"{REPO}/actions/runners/{runner_id}/labels", {"labels": ["reserved-for:j"]}
        )
        assert agent(api, "job", config).status == 200
        assert api.json("GET", f"{REPO}/actions/runners/{runner_id}")["busy"] is False
