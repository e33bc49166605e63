"""The browser side of the dashboard's end-to-end tests: Debian's chromium launched through Playwright, a sign-in at
`/ui/` with a token that records the page's console errors and requests, the checks every page load gets, and the
screenshot folder (`test-output/dashboard/` at the repository root, gitignored).

Used by tests/e2e/test_dashboard.py (a simulated fleet) and tests/e2e/test_federated.py (a real Flower run's page).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tests.services import unavailable

CHROMIUM = Path(os.environ.get("EDGEFLEET_CHROMIUM", "/usr/bin/chromium"))
SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-output" / "dashboard"
LAPTOP = {"width": 1366, "height": 768}
# What a page must never show: a value the code failed to turn into text.
GARBAGE = re.compile(r"\[object \w+\]|\bundefined\b|\bNaN\b|^null$", re.MULTILINE)
PLAYWRIGHT_WHY = "the dashboard tests drive chromium with Playwright (dev extra)"


@dataclass
class Visit:
    """A browser page signed in with one token, with what it logged and requested."""

    page: Any
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def shot(self, name: str) -> Path:
        """Check that the page fits a laptop screen's width (no sideways scrolling), then save a full-page screenshot
        as `test-output/dashboard/<name>.png`."""
        width = self.page.evaluate("document.documentElement.scrollWidth")
        assert width <= LAPTOP["width"], (
            f"{name}: the page is {width} px wide, wider than a {LAPTOP['width']} px screen"
        )
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def go(self, hash_path: str, ready: str) -> None:
        """Open `#<hash_path>` and wait until `ready` (a selector) shows and the page was refreshed from the API."""
        self.page.evaluate("h => { location.hash = h }", hash_path)
        self.page.wait_for_selector(ready, timeout=15_000)
        self.page.wait_for_selector("#stamp:text-matches('^updated')", timeout=15_000)
        self.assert_readable(hash_path)

    def assert_readable(self, where: str) -> None:
        """Every status on the page is a symbol and a word (colour only adds to it), and no value was left unformatted
        (`null`, `undefined`, `[object ...]`)."""
        shown = self.page.evaluate("[...document.querySelectorAll('.status')].map(e => e.textContent)")
        unreadable = [text for text in shown if not re.fullmatch(r"[^\w\s]+ \w[\w ]*", text)]
        assert not unreadable, f"{where}: statuses without a symbol and a word: {unreadable}"
        garbage = GARBAGE.findall(self.page.inner_text("#view"))
        assert not garbage, f"{where}: unformatted values on the page: {garbage}"

    def assert_clean(self) -> None:
        """No console error, and every request went to 127.0.0.1."""
        assert not self.errors, f"console errors: {self.errors}"
        elsewhere = [u for u in self.requests if u.startswith("http") and urlsplit(u).hostname != "127.0.0.1"]
        assert not elsewhere, f"requests leaving 127.0.0.1: {elsewhere}"
        assert any("/api/v1/" in u for u in self.requests), "the page read nothing from the API"


def browser_missing() -> str | None:
    """Why this machine cannot drive a browser (Playwright or chromium absent), or None when it can."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as exc:
        return f"playwright.sync_api is not installed ({exc}): {PLAYWRIGHT_WHY}"
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} is not installed (`apt-get install chromium`; .ci/run installs it)"
    return None


@contextmanager
def chromium() -> Iterator[Any]:
    """Headless chromium (Debian's, not a downloaded one) driven by Playwright; skips the test (fails it under CI)
    when either is missing."""
    if reason := browser_missing():
        unavailable(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where chromium's sandbox refuses to start.
        instance = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        try:
            yield instance
        finally:
            instance.close()


@contextmanager
def signing_in(browser: Any, url: str) -> Iterator[Callable[[str], Visit]]:
    """A function that opens the dashboard at `<url>/ui/` in a fresh browser context and signs in with a token through
    the login form, recording the page's console errors and requests; the contexts close on exit."""
    contexts: list[Any] = []

    def open_as(token: str) -> Visit:
        context = browser.new_context(viewport=LAPTOP)
        contexts.append(context)
        page = context.new_page()
        visit = Visit(page)
        page.on("console", lambda m: visit.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: visit.errors.append(str(e)))
        page.on("request", lambda r: visit.requests.append(r.url))
        page.goto(f"{url}/ui/")
        page.fill("#token", token)
        page.click("#login button[type=submit]")
        return visit

    try:
        yield open_as
    finally:
        for context in contexts:
            context.close()
