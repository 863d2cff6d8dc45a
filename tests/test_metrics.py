"""`GET /metrics`, parsed by prometheus_client's own parser: values follow the runners as they
change state (the real monitor thread with the fakes of tests/fakes.py), and GitHub's calls
and rate limit come from the real client talking to the stand-in (the served rig of
tests/support/served.py)."""

from __future__ import annotations

import time

import webtest
from prometheus_client.parser import text_string_to_metric_families

from monitor import metrics
from monitor import web
from tests.support.constants import AUTH
from tests.support.constants import GITHUB_TOKEN
from tests.support.under_pytest import standin_fixtures
from tests.support.waiting import wait_until

server, standin = standin_fixtures(GITHUB_TOKEN)


def scrape(client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.content_type == "text/plain"
    assert response.headers["Content-Type"] == metrics.CONTENT_TYPE
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def runners(samples, profile: str, status: str) -> float:
    return samples[("monitor_runners", (("profile", profile), ("status", status)))]


def test_metrics_follow_runners_through_their_states(make_rig):
    rig = make_rig(targets={"linux": 2, "windows": 1})
    rig.converge()
    first = scrape(rig.client)
    assert runners(first, "linux", "StartedOrCrashed") == 2
    assert runners(first, "linux", "Idle") == 0
    assert first[("monitor_runner_target", (("profile", "linux"),))] == 2
    # Each pass is timed: one more asked for is one more counted (requests still queued are
    # merged, so converge()'s two may have made one pass, maybe after the scrape).
    passes = ("monitor_reconcile_duration_seconds_count", ())
    rig.monitor.request_reconcile()
    wait_until(lambda: scrape(rig.client)[passes] > first[passes], "a reconcile pass timed")
    assert first[("monitor_reservations_total", (("outcome", "reserved"),))] == 0

    rig.all_online()
    idle = scrape(rig.client)
    assert runners(idle, "linux", "Idle") == 2 and runners(idle, "linux", "StartedOrCrashed") == 0

    (entry,) = rig.client.post(rig.take_url(), headers=AUTH).json
    rig.client.post(rig.take_url(profile="macos"), headers=AUTH, status=404)
    rig.converge(1)
    taken = scrape(rig.client)
    assert runners(taken, "linux", "Reserved") == 1 and runners(taken, "linux", "Idle") == 1
    assert taken[("monitor_reservations_total", (("outcome", "reserved"),))] == 1
    assert taken[("monitor_reservations_total", (("outcome", "failed"),))] == 1

    # The job starts 5 s after the take: one observation of the wait, about 5 s.
    registration = rig.github.by_name(f"ci-runner-linux.{entry['id']}@host")
    rig.clock.advance(5)
    rig.github.set(registration.id, busy=True)
    rig.converge(1)
    busy = scrape(rig.client)
    assert runners(busy, "linux", "Busy") == 1 and runners(busy, "linux", "Reserved") == 0
    waits = ("monitor_job_wait_seconds_count", (("profile", "linux"),))
    assert busy[waits] == 1
    total = busy[("monitor_job_wait_seconds_sum", (("profile", "linux"),))]
    assert 4 <= total <= 7, total
    assert busy[("monitor_libvirt_errors_total", ())] == 0


def test_github_calls_and_rate_limit_come_from_the_real_client(make_served_rig):
    rig = make_served_rig(2)
    client = webtest.TestApp(web.make_app(rig.config, rig.monitor))
    rig.monitor.guests.refresh_screenshots()
    samples = scrape(client)
    posts = samples[("monitor_github_api_calls_total", (("method", "POST"), ("status", "201")))]
    assert posts == 2  # the two JIT configs
    gets = samples[("monitor_github_api_calls_total", (("method", "GET"), ("status", "200")))]
    assert gets >= 1
    remaining = samples[("monitor_github_rate_limit_remaining", ())]
    assert 0 < remaining < 5000
    assert samples[("monitor_screenshot_pass_duration_seconds_count", ())] == 1

    rig.standin.inject_fault(502, count=1, path_contains="/actions/runners")
    rig.monitor.registrations.refresh(force=True)
    deadline = time.monotonic() + 5
    while ("monitor_github_api_errors_total", ()) not in (after := scrape(client)):
        assert time.monotonic() < deadline
    assert after[("monitor_github_api_errors_total", ())] == samples.get(
        ("monitor_github_api_errors_total", ()), 0
    ) + 1
    assert after[("monitor_github_api_calls_total", (("method", "GET"), ("status", "502")))] == 1
    # No label carries a take's unique_id or a run: the series stay few, however many jobs.
    assert not [key for key in after if any(v.count("-") == 4 for _, v in key[1])]
