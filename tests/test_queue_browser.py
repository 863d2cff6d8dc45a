"""The queue page in a real browser (Debian's headless Chromium through Playwright, see
tests/support/browser.py: a Content-Security-Policy violation or script error fails the
test), served by waitress from a bottle app with the queue's view routes over a fake engine
whose snapshot the test changes."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

import pytest

if os.environ.get("MONITOR_REQUIRE_BROWSER") != "1":
    pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')"
    )

from playwright.sync_api import expect  # noqa: E402

from monitor.errors import MonitorError  # noqa: E402
from monitor.serving import BackgroundServer  # noqa: E402
from tests.support.browser import browser_fixtures  # noqa: E402
from tests.support.queue_views import MEMBER_A  # noqa: E402
from tests.support.queue_views import MEMBER_B  # noqa: E402
from tests.support.queue_views import FakeEngine  # noqa: E402
from tests.support.queue_views import entry  # noqa: E402
from tests.support.queue_views import member  # noqa: E402
from tests.support.queue_views import snapshot  # noqa: E402
from tests.support.queue_views import view_app  # noqa: E402

browser, open_page = browser_fixtures()

LINUX = "servo-ubuntu2204"
LIVE_DEADLINE_MS = 3_000  # the page polls every second: a change shows within a few
MEMBERS = [
    member(MEMBER_A, **{LINUX: (0, 2, 2)}),
    member(MEMBER_B, fresh=False, polled=-30.0, error="connection refused", **{LINUX: (1, 1, 2)}),
]


def waiting(*unique_ids: str) -> Any:
    entries = [
        entry(uid, seq=n, run_id=str(1000 + n), enqueued=float(n))
        for n, uid in enumerate(unique_ids, start=1)
    ]
    return snapshot(entries, MEMBERS, outcomes={"served": 3})


@pytest.fixture
def queue() -> Iterator[tuple[FakeEngine, str]]:
    engine = FakeEngine(waiting("first", "second", "third"))
    app, _ = view_app(engine)
    server = BackgroundServer(app, name="queue-browser-http")
    try:
        yield engine, server.url + "/"
    finally:
        server.close()


def shown_order(page: Any) -> list[str]:
    return page.locator("tr.entry").evaluate_all("rows => rows.map(r => r.dataset.uniqueId)")


def test_page_shows_entries_in_order_and_updates_live(queue, open_page):
    engine, url = queue
    page = open_page(url).page
    rows = page.locator("tr.entry")

    expect(rows).to_have_count(3)
    assert shown_order(page) == ["first", "second", "third"]
    assert rows.locator("th.position").all_inner_texts() == ["1", "2", "3"]
    first = page.locator('tr.entry[data-unique-id="first"]')
    expect(first.locator("a.run-link")).to_have_attribute(
        "href", "https://github.com/servo/servo/actions/runs/1001"
    )
    # The waiting time is counted up by the page's script.
    expect(first.locator("td.waiting")).to_have_text(re.compile(r"^\d+(s|m\d\ds|h\d\dm)$"))
    # Members: per-profile counts, and whether their data is fresh, as text.
    member_a = page.locator(f'tr.member[data-member="{MEMBER_A}"]')
    expect(member_a.locator("td.freshness")).to_contain_text("fresh")
    expect(member_a.locator("td.target")).to_have_text("2")
    member_b = page.locator(f'tr.member[data-member="{MEMBER_B}"]')
    expect(member_b.locator("td.freshness")).to_contain_text("stale")
    expect(page.locator("p.notice.stale")).to_contain_text("connection refused")
    page.evaluate("() => { window.__noReload = 1; }")

    # The head is served, a new entry arrives, and a priority entry overtakes the rest.
    served = entry("first", seq=1, run_id="1001", enqueued=1.0, served=4.2, state="served",
                   reserved={MEMBER_A: [5]})  # fmt: skip
    urgent = entry("urgent", seq=9, run_id="1009", enqueued=9.0, priority=5)
    later = waiting("second", "third", "fourth")
    engine.current = snapshot(
        [urgent, *later.entries], MEMBERS, recent=[served], outcomes={"served": 4}
    )

    expect(page.locator('tr.entry[data-unique-id="urgent"]')).to_have_attribute(
        "data-position", "1", timeout=LIVE_DEADLINE_MS
    )
    assert shown_order(page) == ["urgent", "second", "third", "fourth"]
    expect(page.locator('tr.entry[data-unique-id="urgent"] td.state')).to_contain_text("priority 5")
    assignment = page.locator('tr.assignment[data-unique-id="first"]')
    expect(assignment.locator("td.wait")).to_have_text("3.2 s")
    expect(assignment.locator("td.on")).to_have_text(MEMBER_A)
    expect(page.locator('li.outcome[data-outcome="served"]')).to_contain_text("4")
    assert page.evaluate("() => window.__noReload") == 1, "the page was reloaded"
    expect(page.locator("#notice")).to_be_hidden()


def test_page_says_when_the_queue_cannot_answer(queue, open_page):
    engine, url = queue
    page = open_page(url).page
    expect(page.locator("tr.entry")).to_have_count(3)

    engine.failure = MonitorError("the queue's store is unreachable", 503)

    notice = page.locator("#notice")
    expect(notice).to_be_visible(timeout=LIVE_DEADLINE_MS)
    expect(notice).to_contain_text("HTTP 503")
    expect(page.locator("tr.entry")).to_have_count(3)  # the last view is kept

    engine.failure = None
    expect(notice).to_be_hidden(timeout=LIVE_DEADLINE_MS)


def test_page_fits_a_phone(queue, open_page):
    page = open_page(
        queue[1], viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True
    ).page
    expect(page.locator("tr.entry")).to_have_count(3)
    overflow = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 1, f"the page is {overflow} px wider than the phone"
