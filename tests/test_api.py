"""Every API endpoint through WebTest: success and each error path, with status and content
type. The monitor thread runs for real; GitHub and libvirt are hand-written fakes here (the
real stand-in and libvirt's test driver are in test_api_e2e.py)."""

from __future__ import annotations

import collections
import gc
import os
import time
import urllib.parse
import uuid

import pytest
import webtest

from monitor import models
from monitor import tokenless
from monitor import web
from monitor.errors import MonitorError
from tests.fakes import PNG
from tests.support.constants import API_TOKEN
from tests.support.constants import AUTH
from tests.support.constants import JSON
from tests.support.rigs import Rig
from tests.support.rigs import assert_error
from tests.support.rigs import guest_rig
from tests.support.rigs import idle_rig
from tests.support.waiting import wait_until


@pytest.fixture
def rig(make_rig) -> Rig:
    return idle_rig(make_rig, linux=3, windows=1)


# Auth -------------------------------------------------------------------------------------


def test_take_without_token_is_401_and_checked_before_parameters(rig):
    response = rig.client.post("/profile/linux/take/zero?unique_id=x", status=401)
    assert "Bearer" in assert_error(response, 401)


def test_take_with_wrong_token_is_403(rig):
    response = rig.client.post(rig.take_url(), headers={"Authorization": "Bearer nope"}, status=403)
    assert_error(response, 403)
    response = rig.client.post(rig.take_url(), headers={"Authorization": API_TOKEN}, status=403)
    assert_error(response, 403)  # the exact string `Bearer <token>` is required


# Takes ------------------------------------------------------------------------------------


def test_take_reserves_one_idle_runner_with_upstreams_labels(rig):
    unique_id = str(uuid.uuid4())
    response = rig.client.post(rig.take_url(unique_id=unique_id, run="123"), headers=AUTH)
    assert response.status_int == 200 and response.content_type == JSON
    (entry,) = response.json
    assert set(entry) == {"id", "runner"}
    assert entry["runner"]["guest_name"] == f"ci-runner-linux.{entry['id']}"
    # The runner as it was before the reservation (upstream's shape): no reserved-for label.
    names = [label["name"] for label in entry["runner"]["registration"]["labels"]]
    assert not any(name.startswith("reserved-for:") for name in names)
    registration = rig.github.by_name(f"ci-runner-linux.{entry['id']}@host")
    assert f"reserved-for:{unique_id}" in registration.labels
    assert "reserved-by:test/servo/actions/runs/123" in registration.labels
    since = [label for label in registration.labels if label.startswith("reserved-since:")]
    assert since == [f"reserved-since:{int(rig.clock().timestamp())}"]
    # The client is answered first; the monitor thread records the reservation right after.
    reservation = wait_until(lambda: models.get_reservation(unique_id), "the reservation", 10)
    assert reservation.ids == [entry["id"]]


def test_take_count_may_answer_fewer_and_lowest_ids_first(rig):
    response = rig.client.post(rig.take_url(count=5), headers=AUTH)
    assert [entry["id"] for entry in response.json] == [0, 1, 2]
    assert rig.client.post(rig.take_url(count=2), headers=AUTH).json is None


def test_take_with_nothing_idle_is_null(rig):
    assert rig.client.post(rig.take_url(profile="windows"), headers=AUTH).json is not None
    response = rig.client.post(rig.take_url(profile="windows"), headers=AUTH)
    assert response.status_int == 200 and response.content_type == JSON
    assert response.json is None


def test_take_of_unknown_profile_is_404(rig):
    response = rig.client.post(rig.take_url(profile="macos"), headers=AUTH, status=404)
    assert "macos" in assert_error(response, 404)


@pytest.mark.parametrize(
    "query",
    [
        "unique_id=not-a-uuid&qualified_repo=test/servo&run_id=1",
        "qualified_repo=test/servo&run_id=1",
        "unique_id={u}&run_id=1",
        "unique_id={u}&qualified_repo=test/servo",
        "unique_id={u}&qualified_repo=test/servo&run_id=12a",
        "unique_id={u}&qualified_repo=noslash&run_id=1",
        "unique_id={u}&qualified_repo=test/servo&run_id=",
    ],
)
def test_take_with_malformed_parameters_is_422(rig, query):
    url = "/profile/linux/take?" + query.format(u=uuid.uuid4())
    assert_error(rig.client.post(url, headers=AUTH, status=422), 422)


