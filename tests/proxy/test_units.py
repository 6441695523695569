"""Small pure pieces: hit classification, the request log, per-app metrics registries."""

from __future__ import annotations

import pytest

from proxy.metrics import Metrics, TierFigures
from proxy.request_log import RequestLog, RequestRecord, classify


@pytest.mark.parametrize(
    ("prompt", "cached", "reason", "expected"),
    [
        (100, 0, "no_shared_prefix", "miss"),
        (10, 0, "short_prompt", "miss"),
        (64, 63, "full_hit", "hit"),  # whole prompt matched, cropped by one token
        (100, 96, "full_hit", "hit"),
        (100, 32, "diverged", "partial"),
    ],
)
def test_classify(prompt: int, cached: int, reason: str, expected: str) -> None:
    assert classify(prompt, cached, 16, reason) == expected


def _record(prompt: int, cached: int, cache: str, ttft: float) -> RequestRecord:
    return RequestRecord(
        at=0.0,
        route="/v1/completions",
        tenant="t",
        prompt_tokens=prompt,
        cached_tokens=cached,
        completion_tokens=2,
        cached_by_tier={"memory": cached} if cached else {},
        cache=cache,
        miss_reason=None,
        miss_block=None,
        ttft_ms=ttft,
        finish_reason="length",
    )


def test_request_log_rates_and_recent_order() -> None:
    log = RequestLog(capacity=2)
    log.add(_record(100, 0, "miss", 50.0))
    log.add(_record(100, 96, "hit", 10.0))
    log.add(_record(100, 48, "partial", 30.0))
    summary = log.summary()
    assert summary["hit_rate"] == {"tokens": 144 / 300, "requests": 2 / 3}
    assert summary["ttft_ms"] == {"hit": 10.0, "partial": 30.0, "miss": 50.0}
    assert [r["cache"] for r in summary["recent"]] == ["partial", "hit"]  # newest first, bounded
    assert summary["cached_tokens_by_tier"] == {"memory": 144}


def test_metrics_registries_are_per_app() -> None:
    a, b = Metrics(), Metrics()  # would raise "Duplicated timeseries" on a global registry
    a.observe_request("/v1/completions", 200)
    a.watch_tiers(lambda: {"memory": TierFigures(3, 300, 1)})
    text_a, text_b = a.render().decode(), b.render().decode()
    assert 'kvproxy_requests_total{route="/v1/completions",status="200"} 1.0' in text_a
    assert 'kvproxy_cache_blocks{tier="memory"} 3.0' in text_a
    assert 'kvproxy_cache_evictions_total{tier="memory"} 1.0' in text_a
    assert "kvproxy_requests_total{" not in text_b
