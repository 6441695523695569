"""/health and the startup line on live servers: per-tier state, "degraded" when Redis is down,
and never a Redis password anywhere (health, stats, log)."""

from __future__ import annotations

import time

import httpx

from tests.proxy.conftest import BLOCK_SIZE, ServerFactory
from tests.proxy.helpers import chat_body, text
from tests.support.live_server import LiveServer
from tests.support.redis_fixtures import free_port

PASSWORD = "hunter2-not-a-real-password"


def test_health_reports_every_tier(server: LiveServer) -> None:
    body = httpx.get(server.url + "/health", timeout=5).json()
    assert body["status"] == "ok"
    assert set(body["tiers"]) == {"memory", "disk", "redis"}
    assert all(t["healthy"] for t in body["tiers"].values())
    assert body["tiers"]["redis"]["breaker"] == "closed"
    assert body["block_size"] == BLOCK_SIZE


def test_startup_line(server: LiveServer) -> None:
    line = next(ln for ln in server.log_tail(200).splitlines() if "listening on" in ln)
    for part in (
        "model demo",
        "cpu",
        "float32",
        f"block size {BLOCK_SIZE}",
        "memory",
        "disk",
        "redis",
        f"http://127.0.0.1:{server.port}",
    ):
        assert part in line, (part, line)


def test_redis_down_is_degraded_and_password_never_shows(server_factory: ServerFactory) -> None:
    # Nothing listens on that port: the Redis tier is down, yet requests still succeed.
    bad_url = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"
    srv = server_factory(
        "--no-disk",
        "--redis-url",
        bad_url,
        "--redis-prefix",
        "kvptest:never-written:",
        "--store-timeout-ms",
        "200",
    )
    body = chat_body(text(seed=150, words=60))
    for _ in range(2):
        resp = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60)
        assert resp.status_code == 200, resp.text
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        health = httpx.get(srv.url + "/health", timeout=5)
        if health.json()["status"] == "degraded":
            break
        time.sleep(0.1)
    assert health.status_code == 200
    assert health.json()["status"] == "degraded"
    assert health.json()["tiers"]["redis"]["healthy"] is False
    assert health.json()["tiers"]["memory"]["healthy"] is True
    stats = httpx.get(srv.url + "/v1/cache/stats", timeout=5)
    metrics = httpx.get(srv.url + "/metrics", timeout=5)
    for text_ in (health.text, stats.text, metrics.text, srv.log_tail(500)):
        assert PASSWORD not in text_
    assert ":***@" in health.json()["tiers"]["redis"]["url"]
    assert ":***@" in srv.log_tail(500)