UUID = "0b5e3c1e-4f5a-4b8e-9d63-2a1f0c7e9b11"
NOT_UUIDS = [
    "{" + UUID + "}",  # each of these uuid.UUID() took
    "urn:uuid:" + UUID,
    UUID.replace("-", ""),
    "0b5e3c1e4f5a-4b8e-9d63-2a1f-0c7e9b11",
    "-".join(["", UUID]),
    UUID + "0",
    UUID[:-1],
    UUID + "\n",
    UUID.replace("0", "\u0660"),  # Arabic-Indic zero
    "g" * 8 + UUID[8:],
    "nope",
]


@pytest.mark.parametrize("unique_id", NOT_UUIDS)
@pytest.mark.parametrize("route", ["/profile/linux/take", "/select-runner"])
def test_unique_id_must_be_a_uuid_as_uuidgen_prints_it(rig, route, unique_id):
    query = urllib.parse.urlencode(
        {"unique_id": unique_id, "qualified_repo": "test/servo", "run_id": "1"}
    )
    response = rig.client.post(f"{route}?{query}", headers=AUTH, status=422)
    message = assert_error(response, 422)
    assert message.startswith("unique_id must be a UUID as uuidgen prints it"), message
    assert not [call for call in rig.github.calls if call[0] == "list_artifacts"]


@pytest.mark.parametrize("unique_id", [UUID, UUID.upper()])  # Linux's and macOS's uuidgen
def test_unique_id_in_either_case_is_taken_as_given(rig, unique_id):
    response = rig.client.post(rig.take_url(unique_id=unique_id), headers=AUTH)
    (entry,) = response.json
    registration = rig.github.by_name(f"ci-runner-linux.{entry['id']}@host")
    assert f"reserved-for:{unique_id}" in registration.labels


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("qualified_repo", "a" * 101 + "/b"),
        ("qualified_repo", "a/" + "b" * 101),
        ("run_id", "1" * 21),
    ],
)
def test_take_parameters_longer_than_github_allows_are_422(rig, name, value):
    params = {"unique_id": UUID, "qualified_repo": "test/servo", "run_id": "1", name: value}
    url = "/profile/linux/take?" + urllib.parse.urlencode(params)
    message = assert_error(rig.client.post(url, headers=AUTH, status=422), 422)
    assert len(message) < 200, message  # a bad value is not echoed whole


@pytest.mark.parametrize("count", ["0", "x", "-1", "33", "1.5"])
def test_take_with_bad_count_is_422(rig, count):
    url = f"/profile/linux/take/{count}?unique_id={uuid.uuid4()}&qualified_repo=a/b&run_id=1"
    assert_error(rig.client.post(url, headers=AUTH, status=422), 422)


def test_retried_take_gets_the_same_runners_and_a_different_ask_is_409(rig):
    unique_id = str(uuid.uuid4())
    first = rig.client.post(rig.take_url(count=2, unique_id=unique_id), headers=AUTH).json
    again = rig.client.post(rig.take_url(count=2, unique_id=unique_id), headers=AUTH).json
    assert [e["id"] for e in again] == [e["id"] for e in first]
    label_calls = [c for c in rig.github.calls if c[0] == "add_labels"]
    assert len(label_calls) == 2  # no second set was reserved
    for url in (
        rig.take_url(count=3, unique_id=unique_id),
        rig.take_url(profile="windows", count=2, unique_id=unique_id),
    ):
        assert "already used" in assert_error(rig.client.post(url, headers=AUTH, status=409), 409)


def test_reservation_failing_half_way_is_rolled_back_and_502(rig):
    rig.github.fail_next("add_labels", MonitorError("GitHub POST labels: 500", status=502))
    response = rig.client.post(rig.take_url(count=2), headers=AUTH, status=502)
    assert "GitHub refused the reservation" in assert_error(response, 502)
    for registration in rig.github.runners.values():
        assert not any(label.startswith("reserved-") for label in registration.labels)
    assert [c for c in rig.github.calls if c[0] == "remove_label"]
    # The runners are free again for the next job.
    assert len(rig.client.post(rig.take_url(count=2), headers=AUTH).json) == 2


