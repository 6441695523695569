"""The dashboard in headless Chromium (Playwright, Debian's /usr/bin/chromium): after real
traffic it shows the same hit rate as /v1/cache/stats, and its chart gains points as traffic
continues, without a reload. Saves artifacts/dashboard.png."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from tests.proxy.helpers import chat_body, salt, text
from tests.support.live_server import LiveServer

CHROMIUM = os.environ.get("KVPROXY_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"no Chromium at {CHROMIUM}: install it with `apt-get install -y chromium` "
            "(or run scripts/services.sh)",
            pytrace=False,
        )
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


def traffic(server: LiveServer, seed: int) -> None:
    body = chat_body(text(seed=seed, words=90), cache_salt=salt())
    for _ in range(2):  # a miss, then a hit
        assert httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).status_code == 200


def stats(server: LiveServer) -> dict:
    return httpx.get(server.url + "/v1/cache/stats", timeout=10).json()


def points(page: Page) -> int:
    return int(page.get_attribute("#hit-rate-chart", "data-points") or 0)


def test_dashboard_shows_live_stats(server: LiveServer, browser: Browser) -> None:
    traffic(server, seed=90)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(server.url + "/dashboard?interval=300")
    expected = f"{stats(server)['hit_rate']['tokens'] * 100:.1f}%"
    page.wait_for_function("document.getElementById('status').textContent === 'live'", timeout=10_000)
    page.wait_for_function(
        "want => document.getElementById('hit-rate').textContent === want", arg=expected, timeout=10_000
    )
    assert page.text_content("#hit-rate") == expected
    s = stats(server)
    assert page.text_content("#tokens-saved") == f"{s['cached_tokens']:,}"
    assert page.locator("#tiers tbody tr[data-tier]").count() == len(s["tiers"]) == 3
    assert page.text_content("#redis-health") == "healthy"
    assert page.locator("#recent tbody tr[data-cache='hit']").count() >= 1
    page.wait_for_function("document.getElementById('hit-rate-chart').dataset.points >= 1", timeout=10_000)
    before = points(page)

    traffic(server, seed=91)  # more traffic, no reload
    page.wait_for_function(
        "n => Number(document.getElementById('hit-rate-chart').dataset.points) > n",
        arg=before,
        timeout=10_000,
    )
    assert points(page) > before
    expected = f"{stats(server)['hit_rate']['tokens'] * 100:.1f}%"
    page.wait_for_function(
        "want => document.getElementById('hit-rate').textContent === want", arg=expected, timeout=10_000
    )
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    page.close()


def test_dashboard_asks_for_an_admin_key(browser: Browser, session_server_factory, tmp_path_factory) -> None:
    keys = tmp_path_factory.mktemp("dash-keys") / "keys.txt"
    keys.write_text("sk-admin-0123456789 ops admin\nsk-user-0123456789 app\n")
    server = session_server_factory("--no-disk", "--api-keys", str(keys))
    page = browser.new_page()
    page.goto(server.url + "/dashboard?interval=300")
    page.wait_for_selector("#auth.show", timeout=10_000)
    page.fill("#api-key-input", "sk-user-0123456789")
    page.click("#api-key-submit")
    page.wait_for_function(
        "document.getElementById('auth-error').textContent.includes('not an admin')", timeout=10_000
    )
    page.fill("#api-key-input", "sk-admin-0123456789")
    page.click("#api-key-submit")
    page.wait_for_function("document.getElementById('status').textContent === 'live'", timeout=10_000)
    assert page.evaluate("sessionStorage.getItem('kvproxy.apiKey')") == "sk-admin-0123456789"
    assert not page.is_visible("#auth")
    page.close()
