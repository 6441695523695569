"""The router's dashboard in headless Chromium (Playwright, Debian's /usr/bin/chromium), in front of
two in-process replicas with API keys and a third that never answers: after real traffic through
the router, every replica has a column with the figures its /v1/cache/stats reported (health,
requests, hit rates per tier, cached tokens, queue, memory blocks and bytes), the total column sums
them (rates over the sums), the down replica shows as down with no figures, and the routing
decisions per replica and reason are those of the router's `GET /v1/route/stats` and /metrics. A
replica whose stats failed shows why, as text; a wrong key, or a key that is not an admin key,
shows the error. Saves artifacts/route-dashboard.png."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Locator, Page

from proxy.route.replicas import Replicas
from tests.proxy.route.harness import (
    ADMIN_KEY,
    USER_KEY,
    FixedPicker,
    RouterServer,
    start_replica,
    write_api_keys,
)
from tests.proxy.test_dashboard import capture
from tests.support.browser import ARTIFACTS
from tests.support.inprocess_server import InProcessServer
from tests.support.redis_fixtures import free_port

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
EXPECTED = 16  # the cached tokens the picker promises on every request
TOTAL = "total"


@pytest.fixture(scope="module")
def pair(
    tiny_llama_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[InProcessServer, InProcessServer]]:
    keys = write_api_keys(tmp_path_factory.mktemp("dash-route-keys") / "keys.txt")
    a = start_replica(tiny_llama_path, tmp_path_factory.mktemp("dash-replica-a"), keys)
    b = start_replica(tiny_llama_path, tmp_path_factory.mktemp("dash-replica-b"), keys)
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture(scope="module")
def dead() -> str:
    """A replica URL nothing listens on: always down."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture(scope="module")
def router(pair: tuple[InProcessServer, InProcessServer], dead: str) -> Iterator[RouterServer]:
    a, b = pair
    replicas = Replicas([a.url, b.url, dead], health_interval_s=0.2)
    with RouterServer(replicas, FixedPicker(expected=EXPECTED)) as server:
        yield server


@pytest.fixture(scope="module")
def traffic(
    router: RouterServer, pair: tuple[InProcessServer, InProcessServer], tiny_llama_path: Path
) -> dict[str, int]:
    """Requests through the router (a miss then hits on each replica, several reasons); the
    cached tokens each replica reported, by replica URL."""
    a, b = pair
    cached = {a.url: 0, b.url: 0}
    plan = [(a, "memory", 0), (a, "memory", 0), (b, "cold_home", 1), (b, "cold_home", 1), (a, "key", 0)]
    for replica, reason, doc in plan:
        router.picker.order, router.picker.reason = [replica.url], reason
        text = f"Document {doc} for the router dashboard: " + " ".join(f"fact {doc}-{i}." for i in range(30))
        body = {"model": str(tiny_llama_path), "prompt": text, "max_tokens": 2, "temperature": 0}
        resp = httpx.post(
            router.url + "/v1/completions",
            json=body,
            headers={"Authorization": f"Bearer {USER_KEY}"},
            timeout=60,
        )
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-kvproxy-replica"] == replica.url
        cached[replica.url] += resp.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert all(cached.values())  # each replica restored its repeated prompt
    return cached


def stats(server: InProcessServer) -> dict[str, Any]:
    return httpx.get(server.url + "/v1/cache/stats", headers=ADMIN, timeout=10).json()


def open_with_key(
    browser: Browser, router: RouterServer, key: str, edit: Callable[[dict], None] | None = None
) -> Page:
    """The page after it asked for a key and got ``key`` (one poll per key: a long interval); its
    /v1/cache/stats answers ``edit``ed when given."""
    page = browser.new_page(viewport={"width": 1400, "height": 1400})
    if edit is not None:
        capture(page, "**/v1/cache/stats", edit)
    page.goto(router.url + "/dashboard?interval=600000")
    page.wait_for_selector("#auth.show", timeout=10_000)
    page.fill("#api-key-input", key)
    page.click("#api-key-submit")
    return page


def cell(page: Page, table: str, row: str, replica: str) -> Locator:
    return page.locator(f'#{table} tbody tr[data-row="{row}"] td[data-replica="{replica}"]')


def value(page: Page, table: str, row: str, replica: str) -> str:
    return cell(page, table, row, replica).get_attribute("data-value") or ""