def test_take_before_the_first_observation_is_503_with_retry_after(make_rig):
    rig = make_rig()
    response = rig.client.post(rig.take_url(), headers=AUTH, status=503)
    assert_error(response, 503)
    assert response.headers["Retry-After"] == "5"


# Tokenless select (artifact checks are in test_tokenless.py and test_api_e2e.py) -----------


def test_select_runner_is_409_for_queue_members(make_rig):
    rig = make_rig(extra="queue_member = true\n")
    url = f"/select-runner?unique_id={uuid.uuid4()}&qualified_repo=test/servo&run_id=1"
    assert "queue_member" in assert_error(rig.client.post(url, status=409), 409)


def test_select_runner_with_malformed_parameters_is_422(rig):
    url = "/select-runner?unique_id=nope&qualified_repo=test/servo&run_id=1"
    assert_error(rig.client.post(url, status=422), 422)


def test_select_runner_is_rate_limited_per_repository(make_rig):
    rig = make_rig(extra="select_runner_rate_limit = 2\n")

    def select(repo: str, status: int = "*"):
        url = f"/select-runner?unique_id={uuid.uuid4()}&qualified_repo={repo}&run_id=1"
        return rig.client.post(url, status=status)

    before = int(time.time())
    first, second = select("test/servo"), select("test/servo")
    assert first.status_int == second.status_int == 403  # no args artifact: refused, counted
    assert [r.headers["X-RateLimit-Remaining"] for r in (first, second)] == ["1", "0"]
    assert first.headers["X-RateLimit-Limit"] == "2"
    reset = int(second.headers["X-RateLimit-Reset"])
    assert before + 59 <= reset <= before + 61

    refused = select("test/servo", status=429)
    assert "at most 2 a minute" in assert_error(refused, 429)
    assert 1 <= int(refused.headers["Retry-After"]) <= 61
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    assert refused.headers["X-RateLimit-Reset"] == str(reset)
    # Another repository has its own count; the same one in other case does not.
    assert select("test/other").status_int != 429
    select("test/SERVO", status=429)
    # Outside the prefix: refused before it is counted (it would be a key of its own).
    outside = select("elsewhere/servo", status=403)
    assert "X-RateLimit-Limit" not in outside.headers
    assert "Not allowed on this qualified_repo" in assert_error(outside, 403)


def _rss() -> int:
    gc.collect()
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_select_runner_with_20000_junk_repositories_grows_the_process_by_under_20_mib(make_rig):
    """Junk used to be counted (and kept, up to 256 KiB a key) before the prefix was checked,
    and the table was pruned of ended windows only, never below 10,000 keys."""
    rig = make_rig()
    select = rig.client.post
    uid = "0b5e3c1e-4f5a-4b8e-9d63-2a1f0c7e9b11"
    statuses: collections.Counter[int] = collections.Counter()
    before = _rss()
    for n in range(20_000):
        if n % 2:  # 4 KiB, outside the prefix
            repo = f"junk-{n}-" + "x" * 4096 + "/servo"
        else:  # under the prefix: a made-up repository of the longest name GitHub allows
            repo = f"test/{n:06d}" + "y" * 94
        url = f"/select-runner?unique_id={uid}&qualified_repo={repo}&run_id=1"
        statuses[select(url, status="*").status_int] += 1
    grown = _rss() - before
    print(f"\n20,000 junk selects: RSS grew {grown / 2**20:.1f} MiB; {dict(statuses)}")
    assert grown < 20 * 2**20
    assert statuses[422] == 10_000  # too long to be a repository: refused before counting
    assert statuses[403] + statuses[429] == 10_000


def test_select_runner_rate_limit_zero_means_none(make_rig):
    rig = make_rig(extra="select_runner_rate_limit = 0\n")
    for _ in range(5):
        url = f"/select-runner?unique_id={uuid.uuid4()}&qualified_repo=test/servo&run_id=1"
        response = rig.client.post(url, status="*")
        assert response.status_int != 429 and "X-RateLimit-Limit" not in response.headers


