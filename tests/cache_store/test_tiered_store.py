"""TieredStore over real tiers: read-through with promotion, the longest leading run, write-behind
that never blocks, and deletes that reach every tier."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from cache_store.disk import DiskStore
from cache_store.memory import MemoryStore
from cache_store.redis_store import RedisStore
from cache_store.store import Buffer, StoreStats
from cache_store.tiered import TierClear, TieredStore
from tests.support.redis_fixtures import RedisServer

MiB = 1 << 20


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


class CountingDisk(DiskStore):
    """A real DiskStore that records the key batches it is asked for."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        super().__init__(root, max_bytes)
        self.get_calls: list[list[bytes]] = []

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | bytearray | None]:
        self.get_calls.append(list(keys))
        return super().get_many(keys)


@pytest.fixture
def disk(tmp_path: Path) -> CountingDisk:
    return CountingDisk(tmp_path / "blocks", 64 * MiB)


@pytest.fixture
def redis_tier(redis_url: str, redis_prefix: str) -> RedisStore:
    return RedisStore(redis_url, prefix=redis_prefix, timeout_ms=1000)


@pytest.fixture
def tiered(disk: CountingDisk, redis_tier: RedisStore) -> Iterator[TieredStore]:
    store = TieredStore(MemoryStore(64 * MiB), [disk, redis_tier])
    yield store
    store.close()


def test_read_through_promotes_into_memory(tiered: TieredStore, disk: CountingDisk) -> None:
    disk.put_many([(key(i), b"from disk %d" % i) for i in range(3)])
    hits = tiered.get_prefix([key(0), key(1), key(2)])
    assert hits == [(b"from disk %d" % i, "disk") for i in range(3)]
    assert tiered.memory.contains([key(0), key(1), key(2)]) == [True] * 3
    assert [tier for _, tier in tiered.get_prefix([key(0), key(1), key(2)])] == ["memory"] * 3


def test_longest_leading_run_across_tiers(
    tiered: TieredStore, disk: CountingDisk, redis_tier: RedisStore
) -> None:
    tiered.memory.put_many([(key(0), b"m0"), (key(1), b"m1"), (key(5), b"m5")])
    redis_tier.put_many([(key(2), b"r2"), (key(3), b"r3-redis")])
    disk.put_many([(key(3), b"r3-disk"), (key(6), b"d6")])
    keys = [key(i) for i in range(7)]  # key 4 is nowhere: the run ends there
    hits = tiered.get_prefix(keys)
    assert hits == [(b"m0", "memory"), (b"m1", "memory"), (b"r2", "redis"), (b"r3-disk", "disk")]
    # Only the keys after the first memory miss go down, once per tier, in one batch each.
    assert disk.get_calls == [[key(2), key(3), key(4), key(6)]]
    # What lies past the run's end is not promoted.
    assert tiered.memory.contains([key(2), key(3), key(6)]) == [True, True, False]


def test_get_many_reads_through_without_stopping_at_gaps(tiered: TieredStore, redis_tier: RedisStore) -> None:
    redis_tier.put_many([(key(2), b"r2")])
    tiered.memory.put_many([(key(0), b"m0")])
    assert tiered.get_many([key(0), key(1), key(2)]) == [b"m0", None, b"r2"]
    assert tiered.contains([key(0), key(1), key(2)]) == [True, False, True]


def test_writes_reach_every_tier_after_drain(
    tiered: TieredStore, disk: CountingDisk, redis_tier: RedisStore
) -> None:
    items = [(key(i), os.urandom(300 * 1024)) for i in range(20)]
    assert tiered.put_many(items) == 20
    assert tiered.memory.contains([key(0)]) == [True], "memory is written before put_many returns"
    assert tiered.drain(10)
    keys = [k for k, _ in items]
    assert disk.get_many(keys) == [v for _, v in items]
    assert redis_tier.get_many(keys) == [v for _, v in items]
    assert tiered.writer_stats().written == 20 and tiered.writer_stats().queued == 0


def test_full_queue_drops_and_counts_without_blocking(tmp_path: Path, private_redis: RedisServer) -> None:
    slow = RedisStore(private_redis.url, prefix="t:", timeout_ms=3000, breaker_cooldown_s=0.1)
    store = TieredStore(MemoryStore(64 * MiB), [slow], queue_items=3)
    try:
        private_redis.pause()  # the writer's first batch hangs on the stopped server
        start = time.perf_counter()
        for i in range(30):
            assert store.put_many([(key(i), b"v" * 1000)]) == 1
        assert time.perf_counter() - start < 0.2, "put_many never waits for a lower tier"
        stats = store.writer_stats()
        assert stats.dropped >= 30 - 3 - 3  # at most the queue plus one taken batch got through
        assert store.memory.contains([key(i) for i in range(30)]) == [True] * 30
        assert not store.drain(0.05)
        private_redis.resume()
        assert store.drain(10)
        stats = store.writer_stats()
        assert stats.queued == 0 and stats.written + stats.failed + stats.dropped == 30
    finally:
        private_redis.resume()
        store.close()


