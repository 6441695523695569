"""Block events: the memory and disk tiers tell a listener what they store, evict, delete and
clear, in order; ``BlockEvents`` publishes that to a bounded Redis Stream with consecutive seqs,
never raising or blocking when Redis is down, and leaving a seq gap for what it lost."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster

from cache_store.disk import DiskStore
from cache_store.events import BlockEvents
from cache_store.memory import MemoryStore
from cache_store.redis_store import RedisStore
from cache_store.tiered import TieredStore
from tests.support.redis_fixtures import RedisClusterNodes, RedisServer

Change = tuple[str, str, bytes]
"""(op, tier, one block hash); ``cleared`` has ``b""``."""


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


class Recorder:
    """A listener that keeps every call, one change per hash."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, list[bytes]]] = []

    def __call__(self, op: str, tier: str, keys: object) -> None:
        self.calls.append((op, tier, list(keys)))  # type: ignore[call-overload]

    @property
    def changes(self) -> list[Change]:
        return expand(self.calls)


def expand(calls: list[tuple[str, str, list[bytes]]]) -> list[Change]:
    out: list[Change] = []
    for op, tier, keys in calls:
        out += [(op, tier, k) for k in keys] if keys else [(op, tier, b"")]
    return out


def read_stream(client: redis.Redis | RedisCluster, stream: str) -> list[dict[str, object]]:
    """The stream's entries decoded: seq (int), op, tier, hashes (list of 16-byte digests)."""
    entries = []
    for _id, fields in client.xrange(stream):
        raw = fields[b"hashes"]
        assert len(raw) % 16 == 0
        entries.append(
            {
                "seq": int(fields[b"seq"]),
                "op": fields[b"op"].decode(),
                "tier": fields[b"tier"].decode(),
                "hashes": [raw[i : i + 16] for i in range(0, len(raw), 16)],
            }
        )
    return entries


def stream_changes(entries: list[dict[str, object]]) -> list[Change]:
    return expand([(e["op"], e["tier"], e["hashes"]) for e in entries])  # type: ignore[misc]


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    yield client
    client.close()


@pytest.fixture
def events(redis_url: str, redis_prefix: str) -> Iterator[BlockEvents]:
    published = BlockEvents(redis_url, prefix=redis_prefix, timeout_ms=2000)
    yield published
    published.close()