# Guests -----------------------------------------------------------------------------------


def test_guest_gets_its_own_jit_config_and_boot_script(make_rig):
    rig = guest_rig(make_rig)
    guest = {"REMOTE_ADDR": "192.168.100.11"}
    response = rig.client.get("/github-jitconfig", extra_environ=guest)
    assert response.content_type == JSON
    assert response.json == models.get_runner(1).jit_config
    boot = rig.client.get("/boot", extra_environ=guest)
    assert boot.content_type == "text/plain" and boot.text == "#!/bin/sh\necho booting linux\n"


def test_unknown_guest_address_is_503(make_rig):
    rig = guest_rig(make_rig)
    for path in ("/github-jitconfig", "/boot"):
        response = rig.client.get(path, extra_environ={"REMOTE_ADDR": "10.9.9.9"}, status=503)
        assert "10.9.9.9" in assert_error(response, 503)


def test_missing_boot_script_is_503(make_rig):
    rig = guest_rig(make_rig)
    response = rig.client.get("/boot", extra_environ={"REMOTE_ADDR": "192.168.100.12"}, status=503)
    assert "boot-script" in assert_error(response, 503)


def test_x_real_ip_is_believed_only_from_trusted_proxies(make_rig):
    rig = guest_rig(make_rig, extra='trusted_proxies = ["127.0.0.0/8"]\n')
    proxied = {"REMOTE_ADDR": "127.0.0.1"}
    response = rig.client.get(
        "/github-jitconfig", headers={"X-Real-IP": "192.168.100.10"}, extra_environ=proxied
    )
    assert response.json == models.get_runner(0).jit_config
    # From a guest (untrusted), X-Real-IP naming another guest is ignored: it gets its own.
    spoofing = {"REMOTE_ADDR": "192.168.100.11"}
    response = rig.client.get(
        "/github-jitconfig", headers={"X-Real-IP": "192.168.100.10"}, extra_environ=spoofing
    )
    assert response.json == models.get_runner(1).jit_config


def test_runner_without_jit_config_gets_null(make_rig):
    rig = guest_rig(make_rig, extra="dont_register_runners = true\n")
    response = rig.client.get("/github-jitconfig", extra_environ={"REMOTE_ADDR": "192.168.100.10"})
    assert response.content_type == JSON and response.json is None


# Boot logs --------------------------------------------------------------------------------

GUEST_1 = {"REMOTE_ADDR": "192.168.100.11"}  # runner 1's guest in guest_rig


def upload(rig: Rig, chunk: bytes, environ: dict[str, str], status: int = 200):
    """POST a chunk of console text as the test guest's busybox wget --post-file does."""
    return rig.client.post(
        "/boot-log",
        params=chunk,
        content_type="application/x-www-form-urlencoded",
        extra_environ=environ,
        status=status,
    )


def test_guest_uploads_its_boot_log_in_chunks(make_rig):
    rig = guest_rig(make_rig)
    assert_error(rig.client.get("/runner/1/boot.log", status=404), 404)
    etag = rig.client.get("/dashboard.html").headers["ETag"]

    first = upload(rig, b"[    0.000000] Linux version 6.1.0\n", GUEST_1)
    assert first.content_type == JSON and first.json == {"bytes": 35}
    assert upload(rig, b"monitor-guest: booted 192.168.100.11\n", GUEST_1).json == {"bytes": 72}

    log = rig.client.get("/runner/1/boot.log")
    assert log.content_type == "text/plain"
    assert log.headers["X-Content-Type-Options"] == "nosniff"
    assert log.body == b"[    0.000000] Linux version 6.1.0\nmonitor-guest: booted 192.168.100.11\n"
    # The dashboard links to the logs that exist (a change of the page: a new ETag).
    page = rig.client.get("/dashboard.html", headers={"If-None-Match": etag}, status=200)
    assert 'href="/runner/1/boot.log"' in page.text
    assert 'href="/runner/0/boot.log"' not in page.text