def text(page: Page, table: str, row: str, replica: str) -> str:
    return cell(page, table, row, replica).text_content() or ""


def test_route_stats_counts_the_decisions(
    router: RouterServer, pair: tuple[InProcessServer, InProcessServer], dead: str, traffic: dict[str, int]
) -> None:
    a, b = pair
    body = httpx.get(router.url + "/v1/route/stats", timeout=10).json()
    assert list(body["replicas"]) == [a.url, b.url, dead]
    ra, rb, rd = (body["replicas"][u] for u in (a.url, b.url, dead))
    assert ra["decisions"] == {"memory": 2, "key": 1} and ra["routed"] == 3
    assert rb["decisions"] == {"cold_home": 2} and rb["routed"] == 2
    assert rd["decisions"] == {} and rd["routed"] == 0
    assert (ra["expected_cached_tokens"], rb["expected_cached_tokens"]) == (3 * EXPECTED, 2 * EXPECTED)
    assert (ra["cached_tokens"], rb["cached_tokens"]) == (traffic[a.url], traffic[b.url])
    assert ra["in_flight"] == rb["in_flight"] == ra["retries"] == rb["retries"] == 0
    total = body["total"]
    assert total["decisions"] == {"memory": 2, "key": 1, "cold_home": 2} and total["routed"] == 5
    assert total["cached_tokens"] == sum(traffic.values())
    # The same figures as the router's Prometheus series.
    for url, figures in body["replicas"].items():
        for reason, count in figures["decisions"].items():
            assert router.metric("kvproxy_route_decisions_total", replica=url, reason=reason) == count
        assert router.metric("kvproxy_route_cached_tokens_total", replica=url) == figures["cached_tokens"]


def test_the_router_dashboard_shows_every_replica_and_the_totals(
    router: RouterServer,
    pair: tuple[InProcessServer, InProcessServer],
    dead: str,
    traffic: dict[str, int],
    browser: Browser,
) -> None:
    a, b = pair
    page = open_with_key(browser, router, ADMIN_KEY)
    page.wait_for_function("document.getElementById('status').textContent === 'live'", timeout=10_000)
    assert not page.is_visible("#auth")
    # No traffic since the page's one poll: what it shows is what the replicas say now.
    sa, sb = stats(a), stats(b)
    shown = page.locator("#replicas thead th[data-replica]")
    assert [shown.nth(i).get_attribute("data-replica") for i in range(shown.count())] == [
        a.url,
        b.url,
        dead,
        TOTAL,
    ]
    for url, s in ((a.url, sa), (b.url, sb)):
        assert s["requests"] > 0 and s["cached_tokens"] > 0
        assert text(page, "replicas", "health", url) == "healthy"
        assert text(page, "replicas", "requests", url) == f"{s['requests']:,}"
        assert text(page, "replicas", "cached_tokens", url) == f"{s['cached_tokens']:,}"
        assert int(value(page, "replicas", "cached_tokens", url)) == s["cached_tokens"]
        assert float(value(page, "replicas", "token_hit_rate", url)) == pytest.approx(s["hit_rate"]["tokens"])
        assert text(page, "replicas", "token_hit_rate", url) == f"{s['hit_rate']['tokens'] * 100:.1f}%"
        assert text(page, "replicas", "running", url) == str(s["queue"]["running"]) == "0"
        assert text(page, "replicas", "waiting", url) == str(s["queue"]["waiting"]) == "0"
        for tier, t in s["tiers"].items():
            lookups = t["hits"] + t["misses"]
            shown_rate = value(page, "replicas", f"hit_rate:{tier}", url)
            assert (float(shown_rate) if shown_rate else None) == (
                pytest.approx(t["hits"] / lookups) if lookups else None
            )
        memory = s["tiers"]["memory"]
        assert memory["blocks"] > 0
        assert text(page, "replicas", "blocks:memory", url) == f"{memory['blocks']:,}"
        assert int(value(page, "replicas", "bytes:memory", url)) == memory["bytes"] > 0
        assert int(value(page, "replicas", "cached_tokens:memory", url)) == memory["cached_tokens"]
    # The down replica: a column that says so, and no figures.
    assert text(page, "replicas", "health", dead) == "down"
    assert text(page, "replicas", "requests", dead) == "—"
    # The totals: sums, and rates over the sums.
    both = (sa, sb)
    assert text(page, "replicas", "health", TOTAL) == "2 / 3"
    assert text(page, "replicas", "requests", TOTAL) == f"{sum(s['requests'] for s in both):,}"
    assert int(value(page, "replicas", "cached_tokens", TOTAL)) == sum(s["cached_tokens"] for s in both)
    assert int(value(page, "replicas", "prompt_tokens", TOTAL)) == sum(s["prompt_tokens"] for s in both)
    assert float(value(page, "replicas", "token_hit_rate", TOTAL)) == pytest.approx(
        sum(s["cached_tokens"] for s in both) / sum(s["prompt_tokens"] for s in both)
    )
    mem = [s["tiers"]["memory"] for s in both]
    assert float(value(page, "replicas", "hit_rate:memory", TOTAL)) == pytest.approx(
        sum(t["hits"] for t in mem) / sum(t["hits"] + t["misses"] for t in mem)
    )
    assert int(value(page, "replicas", "blocks:memory", TOTAL)) == sum(t["blocks"] for t in mem)
    assert int(value(page, "replicas", "bytes:memory", TOTAL)) == sum(t["bytes"] for t in mem)
    assert page.text_content("#tokens-saved") == f"{sum(s['cached_tokens'] for s in both):,}"
    assert page.text_content("#healthy") == "2 / 3"
    # The router's own decisions, per replica and reason.
    assert text(page, "decisions", "decision:memory", a.url) == "2"
    assert text(page, "decisions", "decision:key", a.url) == "1"
    assert text(page, "decisions", "decision:cold_home", b.url) == "2"
    assert text(page, "decisions", "decision:memory", b.url) == "0"
    assert text(page, "decisions", "routed", TOTAL) == "5"
    assert text(page, "decisions", "decision:memory", dead) == "0"
    assert int(value(page, "decisions", "expected_cached_tokens", a.url)) == 3 * EXPECTED
    assert int(value(page, "decisions", "route_cached_tokens", a.url)) == traffic[a.url]
    assert int(value(page, "decisions", "route_cached_tokens", b.url)) == traffic[b.url]
    assert int(value(page, "decisions", "route_cached_tokens", TOTAL)) == sum(traffic.values())
    assert float(value(page, "decisions", "cached_vs_expected", TOTAL)) == pytest.approx(
        sum(traffic.values()) / (5 * EXPECTED)
    )
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "route-dashboard.png"), full_page=True)
    page.close()


