"""RedisStore against real servers: key layout, TTL, bounded calls, the circuit breaker, a full
server, a cluster, prefix-scoped clear, and a password that never shows."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import pytest
import redis

from cache_store.redis_store import RedisStore, redact_url
from tests.support.redis_fixtures import RedisClusterNodes, RedisServer, free_port


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def test_key_layout_and_raw_value(redis_url: str, redis_prefix: str) -> None:
    store = RedisStore(redis_url, prefix=redis_prefix)
    value = os.urandom(3000)
    store.put_many([(key(5), bytearray(value))])
    raw = redis.Redis.from_url(redis_url)
    assert raw.get(f"{redis_prefix}{key(5).hex()}".encode()) == value
    assert store.key(key(5)) == f"{redis_prefix}{key(5).hex()}".encode()


def test_ttl_is_set_and_refreshed_on_hit(redis_url: str, redis_prefix: str) -> None:
    store = RedisStore(redis_url, prefix=redis_prefix, ttl_s=1000)
    raw = redis.Redis.from_url(redis_url)
    store.put_many([(key(1), b"v"), (key(2), b"w")])
    rkey1, rkey2 = store.key(key(1)), store.key(key(2))
    assert 990 < raw.ttl(rkey1) <= 1000
    raw.expire(rkey1, 5)  # as if most of the TTL had passed
    raw.expire(rkey2, 5)
    assert store.get_many([key(1)]) == [b"v"]
    assert 990 < raw.ttl(rkey1) <= 1000
    assert raw.ttl(rkey2) <= 5, "a key not read keeps its TTL"


def test_without_ttl_keys_do_not_expire(redis_url: str, redis_prefix: str) -> None:
    store = RedisStore(redis_url, prefix=redis_prefix)
    store.put_many([(key(1), b"v")])
    store.get_many([key(1)])
    assert redis.Redis.from_url(redis_url).ttl(store.key(key(1))) == -1


def test_clear_deletes_only_its_own_prefix(redis_url: str, redis_prefix: str) -> None:
    raw = redis.Redis.from_url(redis_url)
    globby = redis_prefix + "[ab]*?:"  # glob metacharacters in a prefix match only themselves
    store = RedisStore(redis_url, prefix=globby)
    neighbour = RedisStore(redis_url, prefix=redis_prefix + "a")
    foreign = [redis_prefix + "foreign", redis_prefix + "[ab]*", redis_prefix + "a" + key(1).hex()]
    try:
        for name in foreign[:2]:
            raw.set(name, b"keep me")
        neighbour.put_many([(key(1), b"keep me")])
        store.put_many([(key(i), b"mine") for i in range(30)])
        assert store.clear() == 30
        assert store.get_many([key(i) for i in range(30)]) == [None] * 30
        assert [raw.get(name) for name in foreign] == [b"keep me"] * 3
    finally:
        raw.delete(*foreign)


def test_password_never_shows(
    redis_server_factory: Callable[..., RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = redis_server_factory("--requirepass", "s3cret-pw")
    good = RedisStore(f"redis://:s3cret-pw@127.0.0.1:{server.port}/0", prefix="t:")
    assert good.put_many([(key(1), b"v")]) == 1 and good.get_many([key(1)]) == [b"v"]
    assert "s3cret-pw" not in good.redacted_url and "s3cret-pw" not in repr(good)
    assert good.redacted_url == f"redis://:***@127.0.0.1:{server.port}/0"

    caplog.set_level(logging.DEBUG)
    bad = RedisStore(f"redis://user:hunter22@127.0.0.1:{server.port}/0", prefix="t:", breaker_cooldown_s=60)
    for _ in range(4):
        assert bad.get_many([key(1)]) == [None]
    stats = bad.stats()
    assert stats.errors["get"] == 3 and stats.breaker == "open" and not stats.healthy
    assert "hunter22" not in caplog.text and "hunter22" not in repr(bad) and "hunter22" not in str(stats)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("rediss://alice:pw@cache.example:6380/2", "rediss://alice:***@cache.example:6380/2"),
        ("redis://:pw@[::1]:6379", "redis://:***@[::1]:6379"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_rejects_other_url_schemes() -> None:
    with pytest.raises(ValueError, match="redis://"):
        RedisStore("http://:pw@127.0.0.1:6379")


def test_stopped_server_turns_into_fast_misses_then_recovers(private_redis: RedisServer) -> None:
    store = RedisStore(private_redis.url, prefix="t:", timeout_ms=200, breaker_cooldown_s=0.5)
    store.put_many([(key(1), b"v")])
    assert store.get_many([key(1)]) == [b"v"]

    private_redis.stop()
    for _ in range(3):  # the failures that open the breaker: each bounded by the timeout
        result, elapsed = timed(lambda: store.get_many([key(1), key(2)]))
        assert result == [None, None]
        assert elapsed < 1.0
    assert store.stats().breaker == "open"
    errors = sum(store.stats().errors.values())
    for call in (
        lambda: store.get_many([key(1)]),
        lambda: store.put_many([(key(3), b"x")]),
        lambda: store.contains([key(1)]),
        lambda: store.delete([key(1)]),
        store.clear,
    ):
        _, elapsed = timed(call)
        assert elapsed < 0.05, "an open breaker makes no network call"
    assert sum(store.stats().errors.values()) == errors
    assert store.put_many([(key(3), b"x")]) == 0 and store.contains([key(1)]) == [False]

    private_redis.start()
    time.sleep(0.55)
    assert store.stats().breaker == "half_open"
    assert store.put_many([(key(1), b"back")]) == 1
    assert store.stats().breaker == "closed" and store.stats().healthy
    assert store.get_many([key(1)]) == [b"back"]


def test_killed_server_is_survived_and_reconnected(private_redis: RedisServer) -> None:
    store = RedisStore(private_redis.url, prefix="t:", timeout_ms=200, breaker_cooldown_s=0.2)
    store.put_many([(key(1), b"v")])
    private_redis.kill()
    assert store.get_many([key(1)]) == [None]
    private_redis.start()
    time.sleep(0.25)
    store.put_many([(key(1), b"again")])
    assert store.get_many([key(1)]) == [b"again"]


def test_hung_server_costs_one_timeout_per_call(private_redis: RedisServer) -> None:
    store = RedisStore(private_redis.url, prefix="t:", timeout_ms=150, breaker_cooldown_s=30)
    store.put_many([(key(1), b"v")])
    private_redis.pause()
    try:
        for _ in range(3):
            result, elapsed = timed(lambda: store.get_many([key(1)]))
            assert result == [None]
            assert elapsed < 0.5
        _, elapsed = timed(lambda: store.put_many([(key(2), b"w")]))
        assert elapsed < 0.05, "breaker open after three timeouts"
    finally:
        private_redis.resume()


def test_full_server_refuses_writes_softly(redis_server_factory: Callable[..., RedisServer]) -> None:
    server = redis_server_factory("--maxmemory", "4mb", "--maxmemory-policy", "noeviction")
    store = RedisStore(server.url, prefix="t:", timeout_ms=1000)
    stored = sum(store.put_many([(key(i), os.urandom(256 * 1024))]) for i in range(16))
    assert 0 < stored < 16
    assert store.put_many([(key(100 + i), os.urandom(256 * 1024)) for i in range(4)]) == 0
    stats = store.stats()
    assert stats.errors.get("put", 0) >= 4
    # The server answers (with OOM): no outage, so the breaker stays closed and reads still hit.
    assert stats.breaker == "closed"
    assert store.get_many([key(0)])[0] is not None


def test_nothing_listening_gives_misses(redis_server_factory: Callable[..., RedisServer]) -> None:
    port = free_port()
    for store in (
        RedisStore(f"redis://127.0.0.1:{port}/0", timeout_ms=100),
        RedisStore(f"redis://127.0.0.1:{port}/0", timeout_ms=100, cluster=True),
        RedisStore(f"rediss://127.0.0.1:{redis_server_factory().port}/0", timeout_ms=200),
    ):
        result, elapsed = timed(lambda s=store: (s.get_many([key(1)]), s.put_many([(key(1), b"v")])))
        assert result == ([None], 0)
        assert elapsed < 1.0
        assert store.stats().errors and not store.stats().healthy


def test_cluster_reads_across_slots(redis_cluster: RedisClusterNodes) -> None:
    store = RedisStore(redis_cluster.url, prefix=f"kvptest:{os.urandom(6).hex()}:", cluster=True, ttl_s=600)
    try:
        items = [(key(i), os.urandom(100 + i)) for i in range(200)]  # spread over every node
        assert store.put_many(items) == 200
        keys = [k for k, _ in items]
        assert store.get_many([*keys, key(10_000)]) == [v for _, v in items] + [None]
        assert all(store.contains(keys))
        assert store.delete(keys[:50]) == 50
        assert store.clear() == 150
        assert store.stats().errors == {}
        for server in redis_cluster.servers:
            with server.client() as client:
                assert list(client.scan_iter(match=store.prefix + "*")) == []
    finally:
        store.close()
