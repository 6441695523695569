"""The dashboard in headless Chromium (Playwright, Debian's /usr/bin/chromium): after real
traffic it shows the same hit rate as /v1/cache/stats, and its chart gains points as traffic
continues, without a reload; its batch panel shows the running and waiting requests, tokens per
step and output tokens per second that /v1/cache/stats reported to it, and says when admission
waits on the K/V budget or requests run one at a time; its pins panel lists a pin made through
the API with its tenant and tokens, and the pinned bytes the kvproxy_pinned_bytes gauge reports.
Saves artifacts/dashboard.png (and -kv-full, -pins)."""

from __future__ import annotations

import time
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal

import httpx
from playwright.sync_api import Browser, Page, Route

from tests.proxy.helpers import chat_body, salt, text
from tests.support.browser import ARTIFACTS
from tests.support.live_server import LiveServer


def traffic(server: LiveServer, seed: int) -> None:
    body = chat_body(text(seed=seed, words=90), cache_salt=salt())
    for _ in range(2):  # a miss, then a hit
        assert httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).status_code == 200


def stats(server: LiveServer) -> dict:
    return httpx.get(server.url + "/v1/cache/stats", timeout=10).json()


def points(page: Page) -> int:
    return int(page.get_attribute("#hit-rate-chart", "data-points") or 0)


def fixed1(x: float) -> str:
    """JavaScript's ``x.toFixed(1)``: the exact binary value, a tie rounded away from zero
    (Python's ``f"{x:.1f}"`` rounds a tie such as 12.25 to even)."""
    return str(Decimal(x).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP))


def wait_idle(server: LiveServer, timeout_s: float = 10.0) -> dict:
    """The batch once nothing runs or waits (the last request's slot is freed after its answer)."""
    deadline = time.monotonic() + timeout_s
    while True:
        batch = stats(server)["batch"]
        if batch["running"] == 0 and batch["waiting"] == 0:
            return batch
        if time.monotonic() > deadline:
            raise AssertionError(f"the batch did not go idle within {timeout_s}s: {batch}")
        time.sleep(0.05)


def capture_stats(page: Page, edit: Callable[[dict], None] | None = None) -> list[dict]:
    """Every /v1/cache/stats answer the page gets, as the server gave it (then ``edit``ed)."""
    return capture(page, "**/v1/cache/stats", edit)


def capture(page: Page, pattern: str, edit: Callable[[dict], None] | None = None) -> list[dict]:
    """Every answer to requests matching ``pattern`` the page gets (then ``edit``ed)."""
    seen: list[dict] = []

    def handle(route: Route) -> None:
        response = route.fetch()
        body = response.json()
        if edit is not None:
            edit(body)
        seen.append(body)
        route.fulfill(response=response, json=body)

    page.route(pattern, handle)
    return seen


def js_bytes(n: int) -> str:
    """The page's ``bytes(n)``: 1024-based units, one decimal above bytes."""
    if not n:
        return "0 B"
    units, value, i = ["B", "KiB", "MiB", "GiB", "TiB"], float(n), 0
    while value >= 1024 and i < len(units) - 1:
        value, i = value / 1024, i + 1
    return f"{fixed1(value) if i else n} {units[i]}"