def wait_for(condition: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


# -- the stores' hooks (no Redis) ----------------------------------------------------------------


def test_memory_reports_stores_lru_evictions_deletes_and_clear_in_order() -> None:
    heard = Recorder()
    store = MemoryStore(max_bytes=300, events=heard)
    store.put_many([(key(i), bytes(100)) for i in range(3)])
    assert heard.calls == [("stored", "memory", [key(0), key(1), key(2)])]
    store.get_many([key(0)])  # key 1 is the oldest now
    store.put_many([(key(3), bytes(100)), (key(4), bytes(100))])
    store.put_many([(key(9), bytes(301))])  # larger than the budget: refused, nothing to tell
    store.delete([key(4), key(42)])
    assert sorted(store.keys()) == [key(0), key(3)]
    store.clear()
    assert heard.changes[3:] == [
        ("evicted", "memory", key(1)),
        ("stored", "memory", key(3)),
        ("evicted", "memory", key(2)),
        ("stored", "memory", key(4)),
        ("deleted", "memory", key(4)),
        ("cleared", "memory", b""),
    ]
    assert store.keys() == []


def test_disk_reports_stores_evictions_deletes_corrupt_files_and_clear(tmp_path: Path) -> None:
    heard = Recorder()
    store = DiskStore(tmp_path, max_bytes=3 * (24 + 100), events=heard)
    store.put_many([(key(i), bytes(100)) for i in range(4)])  # the fourth evicts the first
    assert heard.changes == [
        ("stored", "disk", key(0)),
        ("stored", "disk", key(1)),
        ("stored", "disk", key(2)),
        ("stored", "disk", key(3)),
        ("evicted", "disk", key(0)),
    ]
    assert store.keys() == [key(1), key(2), key(3)]
    store.delete([key(1)])
    name = key(2).hex()
    (tmp_path / name[0:2] / name[2:4] / name).write_bytes(b"torn")
    assert store.get_many([key(2)]) == [None]  # corrupt: removed, and said so
    store.clear()
    assert heard.changes[5:] == [
        ("deleted", "disk", key(1)),
        ("deleted", "disk", key(2)),
        ("cleared", "disk", b""),
    ]
    store.close()


def test_a_failing_listener_never_fails_a_store_call(tmp_path: Path) -> None:
    def broken(op: str, tier: str, keys: object) -> None:
        raise RuntimeError("listener bug")

    memory = MemoryStore(max_bytes=1000, events=broken)
    assert memory.put_many([(key(1), b"v")]) == 1
    assert memory.get_many([key(1)]) == [b"v"]
    disk = DiskStore(tmp_path, max_bytes=1000, events=broken)
    assert disk.put_many([(key(1), b"v")]) == 1
    assert disk.clear() == 1
    disk.close()


def test_tiered_store_lists_local_tiers_only(tmp_path: Path, redis_url: str, redis_prefix: str) -> None:
    tiers = TieredStore(
        MemoryStore(1000), [DiskStore(tmp_path, 10_000), RedisStore(redis_url, prefix=redis_prefix)]
    )
    try:
        tiers.put_many([(key(1), b"a"), (key(2), b"b")])
        assert tiers.drain(10)
        held = tiers.held_keys()
        assert set(held) == {"memory", "disk"}
        assert sorted(held["memory"]) == sorted(held["disk"]) == [key(1), key(2)]
    finally:
        tiers.close()


# -- publishing ----------------------------------------------------------------------------------


def test_memory_and_disk_events_reach_the_stream_with_consecutive_seqs(
    events: BlockEvents, raw: redis.Redis, tmp_path: Path
) -> None:
    assert events.stream.endswith(f"events:{events.epoch}") and len(events.epoch) == 32
    memory = MemoryStore(max_bytes=300, events=events.emit)
    disk = DiskStore(tmp_path, max_bytes=2 * (24 + 100), events=events.emit)
    heard = Recorder()
    shadow_memory = MemoryStore(max_bytes=300, events=heard)
    shadow_disk = DiskStore(tmp_path / "shadow", max_bytes=2 * (24 + 100), events=heard)
    for store in (memory, shadow_memory):
        store.put_many([(key(i), bytes(100)) for i in range(3)])
        store.put_many([(key(3), bytes(100))])  # evicts key 0
    for store in (disk, shadow_disk):
        store.put_many([(key(i), bytes(100)) for i in range(3)])  # evicts key 0
        store.delete([key(2)])
    memory.clear()
    shadow_memory.clear()
    assert events.flush(10)
    entries = read_stream(raw, events.stream)
    assert [e["seq"] for e in entries] == list(range(1, len(entries) + 1))
    assert stream_changes(entries) == heard.changes
    assert entries[-1] == {"seq": len(entries), "op": "cleared", "tier": "memory", "hashes": []}
    stats = events.stats()
    assert (stats.published, stats.dropped, stats.last_seq) == (len(entries), 0, len(entries))
    assert 0 < raw.ttl(events.stream) <= 24 * 3600
    disk.close()
    shadow_disk.close()


def test_events_of_one_op_join_until_a_snapshot_seals_them(redis_url: str, redis_prefix: str) -> None:
    # A long batching interval keeps everything queued until the flush.
    events = BlockEvents(redis_url, prefix=redis_prefix, timeout_ms=2000, interval_s=30.0)
    raw = redis.Redis.from_url(redis_url)
    try:
        events.emit("stored", "disk", [key(1)])
        events.emit("stored", "disk", [key(2)])  # joins seq 1
        assert events.last_seq() == 1
        events.emit("stored", "disk", [key(3)])  # after a snapshot's seq: seq 2 of its own
        events.emit("stored", "memory", [key(4)])
        events.emit("deleted", "memory", [])  # nothing concerned: no event
        assert events.flush(10)
        entries = read_stream(raw, events.stream)
        assert [(e["seq"], e["tier"], e["hashes"]) for e in entries] == [
            (1, "disk", [key(1), key(2)]),
            (2, "disk", [key(3)]),
            (3, "memory", [key(4)]),
        ]
    finally:
        events.close()
        raw.close()


def test_a_full_queue_drops_and_leaves_a_seq_gap(redis_url: str, redis_prefix: str) -> None:
    events = BlockEvents(redis_url, prefix=redis_prefix, timeout_ms=2000, queue_hashes=4, interval_s=30.0)
    raw = redis.Redis.from_url(redis_url)
    try:
        events.emit("stored", "memory", [key(1), key(2)])
        events.emit("evicted", "memory", [key(1), key(2)])
        events.emit("stored", "memory", [key(3)])  # over the bound: seq 3 is given and lost
        assert events.stats().dropped == 1
        events.flush(10)
        events.emit("stored", "memory", [key(4)])
        assert events.flush(10)
        assert [e["seq"] for e in read_stream(raw, events.stream)] == [1, 2, 4]
    finally:
        events.close()
        raw.close()


def test_the_stream_stays_within_its_trim_bound(redis_url: str, redis_prefix: str) -> None:
    events = BlockEvents(redis_url, prefix=redis_prefix, timeout_ms=2000, maxlen=50)
    raw = redis.Redis.from_url(redis_url)
    try:
        for i in range(1000):
            events.emit("stored" if i % 2 == 0 else "evicted", "memory", [key(i)])
        assert events.flush(10)
        # MAXLEN ~ trims whole stream nodes (stream-node-max-entries, 100 by default).
        node = int(raw.config_get("stream-node-max-entries")["stream-node-max-entries"])
        assert 50 <= raw.xlen(events.stream) <= 50 + node
        assert read_stream(raw, events.stream)[-1]["seq"] == 1000
    finally:
        events.close()
        raw.close()


def test_redis_clear_leaves_event_streams_alone(
    events: BlockEvents, raw: redis.Redis, redis_url: str, redis_prefix: str
) -> None:
    store = RedisStore(redis_url, prefix=redis_prefix)
    try:
        store.put_many([(key(i), b"v") for i in range(3)])
        events.emit("stored", "memory", [key(1)])
        assert events.flush(10)
        assert store.clear() == 3
        assert raw.xlen(events.stream) == 1
    finally:
        store.close()


def test_redis_down_drops_events_without_raising_and_shows_a_gap(private_redis: RedisServer) -> None:
    events = BlockEvents(private_redis.url, timeout_ms=200)
    memory = MemoryStore(max_bytes=1000, events=events.emit)
    try:
        memory.put_many([(key(1), b"a")])
        assert events.flush(10) and events.stats().published == 1
        private_redis.kill()
        started = time.perf_counter()
        assert memory.put_many([(key(2), b"b")]) == 1  # seq 2: the request path never waits
        assert time.perf_counter() - started < 0.1
        wait_for(lambda: events.stats().dropped >= 1)
        private_redis.start()  # empty again: no persistence
        memory.put_many([(key(3), b"c")])
        wait_for(lambda: events.stats().published == 2)
        with private_redis.client() as client:
            entries = read_stream(client, events.stream)
            assert [(e["seq"], e["hashes"]) for e in entries] == [(3, [key(3)])]
            assert client.ttl(events.stream) > 0
        assert events.stats().dropped == 1
    finally:
        events.close()


def test_a_hung_redis_never_blocks_the_store(private_redis: RedisServer) -> None:
    events = BlockEvents(private_redis.url, timeout_ms=100)
    memory = MemoryStore(max_bytes=100_000, events=events.emit)
    try:
        private_redis.pause()
        started = time.perf_counter()
        for i in range(200):
            memory.put_many([(key(i), b"v")])
            memory.delete([key(i)])
        assert time.perf_counter() - started < 0.5
        wait_for(lambda: events.stats().dropped > 0)
        private_redis.resume()
        events.close(timeout_s=5)
    finally:
        private_redis.resume()
        events.close()


def test_events_go_to_a_cluster(redis_cluster: RedisClusterNodes) -> None:
    prefix = f"kvptest:{uuid.uuid4().hex}:"
    events = BlockEvents(redis_cluster.url, prefix=prefix, cluster=True, timeout_ms=2000)
    client = RedisCluster.from_url(redis_cluster.url)
    try:
        events.emit("stored", "memory", [key(1), key(2)])
        events.emit("cleared", "memory", [])
        assert events.flush(10)
        assert stream_changes(read_stream(client, events.stream)) == [
            ("stored", "memory", key(1)),
            ("stored", "memory", key(2)),
            ("cleared", "memory", b""),
        ]
    finally:
        events.close()
        client.delete(events.stream)
        client.close()