def test_boot_log_from_an_unknown_address_is_503(make_rig):
    rig = guest_rig(make_rig)
    response = upload(rig, b"hello\n", {"REMOTE_ADDR": "10.9.9.9"}, status=503)
    assert "10.9.9.9" in assert_error(response, 503)
    assert not list((rig.config.data_path / "runners").glob("*/boot.log"))


def test_boot_log_past_one_mib_is_413_and_keeps_what_was_stored(make_rig):
    rig = guest_rig(make_rig)
    half = b"x" * (512 * 1024)
    upload(rig, half, GUEST_1)
    upload(rig, half, GUEST_1)  # exactly 1 MiB: still fine
    assert "exceed" in assert_error(upload(rig, b"y", GUEST_1, status=413), 413)
    # A chunk bigger than the cap is refused before it is read.
    too_big = assert_error(upload(rig, b"z" * (1024 * 1024 + 1), GUEST_1, status=413), 413)
    assert "too big" in too_big
    assert rig.client.get("/runner/1/boot.log").body == half + half


def test_boot_log_of_a_malformed_runner_id_is_422(rig):
    assert_error(rig.client.get("/runner/abc/boot.log", status=422), 422)
    assert_error(rig.client.get("/runner/-1/boot.log", status=422), 422)


# Screenshots ------------------------------------------------------------------------------


def test_runner_screenshots(rig):
    assert_error(rig.client.get("/runner/0/screenshot.png", status=404), 404)
    assert rig.monitor.guests.refresh_screenshots() == 4
    response = rig.client.get("/runner/0/screenshot.png?=12345")  # the page's cache-buster
    assert response.content_type == "image/png" and response.body == PNG
    now = rig.client.get("/runner/1/screenshot/now")
    assert now.content_type == "image/png" and now.body == PNG
    assert_error(rig.client.get("/runner/abc/screenshot.png", status=422), 422)
    assert_error(rig.client.get("/runner/abc/screenshot/now", status=422), 422)
    assert_error(rig.client.get("/runner/99/screenshot/now", status=404), 404)
    assert_error(rig.client.get("/runner/99/screenshot.png", status=404), 404)


def test_runner_thumbnails(rig):
    assert_error(rig.client.get("/runner/0/thumbnail.png", status=404), 404)
    rig.monitor.guests.refresh_screenshots()
    response = rig.client.get("/runner/0/thumbnail.png?v=abc")  # the page's versioned URL
    assert response.content_type == "image/png" and response.body.startswith(b"\x89PNG")
    assert_error(rig.client.get("/runner/abc/thumbnail.png", status=422), 422)
    assert_error(rig.client.get("/runner/99/thumbnail.png", status=404), 404)


def test_profile_screenshots(rig):
    assert_error(rig.client.get("/profile/linux/screenshot.png", status=404), 404)
    assert_error(rig.client.get("/profile/..%2f..%2fetc/screenshot.png", status=404), 404)
    path = rig.config.data_path / "profiles" / "linux"
    path.mkdir(parents=True)
    (path / "screenshot.png").write_bytes(PNG)
    response = rig.client.get("/profile/linux/screenshot.png")
    assert response.content_type == "image/png" and response.body == PNG


# Policy override --------------------------------------------------------------------------


def test_override_lifecycle(rig):
    assert rig.client.get("/policy/override").json is None
    assert_error(rig.client.post("/policy/override?linux=5", status=401), 401)
    response = rig.client.post("/policy/override?linux=5", headers=AUTH)
    assert response.content_type == JSON
    assert response.json["profile_override_counts"] == {"linux": 5}
    assert rig.client.get("/policy/override").json["profile_override_counts"] == {"linux": 5}
    assert models.load_override() is not None  # persisted
    conflict = rig.client.post("/policy/override?linux=6", headers=AUTH, status=409)
    assert "another override" in assert_error(conflict, 409)
    assert_error(rig.client.delete("/policy/override", status=401), 401)
    cancelled = rig.client.delete("/policy/override", headers=AUTH)
    assert cancelled.json["profile_override_counts"] == {"linux": 5}
    assert rig.client.delete("/policy/override", headers=AUTH).json is None
    assert rig.client.get("/policy/override").json is None