def pinned_bytes_gauge(server: LiveServer) -> int:
    for line in httpx.get(server.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("kvproxy_pinned_bytes "):
            return int(float(line.split()[1]))
    raise AssertionError("no kvproxy_pinned_bytes in /metrics")


def open_once(
    browser: Browser, server: LiveServer, edit: Callable[[dict], None] | None = None
) -> tuple[Page, dict]:
    """The dashboard after its first poll, with a poll interval long enough that it shows
    exactly the one /v1/cache/stats answer it was given."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    seen = capture_stats(page, edit)
    page.goto(server.url + "/dashboard?interval=600000")
    page.wait_for_function("document.getElementById('status').textContent === 'live'", timeout=10_000)
    assert len(seen) == 1
    return page, seen[0]


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
    # The pins were fetched with the same key: the empty state, not an HTTP 401.
    assert page.get_attribute("#pins", "data-count") == "0"
    assert page.text_content("#pins-table tbody") == "no pins"
    assert page.text_content("#pins-count") == "0 pins"
    page.close()


def test_dashboard_shows_the_batch(server: LiveServer, browser: Browser) -> None:
    traffic(server, seed=92)
    idle = wait_idle(server)
    page, shown = open_once(browser, server)
    b = shown["batch"]
    assert page.is_visible("#batch")
    # The server is idle: the page shows what the stats said, and that is still what they say.
    assert (b["running"], b["waiting"]) == (idle["running"], idle["waiting"]) == (0, 0)
    assert page.text_content("#batch-running") == f"{b['running']:,}" == "0"
    assert page.text_content("#batch-waiting") == f"{b['waiting']:,}" == "0"
    now = stats(server)["batch"]
    assert page.text_content("#batch-running") == f"{now['running']:,}"
    assert page.text_content("#batch-waiting") == f"{now['waiting']:,}"
    # Figures over the last seconds: the traffic above is in the window, so they are not zero.
    recent = b["recent"]
    assert recent["steps"] > 0 and recent["tokens_per_step"] > 0 and recent["output_tokens_per_s"] > 0
    assert page.text_content("#batch-tokens-per-step") == fixed1(recent["tokens_per_step"])
    assert page.text_content("#batch-output-tps") == fixed1(recent["output_tokens_per_s"])
    assert b["kv_budget_bytes"] > 0
    assert page.text_content("#batch-kv") == fixed1(b["kv_used_bytes"] / b["kv_budget_bytes"] * 100) + "%"
    assert page.get_attribute("#batch-kv", "data-used") == str(b["kv_used_bytes"])
    assert page.get_attribute("#batch-kv", "data-budget") == str(b["kv_budget_bytes"])
    # The mode and the K/V wait as the server reports them.
    if b["batched"]:
        assert page.text_content("#batch-mode") == "batched"
    else:
        assert page.text_content("#batch-mode") == f"requests run one at a time: {b['batching_reason']}"
    assert page.is_visible("#batch-kv-wait") == b["waiting_for_kv"]
    assert page.get_attribute("#batch", "data-kv-wait") == str(b["waiting_for_kv"]).lower()
    page.close()


def test_dashboard_says_when_admission_waits_and_requests_run_alone(
    server: LiveServer, browser: Browser
) -> None:
    """States a small test server does not reach on its own: the real answer, edited."""
    reason = "the attention layers cannot be packed into one step"

    def full(body: dict) -> None:
        body["batch"].update(
            batched=False,
            batching_reason=reason,
            running=1,
            waiting=3,
            waiting_for_kv=True,
            waiting_on_blocks=5,
            kv_used_bytes=3 * 2**30,
            kv_budget_bytes=4 * 2**30,
        )

    page, shown = open_once(browser, server, edit=full)
    assert page.is_visible("#batch-kv-wait")
    assert page.text_content("#batch-kv-wait") == "admission waiting: K/V budget full"
    assert page.text_content("#batch-mode") == f"requests run one at a time: {reason}"
    assert page.text_content("#batch-running") == "1"
    assert page.text_content("#batch-waiting") == "3"
    assert page.text_content("#batch-kv") == "75.0%"
    assert page.text_content("#batch-kv-detail") == "3.0 GiB / 4.0 GiB"
    assert page.get_attribute("#batch", "data-batched") == "false"
    assert page.get_attribute("#batch", "data-kv-wait") == "true"
    assert shown["batch"]["waiting_for_kv"] is True
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-kv-full.png"), full_page=True)
    page.close()


def test_dashboard_lists_pins(server: LiveServer, browser: Browser) -> None:
    tenant = "dash-pins"
    resp = httpx.post(
        server.url + "/v1/cache/pins",
        json={"prompt": text(seed=94, words=90), "ttl_s": 300, "tenant": tenant, "cache_salt": salt()},
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    made = resp.json()["pin"]
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        seen = capture(page, "**/v1/cache/pins")
        page.goto(server.url + "/dashboard?interval=600000")
        page.wait_for_function("document.getElementById('status').textContent === 'live'", timeout=10_000)
        assert len(seen) == 1
        shown = seen[0]
        row = page.locator(f"#pins-table tbody tr[data-pin-id='{made['id']}']")
        assert row.count() == 1
        assert row.locator("[data-field='tenant']").text_content() == tenant
        assert row.locator("[data-field='tokens']").text_content() == f"{made['tokens']:,}"
        assert row.locator("[data-field='bytes']").text_content() == js_bytes(made["bytes"])
        assert page.locator("#pins-table tbody tr[data-pin-id]").count() == len(shown["pins"])
        # The pinned bytes of the max: what the page was given, and what the gauge says.
        used, limit = shown["pinned_bytes"], shown["max_pinned_bytes"]
        assert used >= made["bytes"] and limit > 0
        assert page.get_attribute("#pins", "data-pinned-bytes") == str(used)
        assert used == pinned_bytes_gauge(server)
        assert page.text_content("#pins-bytes") == f"{js_bytes(used)} / {js_bytes(limit)}"
        ARTIFACTS.mkdir(exist_ok=True)
        page.locator("#pins").screenshot(path=str(ARTIFACTS / "dashboard-pins.png"))
        page.close()
    finally:
        httpx.delete(server.url + f"/v1/cache/pins/{made['id']}", timeout=10)