def test_a_replica_whose_stats_failed_shows_why_as_text(
    router: RouterServer,
    pair: tuple[InProcessServer, InProcessServer],
    traffic: dict[str, int],
    browser: Browser,
) -> None:
    """The fan-out's ``{"error": ...}`` for one replica (edited in: the real answer of a replica
    that refused or failed), with markup in it: shown as text, and the totals are the others'."""
    a, b = pair
    message = '<img src=x onerror="document.title=1"><b>bad</b> replica'

    def fail_b(body: dict) -> None:
        if b.url in body.get("replicas", {}):
            body["replicas"][b.url] = {"error": {"error": {"message": message, "type": "server_error"}}}

    page = open_with_key(browser, router, ADMIN_KEY, edit=fail_b)
    page.wait_for_function("document.getElementById('status').textContent === 'live'", timeout=10_000)
    note = page.locator(f'#replicas thead th[data-replica="{b.url}"] [data-field="error"]')
    assert note.text_content() == f"stats: {message}"
    assert page.locator("#replicas img, #replicas b").count() == 0
    assert page.title() != "1"
    assert text(page, "replicas", "health", b.url) == "healthy"  # it answers its probe
    assert text(page, "replicas", "requests", b.url) == "—"
    sa = stats(a)
    assert text(page, "replicas", "requests", TOTAL) == f"{sa['requests']:,}"
    assert int(value(page, "replicas", "cached_tokens", TOTAL)) == sa["cached_tokens"]
    page.close()


@pytest.mark.parametrize(
    ("key", "message"),
    [("sk-not-a-key", "That key was refused."), (USER_KEY, "That key is not an admin key.")],
)
def test_a_wrong_key_shows_the_error(router: RouterServer, browser: Browser, key: str, message: str) -> None:
    page = open_with_key(browser, router, key)
    page.wait_for_function(
        "want => document.getElementById('auth-error').textContent === want", arg=message, timeout=10_000
    )
    assert page.is_visible("#auth")
    assert page.text_content("#status") == "key needed"
    assert page.text_content("#replicas tbody") == "no data yet"  # nothing was shown without a key
    page.close()