@pytest.mark.parametrize(
    "query, status",
    [("linux=x", 422), ("linux=-1", 422), ("", 422), ("macos=3", 422), ("linux=0", 422)],
)
def test_bad_override_requests(rig, query, status):
    response = rig.client.post(f"/policy/override?{query}", headers=AUTH, status=status)
    assert_error(response, status)


# Dashboard --------------------------------------------------------------------------------


def test_dashboard_json_has_a_status_per_runner(rig):
    response = rig.client.get("/dashboard.json")
    assert response.content_type == JSON
    assert [(r["id"], r["status"]) for r in response.json["runners"]] == [
        (0, "Idle"),
        (1, "Idle"),
        (2, "Idle"),
        (3, "Idle"),
    ]


def test_dashboard_html_is_the_live_fragment(rig):
    response = rig.client.get("/dashboard.html")
    assert response.content_type == "text/html"
    assert "3/3 runners for linux" in response.text
    assert "<html" not in response.text


def test_dashboard_html_answers_304_while_nothing_changes(rig):
    first = rig.client.get("/dashboard.html")
    etag = first.headers["ETag"]
    assert first.headers["Cache-Control"] == "no-cache"
    same = rig.client.get("/dashboard.html", headers={"If-None-Match": etag}, status=304)
    assert same.headers["ETag"] == etag and same.body == b""
    # The page's first poll carries the tag the page was rendered with.
    assert f'data-etag="{etag.replace(chr(34), "&quot;")}"' in rig.client.get("/").text

    rig.clock.advance(30)  # time alone changes nothing on the page: it counts ages itself
    rig.client.get("/dashboard.html", headers={"If-None-Match": etag}, status=304)

    # A new screenshot or a new event is a change.
    rig.monitor.guests.refresh_screenshots()
    shot = rig.client.get("/dashboard.html", headers={"If-None-Match": etag}, status=200)
    assert shot.headers["ETag"] != etag and "/runner/0/thumbnail.png?v=" in shot.text
    etag = shot.headers["ETag"]
    models.record_event("test", "something the operator should see")
    event = rig.client.get("/dashboard.html", headers={"If-None-Match": etag}, status=200)
    assert "something the operator should see" in event.text
    etag = event.headers["ETag"]

    rig.client.post(rig.take_url(), headers=AUTH)
    # The take changes the page more than once (its history row, then the runner Reserved):
    # poll as the page does until the runner shows Reserved.
    changed = wait_until(
        lambda: (
            (r := rig.client.get("/dashboard.html", headers={"If-None-Match": etag})).status_int
            == 200
            and 'data-status="Reserved"' in r.text
            and r
        ),
        "the runner to show Reserved",
        10,
    )
    assert changed.headers["ETag"] != etag


def test_dashboard_shows_values_from_github_as_text(rig):
    registration = rig.github.by_name("ci-runner-linux.0@host")
    hostile = ("<script>alert(1)</script>", 'x:"><img src=x onerror=alert(2)>')
    rig.github.set(registration.id, labels=registration.labels + hostile)
    rig.converge(1)
    for path in ("/", "/dashboard.html"):
        page = rig.client.get(path).text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
        assert "<script>alert" not in page and "<img src=x" not in page
        assert "&quot;&gt;&lt;img src=x onerror=alert(2)&gt;" in page


def test_dashboard_endpoints_are_503_until_the_first_observation(make_rig):
    rig = make_rig()
    assert_error(rig.client.get("/dashboard.json", status=503), 503)
    response = rig.client.get("/dashboard.html", status=503)
    assert response.status_int == 503 and "Traceback" not in response.text


# Static trees for guests ------------------------------------------------------------------


