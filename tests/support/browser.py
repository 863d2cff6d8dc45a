"""Debian's headless Chromium driven by Playwright (`executable_path`: no browser is
downloaded), for the browser tests: the `browser` (one per module) and `open_page` fixtures
of `browser_fixtures()`. Import this module only after
`pytest.importorskip("playwright.sync_api")`, unless MONITOR_REQUIRE_BROWSER=1.

Skips without Playwright or Chromium (`/usr/bin/chromium`, or `MONITOR_CHROMIUM`), unless
MONITOR_REQUIRE_BROWSER=1 makes that a failure. A full-page screenshot of every page a test
opened is kept in `MONITOR_TEST_ARTIFACTS` (default `test-artifacts/browser/`), pass or fail;
a page's uncaught script error or Content-Security-Policy violation fails its test.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser
from playwright.sync_api import Page
from playwright.sync_api import sync_playwright

from tests.support.constants import ROOT

REQUIRE_BROWSER = os.environ.get("MONITOR_REQUIRE_BROWSER") == "1"
CHROMIUM = Path(os.environ.get("MONITOR_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = Path(os.environ.get("MONITOR_TEST_ARTIFACTS", ROOT / "test-artifacts" / "browser"))
# real-components.md §4: what Debian's Chromium needs to run headless here, as root.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 10_000  # anything a browser test waits for: generous, only proves that it happens


def require_browser(reason: str) -> None:
    message = f"{reason}; the browser tests drive Debian's Chromium (apt-get install chromium)"
    if REQUIRE_BROWSER:
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class Opened:
    """A page and what it reported: dialogs (alert, confirm…) and uncaught script errors."""

    page: Page
    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def browser_fixtures() -> tuple[Any, Any]:
    """The `browser` (one per module) and `open_page` fixtures, for a test module to bind:
    `browser, open_page = browser_fixtures()`."""

    # Per module: Playwright's sync API allows one running instance per thread, and each
    # module binding these fixtures gets fixtures of its own.
    @pytest.fixture(scope="module")
    def browser() -> Iterator[Browser]:
        if not os.access(CHROMIUM, os.X_OK):
            require_browser(f"no Chromium at {CHROMIUM} (set MONITOR_CHROMIUM to use another)")
        playwright = sync_playwright().start()
        try:
            launched = playwright.chromium.launch(
                executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS
            )
        except Exception as error:  # noqa: BLE001 - any launch failure means "no usable browser"
            playwright.stop()
            require_browser(f"cannot launch {CHROMIUM}: {error}")
        yield launched
        launched.close()
        playwright.stop()

    @pytest.fixture
    def open_page(
        browser: Browser, request: pytest.FixtureRequest
    ) -> Iterator[Callable[..., Opened]]:
        """Opens pages in fresh browser contexts; at teardown saves a full-page screenshot of
        each (named after the test), and reports an error if a page had an uncaught script
        error or its Content-Security-Policy blocked something."""
        opened: list[Opened] = []

        def open_(url: str, **context_options: Any) -> Opened:
            context_options.setdefault("viewport", {"width": 1280, "height": 900})
            context = browser.new_context(**context_options)
            context.set_default_timeout(WAIT_MS)
            page = context.new_page()
            result = Opened(page)

            def on_dialog(dialog: Any) -> None:
                result.dialogs.append(f"{dialog.type}: {dialog.message}")
                dialog.dismiss()

            page.on("dialog", on_dialog)
            page.on("pageerror", lambda error: result.errors.append(str(error)))
            # What the Content-Security-Policy blocked is only a console message.
            page.on(
                "console",
                lambda message: (
                    result.errors.append(message.text)
                    if "Content Security Policy" in message.text
                    else None
                ),
            )
            opened.append(result)
            page.goto(url)
            return result

        yield open_
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
        for number, result in enumerate(opened):
            suffix = f"-{number + 1}" if len(opened) > 1 else ""
            result.page.screenshot(path=str(ARTIFACTS / f"{name}{suffix}.png"), full_page=True)
            result.page.context.close()
        errors = [error for result in opened for error in result.errors]
        assert not errors, f"uncaught script errors on the page: {errors}"

    return browser, open_page
