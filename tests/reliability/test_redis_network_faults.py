"""A slow, hung or cut-off Redis, made so by a TCP fault proxy between kvproxy and a real
redis-server: every request still succeeds within the store timeout + its recompute time + 1 s,
with the output of a clean run; a value cut off mid-reply is a miss, never a wrong block."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.reliability.conftest import ServerFactory
from tests.reliability.helpers import Reply, chat, chat_body, clean_reference, salt, text
from tests.support.fault_proxy import CutAfter, Delay, Fault, FaultProxy, Pass, Stall
from tests.support.live_server import LiveServer
from tests.support.redis_fixtures import RedisServer

TIMEOUT_MS = 200
COOLDOWN_S = 1.0
SLACK_S = 1.0
# No block fits in memory: every hit has to travel through the proxy.
MEMORY_BYTES = 1


@dataclass
class Rig:
    redis: RedisServer
    proxy: FaultProxy
    server: LiveServer

    def breaker(self) -> str:
        return str(self.server.get_json("/health")["tiers"]["redis"]["breaker"])

    def heal(self) -> None:
        """Pass traffic again and wait until the breaker has closed (a request drives the trial)."""
        self.proxy.set_fault(Pass())
        deadline = time.monotonic() + 10 * COOLDOWN_S + 10
        while self.breaker() != "closed" and time.monotonic() < deadline:
            chat(self.server, chat_body(text(seed=1, words=40), cache_salt=salt()))
            time.sleep(0.1)
        assert self.breaker() == "closed"


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, module_server_factory: ServerFactory) -> Iterator[Rig]:
    redis = RedisServer(tmp_path_factory.mktemp("redis-net")).start()
    proxy = FaultProxy(redis.port)
    server = module_server_factory(
        "--no-disk",
        "--redis-url", proxy.redis_url(),
        "--store-timeout-ms", str(TIMEOUT_MS),
        "--breaker-cooldown-s", str(COOLDOWN_S),
        "--memory-bytes", str(MEMORY_BYTES),
    )  # fmt: skip
    yield Rig(redis, proxy, server)
    proxy.close()
    redis.kill()


def cached_in_redis(rig: Rig, seed: int, words: int = 160) -> tuple[dict[str, object], Reply]:
    """A prompt whose blocks are all in Redis, and its clean reference."""
    rig.heal()
    body = chat_body(text(seed=seed, words=words), max_tokens=4)
    reference = clean_reference(rig.server, body)
    chat(rig.server, body)
    rig.server.wait_written()
    warm = chat(rig.server, body)
    assert warm.by_tier.get("redis", 0) > 0, warm.usage
    return body, reference


def check_bounded(rig: Rig, body: dict[str, object], reference: Reply, requests: int = 3) -> list[Reply]:
    replies = []
    for _ in range(requests):
        reply = chat(rig.server, body)
        bound = TIMEOUT_MS / 1000 + reference.seconds + SLACK_S
        assert reply.text == reference.text
        assert reply.seconds <= bound, f"{reply.seconds:.2f}s > {bound:.2f}s under {rig.proxy.fault}"
        replies.append(reply)
    return replies


def test_slow_redis_within_the_timeout_still_hits(rig: Rig) -> None:
    # A few blocks (~3 x 66 KB, a handful of chunks), each chunk 10 ms late: slow, but the whole
    # MGET stays well inside the 200 ms bound, even on a loaded machine.
    body, reference = cached_in_redis(rig, seed=500, words=12)
    rig.proxy.set_fault(Delay(0.01))
    try:
        replies = check_bounded(rig, body, reference)
    finally:
        rig.heal()
    assert all(r.by_tier.get("redis", 0) > 0 for r in replies), [r.usage for r in replies]


@pytest.mark.parametrize(
    "fault",
    [Delay(0.15), Delay(1.0), Stall(), CutAfter(1), CutAfter(100_000)],
    ids=["trickle-under-timeout", "delay-over-timeout", "stall", "cut-in-header", "cut-mid-value"],
)
def test_faulty_redis_is_a_bounded_miss(rig: Rig, fault: Fault) -> None:
    body, reference = cached_in_redis(rig, seed=600)
    rig.proxy.set_fault(fault)
    try:
        replies = check_bounded(rig, body, reference)
    finally:
        rig.heal()
    for reply in replies:
        # Whatever Redis sent was not used: a truncated value is a miss, not a bad block.
        assert reply.miss_reason in ("store_unavailable", "full_hit"), reply.usage
        assert reply.by_tier.get("redis", 0) == 0 or reply.miss_reason == "full_hit", reply.usage
    assert "failed verification" not in rig.server.log_text()