@pytest.fixture
def trees(tmp_path, make_rig):
    deps = tmp_path / "deps"
    (deps / "ubuntu2204").mkdir(parents=True)
    (deps / "ubuntu2204" / "runner.tar.gz").write_bytes(b"tarball")
    (tmp_path / "secret.txt").write_text("outside")
    os.symlink(tmp_path / "secret.txt", deps / "escape")
    repo = tmp_path / "servo"
    (repo / ".git").mkdir(parents=True)
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    extra = f'main_repo_path = "{repo}"\n'
    rig = make_rig(extra=extra)
    # IMAGE_DEPS_DIR comes from the environment, like upstream's.
    rig.client = webtest.TestApp(web.make_app(_with(rig.config, image_deps_dir=deps), rig.monitor))
    return rig


def _with(config, **changes):
    from dataclasses import replace

    return replace(config, **changes)


def test_static_trees_serve_files_and_dotfiles(trees):
    assert trees.client.get("/image-deps/ubuntu2204/runner.tar.gz").body == b"tarball"
    head = trees.client.get("/cache/servo/.git/HEAD")
    assert head.text == "ref: refs/heads/main\n"
    assert trees.client.head("/cache/servo/.git/HEAD").status_int == 200


def test_static_trees_never_serve_outside_their_root(trees):
    for path in (
        "/image-deps/escape",
        "/image-deps/../secret.txt",
        "/image-deps/%2e%2e/secret.txt",
    ):
        response = trees.client.get(path, expect_errors=True)
        assert response.status_int == 404, path
        assert b"outside" not in response.body


def test_static_directories_redirect_then_have_no_listing(trees):
    redirect = trees.client.get("/image-deps/ubuntu2204", status=301)
    assert redirect.headers["Location"].endswith("/image-deps/ubuntu2204/")
    assert_error(trees.client.get("/image-deps/ubuntu2204/", status=404), 404)
    assert_error(trees.client.get("/image-deps/missing.iso", status=404), 404)


def test_static_trees_not_configured_are_404(rig):
    assert "not configured" in assert_error(rig.client.get("/image-deps/x", status=404), 404)
    assert_error(rig.client.get("/cache/servo/.git/HEAD", status=404), 404)


def test_taken_runners_show_as_reserved_on_the_dashboard_at_once(rig):
    taken = rig.client.post(rig.take_url(count=2), headers=AUTH).json
    ids = {entry["id"] for entry in taken}

    def reserved_on_dashboard():
        rig.monitor.refresh_view_if_stale()  # the scheduler's half-second job
        data = rig.client.get("/dashboard.json").json
        statuses = {r["id"]: r["status"] for r in data["runners"]}
        counts = data["profile_runner_counts"]["linux"]
        return all(statuses[i] == "Reserved" for i in ids) and counts["idle"] == 1 or None

    # No reconcile pass is needed for this (the next one is seconds away).
    assert wait_until(reserved_on_dashboard, "Reserved on the dashboard", 5)


# Found in review ----------------------------------------------------------------------------


def test_runner_whose_rollback_failed_is_held_from_other_jobs(rig):
    # One label call fails (its runner may or may not have the labels); the rollback of
    # both fails too.
    rig.github.fail_next("add_labels", MonitorError("GitHub: timed out", status=503))
    rig.github.fail_next("remove_label", MonitorError("GitHub: 500", status=502), times=6)
    assert_error(rig.client.post(rig.take_url(count=2), headers=AUTH, status=502), 502)
    # Neither may go to another job before GitHub has been asked again.
    taken = rig.client.post(rig.take_url(count=4), headers=AUTH).json
    assert [entry["id"] for entry in taken] == [2]  # the one runner the take never touched
    # A fresh look at GitHub releases them: the one still labelled shows as Reserved (the
    # reserve timeout ends it), the clean one is Idle and can be taken.
    rig.converge(1)
    labelled = {
        runner_id
        for runner_id in (0, 1)
        if any(
            label.startswith("reserved-for:")
            for label in rig.github.by_name(f"ci-runner-linux.{runner_id}@host").labels
        )
    }
    assert len(labelled) == 1
    again = rig.client.post(rig.take_url(count=4), headers=AUTH).json
    assert [entry["id"] for entry in again] == sorted({0, 1} - labelled)


