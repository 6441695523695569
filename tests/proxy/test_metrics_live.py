"""/metrics after real traffic: every counter moved by exactly what the traffic implies."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.proxy.helpers import chat_body, salt, text
from tests.support.live_server import LiveServer

CHAT = "/v1/chat/completions"


def scrape(server: LiveServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    resp = httpx.get(server.url + "/metrics", timeout=10)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_counters_move_by_the_right_amounts(server: LiveServer) -> None:
    before = scrape(server)
    body = chat_body("quetzalcoatl-marker " + text(seed=80, words=100), cache_salt=salt())
    first = httpx.post(server.url + CHAT, json=body, timeout=60).json()["usage"]
    second = httpx.post(server.url + CHAT, json=body, timeout=60).json()["usage"]
    assert httpx.post(server.url + CHAT, json={"model": "demo"}, timeout=10).status_code == 400
    after = scrape(server)
    stats_text = httpx.get(server.url + "/v1/cache/stats", timeout=10).text
    assert "quetzalcoatl" not in stats_text and "quetzalcoatl" not in str(after), "no prompt text, ever"

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("kvproxy_requests_total", route=CHAT, status="200") == 2
    assert delta("kvproxy_requests_total", route=CHAT, status="400") == 1
    assert delta("kvproxy_prompt_tokens_total") == first["prompt_tokens"] + second["prompt_tokens"]
    cached = second["prompt_tokens_details"]["cached_tokens"]
    assert cached > 0
    assert delta("kvproxy_cached_tokens_total", tier="memory") == cached
    assert delta("kvproxy_ttft_seconds_count", cache="miss") == 1
    assert delta("kvproxy_ttft_seconds_count", cache="hit") == 1
    # Tier figures come from the stores themselves.
    assert value(after, "kvproxy_cache_blocks", tier="memory") > 0
    assert value(after, "kvproxy_cache_bytes", tier="disk") > 0
    assert ("kvproxy_cache_evictions_total", (("tier", "redis"),)) in after
    assert delta("kvproxy_store_seconds_count", tier="memory", op="put") >= 1
    assert value(after, "kvproxy_store_seconds_count", tier="redis", op="put") >= 1
    assert value(after, "kvproxy_store_errors_total", tier="redis", op="put") == 0
