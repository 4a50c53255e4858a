"""Chromium for the browser tests: Debian's /usr/bin/chromium driven by Playwright (its browser download is never
used). Without the browser a test FAILS, because a skip would hide a broken browser path; MC_SKIP_BROWSER=1 skips
on purpose. Screenshots go to test-artifacts/."""

import os
from contextlib import contextmanager

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.path.join(REPO_ROOT, "test-artifacts")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def require_chromium() -> str:
    if os.environ.get("MC_SKIP_BROWSER") == "1":
        pytest.skip("MC_SKIP_BROWSER=1: browser test skipped on purpose")
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: run `apt-get install chromium` (Debian's browser; Playwright's "
                    "download is not used), or set MC_SKIP_BROWSER=1 to skip this test on purpose")
    return CHROMIUM


@contextmanager
def chromium_page(chromium: str, profile_dir, timeout_ms: int):
    """A fresh page of a headless Chromium with its own profile; the browser closes on exit."""
    from playwright.sync_api import sync_playwright

    os.makedirs(ARTIFACTS, exist_ok=True)
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile_dir), executable_path=chromium, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1000, "height": 700})
        try:
            page = context.new_page()
            page.set_default_timeout(timeout_ms)
            yield page
        finally:
            context.close()
