"""A real Redis that is down at start, SIGKILLed mid-traffic, restarted and filled up: every request
still succeeds (by recomputing) within the store timeout + its recompute time + 1 s, with the same
output as a clean run; the breaker opens and closes again, /health and /v1/cache/stats say so,
and hits come back once Redis does.

One kvproxy server and one private redis-server for the whole module (a server start costs ~10 s
on 2 cores); each test first puts Redis in the state it needs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.proxy.helpers import expected_cached
from tests.reliability.conftest import BLOCK_SIZE, ServerFactory
from tests.reliability.helpers import Reply, chat, chat_body, clean_reference, metric_total, salt, text
from tests.support.live_server import LiveServer
from tests.support.redis_fixtures import RedisServer

TIMEOUT_MS = 200
COOLDOWN_S = 1.0
BLOCK_BYTES = 65_536 + 2048  # one demo-model block record of 16 tokens, header included (about)
# Memory holds only ~3 blocks, so most of a prompt's prefix has to come back from Redis.
MEMORY_BYTES = 3 * BLOCK_BYTES
SLACK_S = 1.0


@dataclass
class Rig:
    redis: RedisServer
    server: LiveServer

    def health(self) -> dict[str, Any]:
        return self.server.get_json("/health")

    def redis_state(self) -> dict[str, Any]:
        return dict(self.health()["tiers"]["redis"])

    def ensure_redis_up(self) -> None:
        """Redis running and the breaker closed again (a request drives the half-open trial)."""
        self.redis.start()
        with self.redis.client() as client:
            client.config_set("maxmemory", 0)
        deadline = time.monotonic() + 10 * COOLDOWN_S + 10
        while time.monotonic() < deadline:
            if self.redis_state()["breaker"] == "closed" and self.redis_state()["healthy"]:
                return
            chat(self.server, chat_body(text(seed=1, words=40), cache_salt=salt()))
            time.sleep(0.1)
        raise AssertionError(f"the Redis breaker did not close: {self.redis_state()}")


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, module_server_factory: ServerFactory) -> Iterator[Rig]:
    redis = RedisServer(tmp_path_factory.mktemp("redis-outage"))  # not started: down at start
    server = module_server_factory(
        "--no-disk",
        "--redis-url", redis.url,
        "--redis-prefix", "kvp:rel:",
        "--store-timeout-ms", str(TIMEOUT_MS),
        "--breaker-cooldown-s", str(COOLDOWN_S),
        "--memory-bytes", str(MEMORY_BYTES),
    )  # fmt: skip
    yield Rig(redis, server)
    redis.resume()
    redis.kill()


def within_bound(reply: Reply, reference: Reply) -> None:
    bound = TIMEOUT_MS / 1000 + reference.seconds + SLACK_S
    assert reply.seconds <= bound, f"{reply.seconds:.2f}s > bound {bound:.2f}s"


def test_redis_down_at_start_then_back(rig: Rig) -> None:
    assert not rig.redis.running
    # Served while Redis has never been reachable: recomputed, correct, bounded.
    for seed in range(3):
        body = chat_body(text(seed=100 + seed, words=60))
        reply = chat(rig.server, body)
        reference = clean_reference(rig.server, body)
        assert reply.text == reference.text
        within_bound(reply, reference)
    state = rig.redis_state()
    assert state["breaker"] in ("open", "half_open") and not state["healthy"], state
    assert rig.health()["status"] == "degraded"
    stats = rig.server.get_json("/v1/cache/stats")
    assert stats["tiers"]["redis"]["breaker"] in ("open", "half_open")
    assert sum(stats["tiers"]["redis"]["errors"].values()) > 0
    assert metric_total(
        httpx.get(rig.server.url + "/metrics").text, "kvproxy_store_errors_total", tier="redis"
    )

    rig.ensure_redis_up()  # the breaker closes after the cooldown, on the first good call
    assert rig.health()["status"] == "ok"
    redis_stats = rig.server.get_json("/v1/cache/stats")["tiers"]["redis"]
    assert redis_stats["breaker"] == "closed" and redis_stats["healthy"], redis_stats
    body = chat_body(text(seed=110, words=120))
    first = chat(rig.server, body)
    rig.server.wait_written()
    again = chat(rig.server, body)
    assert again.text == first.text
    assert again.by_tier.get("redis", 0) > 0, again.usage
    assert again.cached == expected_cached(again.usage["prompt_tokens"])


def test_redis_killed_mid_traffic_and_restarted(rig: Rig) -> None:
    rig.ensure_redis_up()
    bodies = [chat_body(text(seed=200 + i, words=100)) for i in range(4)]
    references = [clean_reference(rig.server, body) for body in bodies]
    replies: list[tuple[int, Reply]] = []
    failures: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        i = 0
        while not stop.is_set():
            try:
                replies.append((i % len(bodies), chat(rig.server, bodies[i % len(bodies)])))
            except (AssertionError, httpx.HTTPError) as exc:
                failures.append(repr(exc))
            i += 1

    client = threading.Thread(target=traffic, name="traffic", daemon=True)
    client.start()
    try:
        time.sleep(1.5)  # hits from Redis are flowing
        log_before = len(rig.server.log_text().splitlines())
        rig.redis.kill()
        killed_at = len(replies)
        time.sleep(3.5)  # several breaker cooldowns: half-open trials fail and reopen it
        state = rig.redis_state()
        assert state["breaker"] in ("open", "half_open") and not state["healthy"], state
        assert rig.health()["status"] == "degraded"
        rig.redis.start()
        deadline = time.monotonic() + 10
        while rig.redis_state()["breaker"] != "closed" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert rig.redis_state()["breaker"] == "closed", "the breaker did not close under traffic"
        time.sleep(1.0)
    finally:
        stop.set()
        client.join(timeout=30)
    assert not failures, failures[:3]
    assert len(replies) > killed_at > 0
    # One outage, one warning (not one per failed half-open trial), and one line when it ends.
    outage_log = rig.server.log_text().splitlines()[log_before:]
    warnings = [line for line in outage_log if "WARNING" in line and "redis" in line]
    assert len(warnings) == 1, warnings
    assert any("INFO" in line and "available again" in line for line in outage_log), outage_log[-5:]
    for index, reply in replies:
        assert reply.text == references[index].text
        within_bound(reply, references[index])
    assert any(r.by_tier.get("redis") for _, r in replies[:killed_at]), "no Redis hits before the kill"
    # Hits come back from Redis once it is back (it restarted empty: write, then read back).
    body = chat_body(text(seed=220, words=120))
    chat(rig.server, body)
    rig.server.wait_written()
    assert chat(rig.server, body).by_tier.get("redis", 0) > 0


def test_redis_killed_in_the_middle_of_a_prefix(rig: Rig) -> None:
    """The prefix is split across tiers (memory holds its first blocks, Redis the rest) and Redis
    dies between two requests: the restore stops at the memory blocks, the rest is recomputed,
    and the output is that of a clean run."""
    rig.ensure_redis_up()
    body = chat_body(text(seed=300, words=140), max_tokens=4)
    reference = clean_reference(rig.server, body)
    chat(rig.server, body)
    rig.server.wait_written()
    rig.redis.kill()
    try:
        reply = chat(rig.server, body)
    finally:
        rig.ensure_redis_up()
    assert reply.text == reference.text
    assert set(reply.by_tier) == {"memory"}, reply.usage
    assert 0 < reply.cached < reply.usage["prompt_tokens"] - BLOCK_SIZE, reply.usage
    assert reply.miss_reason == "store_unavailable"
    within_bound(reply, reference)


def test_redis_full_under_noeviction(rig: Rig) -> None:
    """Writes fail with OOM; serving is unaffected, reads keep working, failures are counted."""
    rig.ensure_redis_up()
    cached_body = chat_body(text(seed=400, words=120))
    chat(rig.server, cached_body)
    rig.server.wait_written()
    with rig.redis.client() as client:
        used = int(client.info("memory")["used_memory"])
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", used + 1024)
    errors_before = metric_total(
        httpx.get(rig.server.url + "/metrics").text, "kvproxy_store_errors_total", tier="redis", op="put"
    )
    try:
        for seed in range(3):
            body = chat_body(text(seed=410 + seed, words=100))
            reply = chat(rig.server, body)
            reference = clean_reference(rig.server, body)
            assert reply.text == reference.text
            within_bound(reply, reference)
        rig.server.wait_written()
        with rig.redis.client() as client:
            assert int(client.info("stats")["total_error_replies"]) > 0
        metrics = httpx.get(rig.server.url + "/metrics").text
        assert metric_total(metrics, "kvproxy_store_errors_total", tier="redis", op="put") > errors_before
        # A full Redis is no outage: the breaker stays closed and old blocks are still read.
        assert rig.redis_state()["breaker"] == "closed"
        assert chat(rig.server, cached_body).by_tier.get("redis", 0) > 0
    finally:
        with rig.redis.client() as client:
            client.config_set("maxmemory", 0)
