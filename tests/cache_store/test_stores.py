"""One conformance suite for every BlockStore: memory, disk, Redis, Redis Cluster and the tiered
store. Whatever the backend, a store maps bytes to bytes, answers misses with None, keeps batch
order, and never raises for a missing key."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from cache_store.disk import DiskStore
from cache_store.memory import MemoryStore
from cache_store.redis_store import RedisStore
from cache_store.store import BlockStore, StoreStats
from cache_store.tiered import TieredStore

STORE_KINDS = ["memory", "disk", "redis", "redis_cluster", "tiered"]
MiB = 1 << 20


def make_key() -> bytes:
    return os.urandom(16)


def make_value(nbytes: int) -> bytes:
    # Random bytes, so a store that mixes values up or truncates them cannot pass by accident.
    return random.randbytes(nbytes)


def primary_stats(store: BlockStore | TieredStore) -> StoreStats:
    """The figures of the tier a caller talks to (memory, for the tiered store)."""
    if isinstance(store, TieredStore):
        return store.stats()["memory"]
    return store.stats()


@pytest.fixture(params=STORE_KINDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlockStore | TieredStore]:
    kind = request.param
    if kind == "memory":
        built: BlockStore | TieredStore = MemoryStore(max_bytes=64 * MiB)
    elif kind == "disk":
        built = DiskStore(tmp_path / "blocks", max_bytes=64 * MiB)
    elif kind == "redis":
        url = request.getfixturevalue("redis_url")
        built = RedisStore(url, prefix=request.getfixturevalue("redis_prefix"), timeout_ms=2000)
    elif kind == "redis_cluster":
        cluster = request.getfixturevalue("redis_cluster")
        prefix = f"kvptest:{os.urandom(8).hex()}:"
        built = RedisStore(cluster.url, prefix=prefix, timeout_ms=2000, cluster=True)
    else:
        url = request.getfixturevalue("redis_url")
        redis_tier = RedisStore(url, prefix=request.getfixturevalue("redis_prefix"), timeout_ms=2000)
        disk_tier = DiskStore(tmp_path / "blocks", max_bytes=64 * MiB)
        built = TieredStore(MemoryStore(max_bytes=64 * MiB), [disk_tier, redis_tier])
    yield built
    if kind == "redis_cluster":
        built.clear()
    built.close()


def test_round_trip_of_large_values(store: BlockStore | TieredStore) -> None:
    items = [(make_key(), make_value(n)) for n in (64 * 1024, 256 * 1024, MiB, 4 * MiB)]
    assert store.put_many(items) == len(items)
    got = store.get_many([k for k, _ in items])
    assert [bytes(v) if v is not None else None for v in got] == [v for _, v in items]


def test_misses_are_none_and_order_is_kept(store: BlockStore | TieredStore) -> None:
    items = [(make_key(), make_value(1000 + i)) for i in range(20)]
    store.put_many(items)
    expected = dict(items)
    asked = [k for k, _ in items] + [make_key() for _ in range(5)]
    random.shuffle(asked)
    got = store.get_many(asked)
    assert len(got) == len(asked)
    for key, value in zip(asked, got, strict=True):
        if key in expected:
            assert value is not None and bytes(value) == expected[key]
        else:
            assert value is None


def test_empty_batches(store: BlockStore | TieredStore) -> None:
    assert store.get_many([]) == []
    assert store.put_many([]) == 0
    assert store.contains([]) == []
    assert store.delete([]) == 0


def test_accepts_bytearray_and_memoryview(store: BlockStore | TieredStore) -> None:
    a, b, c = make_key(), make_key(), make_key()
    payload = make_value(70_000)
    assert store.put_many([(a, bytearray(payload)), (b, memoryview(payload)), (c, payload)]) == 3
    assert [bytes(v) for v in store.get_many([a, b, c])] == [payload] * 3  # type: ignore[arg-type]


def test_contains(store: BlockStore | TieredStore) -> None:
    present, absent = make_key(), make_key()
    store.put_many([(present, b"x" * 100)])
    assert store.contains([absent, present, absent]) == [False, True, False]


def test_delete_reports_existing_and_removes(store: BlockStore | TieredStore) -> None:
    keep, drop = make_key(), make_key()
    store.put_many([(keep, b"keep" * 10), (drop, b"drop" * 10)])
    assert store.delete([drop, make_key()]) == 1
    assert store.get_many([drop, keep]) == [None, b"keep" * 10]
    assert store.delete([drop]) == 0


def test_clear_removes_everything(store: BlockStore | TieredStore) -> None:
    keys = [make_key() for _ in range(12)]
    store.put_many([(k, b"v" * 50) for k in keys])
    if isinstance(store, TieredStore):
        assert store.drain(10)
    assert store.clear() >= len(keys)
    assert store.get_many(keys) == [None] * len(keys)
    assert store.contains(keys) == [False] * len(keys)


def test_overwrite_keeps_latest_value(store: BlockStore | TieredStore) -> None:
    key = make_key()
    store.put_many([(key, b"old" * 10)])
    store.put_many([(key, b"new" * 20)])
    assert store.get_many([key]) == [b"new" * 20]


def test_stats_move(store: BlockStore | TieredStore) -> None:
    before = primary_stats(store)
    key = make_key()
    store.put_many([(key, b"v" * 4096)])
    store.get_many([key, make_key()])
    after = primary_stats(store)
    assert after.puts == before.puts + 1
    assert after.hits == before.hits + 1
    assert after.misses >= before.misses + 1
    assert after.errors == before.errors
    assert after.healthy
    if not isinstance(store, RedisStore):  # Redis does not count a shared server's keys
        assert after.blocks == before.blocks + 1
        assert after.bytes >= before.bytes + 4096