def test_a_retry_must_ask_for_the_same_job(rig):
    unique_id = str(uuid.uuid4())
    rig.client.post(rig.take_url(unique_id=unique_id, run="1"), headers=AUTH)
    other_run = rig.client.post(
        rig.take_url(unique_id=unique_id, run="2"), headers=AUTH, status=409
    )
    assert "run 1" in assert_error(other_run, 409)
    other_repo = rig.take_url(unique_id=unique_id, run="1", repo="test/other")
    assert_error(rig.client.post(other_repo, headers=AUTH, status=409), 409)


def test_a_take_in_progress_at_shutdown_is_answered_and_recorded(make_rig):
    import threading

    rig = make_rig(targets={"linux": 1})
    rig.converge()
    rig.all_online()
    rig.github.label_delay = 0.5
    unique_id = str(uuid.uuid4())
    answers = []
    client = threading.Thread(
        target=lambda: answers.append(
            rig.client.post(rig.take_url(unique_id=unique_id), headers=AUTH).json
        )
    )
    client.start()
    wait_until(lambda: any(call[0] == "add_labels" for call in rig.github.calls), "add_labels", 10)
    rig.monitor.stop()  # while the label call is in flight
    client.join(10)
    assert answers and answers[0][0]["id"] == 0
    assert models.get_reservation(unique_id).ids == [0]


def test_static_path_with_a_nul_byte_is_404(trees):
    for path in ("/image-deps/a%00b", "/cache/servo/%00", "/static/x%00.css"):
        assert_error(trees.client.get(path, status=404), 404)


def test_override_counts_are_bounded(rig):
    response = rig.client.post("/policy/override?linux=1000000000", headers=AUTH, status=422)
    assert "1000" in assert_error(response, 422)


def test_a_remembered_address_is_checked_again_before_serving_a_jit_config(make_rig):
    rig = guest_rig(make_rig)
    guest = {"REMOTE_ADDR": "192.168.100.11"}
    assert rig.client.get("/github-jitconfig", extra_environ=guest).json is not None
    # Runner 1's address moved to runner 0 (DHCP), before the next periodic refresh.
    rig.hypervisor.addresses["ci-runner-linux.0"] = "192.168.100.11"
    rig.hypervisor.addresses["ci-runner-linux.1"] = "192.168.100.99"
    response = rig.client.get("/github-jitconfig", extra_environ=guest)
    assert response.json == models.get_runner(0).jit_config


# Found by schemathesis (tests/test_schemathesis.py) -----------------------------------------


def test_method_not_allowed_says_which_methods_are(rig):
    """A 405 carries `Allow` (RFC 9110); the JSON error answer used to drop Bottle's."""
    for method, path, allowed in (
        ("put", "/healthz", "GET"),
        ("put", "/policy/override", "DELETE,GET,POST"),
        ("delete", "/profile/linux/take", "POST"),
    ):
        response = getattr(rig.client, method)(path, status=405)
        assert_error(response, 405)
        assert response.headers["Allow"] == allowed, (method, path)


def test_select_runner_for_an_artifact_naming_an_unknown_profile_is_404(rig, monkeypatch):
    """As a take of that profile: documented in monitor/openapi.json since schemathesis met it."""
    monkeypatch.setattr(
        tokenless.TokenlessValidator, "validate", lambda self, **kwargs: ("macos", 1)
    )
    url = f"/select-runner?unique_id={uuid.uuid4()}&qualified_repo=test/servo&run_id=1"
    response = rig.client.post(url, status=404)
    assert "macos" in assert_error(response, 404)
    assert "X-RateLimit-Remaining" in response.headers


def test_runner_ids_beyond_64_bits_are_422_not_500(rig):
    huge = "1930477067118100394712485593088"
    for path in (f"/events?runner_id={huge}", f"/runner/{huge}/boot.log"):
        assert_error(rig.client.get(path, status=422), 422)
    assert_error(rig.client.post(f"/runner/{huge}/destroy", headers=AUTH, status=422), 422)


def test_a_path_longer_than_the_file_system_allows_is_404(trees):
    long_name = "x" * 300  # past NAME_MAX (255): the OS refuses it with ENAMETOOLONG
    for path in (f"/static/{long_name}", f"/image-deps/{long_name}/y", f"/cache/servo/{long_name}"):
        assert_error(trees.client.get(path, status=404), 404)