def test_failed_lower_writes_are_counted(tmp_path: Path, private_redis: RedisServer) -> None:
    down = RedisStore(private_redis.url, prefix="t:", timeout_ms=200)
    private_redis.stop()
    store = TieredStore(MemoryStore(MiB), [down])
    try:
        store.put_many([(key(1), b"v"), (key(2), b"w")])
        assert store.drain(5)
        assert store.writer_stats().failed == 2
        assert store.get_prefix([key(1), key(2)]) == [(b"v", "memory"), (b"w", "memory")]
    finally:
        store.close()


def test_delete_reaches_every_tier(tiered: TieredStore, disk: CountingDisk, redis_tier: RedisStore) -> None:
    tiered.put_many([(key(1), b"bad record"), (key(2), b"good")])
    assert tiered.drain(10)
    assert tiered.delete([key(1)]) == 1
    for tier in (tiered.memory, disk, redis_tier):
        assert tier.contains([key(1), key(2)]) == [False, True]


def test_delete_beats_a_write_still_queued(tmp_path: Path, private_redis: RedisServer) -> None:
    lower = RedisStore(private_redis.url, prefix="t:", timeout_ms=3000)
    store = TieredStore(MemoryStore(MiB), [lower])
    try:
        private_redis.pause()
        store.put_many([(key(1), b"first")])
        time.sleep(0.05)  # the writer now holds a batch, blocked on the stopped server
        store.put_many([(key(2), b"queued")])
        private_redis.resume()
        store.delete([key(1), key(2)])
        assert store.drain(10)
        assert lower.get_many([key(1), key(2)]) == [None, None]
    finally:
        private_redis.resume()
        store.close()


def test_clear_empties_every_tier_and_discards_queued_writes(
    tiered: TieredStore, disk: CountingDisk, redis_tier: RedisStore
) -> None:
    tiered.put_many([(key(i), b"v") for i in range(10)])
    tiered.clear()
    assert tiered.drain(10)
    keys = [key(i) for i in range(10)]
    for tier in (tiered.memory, disk, redis_tier):
        assert tier.get_many(keys) == [None] * 10


def test_clear_tiers_reports_a_tier_that_failed(tmp_path: Path, private_redis: RedisServer) -> None:
    redis_tier = RedisStore(private_redis.url, prefix="kvptest:clear:", timeout_ms=200, breaker_cooldown_s=60)
    store = TieredStore(MemoryStore(MiB), [DiskStore(tmp_path / "d", MiB), redis_tier])
    try:
        store.put_many([(key(i), b"v") for i in range(4)])
        assert store.drain(10)
        assert store.clear_tiers() == {
            "memory": TierClear(4, True),
            "disk": TierClear(4, True),
            "redis": TierClear(4, True),
        }
        store.put_many([(key(i), b"v") for i in range(2)])
        assert store.drain(10)
        private_redis.stop()
        outcome = store.clear_tiers()
        assert outcome["memory"] == TierClear(2, True) and outcome["disk"] == TierClear(2, True)
        assert outcome["redis"].ok is False
    finally:
        store.close()


def test_observer_sees_every_tier_call(tmp_path: Path, private_redis: RedisServer) -> None:
    seen: list[tuple[str, str, bool]] = []

    def observer(tier: str, op: str, seconds: float, ok: bool) -> None:
        assert seconds >= 0
        seen.append((tier, op, ok))

    disk = DiskStore(tmp_path / "blocks", MiB)
    remote = RedisStore(private_redis.url, prefix="t:", timeout_ms=200)
    store = TieredStore(MemoryStore(MiB), [disk, remote], observer=observer)
    try:
        store.put_many([(key(1), b"v")])
        assert store.drain(5)
        store.get_prefix([key(2)])
        private_redis.stop()
        store.get_prefix([key(3)])
        assert seen == [
            ("memory", "put", True),
            ("disk", "put", True),
            ("redis", "put", True),
            ("memory", "get", True),
            ("disk", "get", True),
            ("redis", "get", True),
            ("memory", "get", True),
            ("disk", "get", True),
            ("redis", "get", False),
        ]
    finally:
        store.close()


def test_stats_per_tier(tiered: TieredStore) -> None:
    tiered.put_many([(key(1), b"v")])
    assert tiered.drain(10)
    stats = tiered.stats()
    assert list(stats) == ["memory", "disk", "redis"]
    assert all(isinstance(s, StoreStats) for s in stats.values())
    assert stats["memory"].blocks == 1 and stats["disk"].blocks == 1 and stats["redis"].puts == 1


def test_close_drains_then_stops(disk: CountingDisk) -> None:
    store = TieredStore(MemoryStore(MiB), [disk])
    store.put_many([(key(i), b"v") for i in range(50)])
    store.close()
    assert store.writer_stats().written == 50
    assert store._thread is not None and not store._thread.is_alive()
    store.close()  # idempotent


def test_memory_only_tiering(tmp_path: Path) -> None:
    store = TieredStore(MemoryStore(MiB), [])
    items: list[tuple[bytes, Buffer]] = [(key(1), b"v")]
    assert store.put_many(items) == 1
    assert store.drain(0)
    assert store.get_prefix([key(1), key(2)]) == [(b"v", "memory")]
    store.close()


def test_duplicate_tier_names_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unique"):
        TieredStore(MemoryStore(MiB), [DiskStore(tmp_path / "a", MiB), DiskStore(tmp_path / "b", MiB)])
