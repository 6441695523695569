"""MemoryStore: byte budget, LRU order, a pluggable policy that may refuse (pinned blocks)."""

from __future__ import annotations

import threading

from cache_store.memory import EvictionPolicy, LRUPolicy, MemoryStore


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


class PinnedPolicy(LRUPolicy):
    """LRU that never evicts pinned keys (like the prefix trie's locked blocks)."""

    def __init__(self) -> None:
        super().__init__()
        self.pinned: set[bytes] = set()

    def victim(self) -> bytes | None:
        return next((k for k in self._order if k not in self.pinned), None)


def test_lru_policy_is_an_eviction_policy() -> None:
    assert isinstance(LRUPolicy(), EvictionPolicy)


def test_byte_budget_evicts_least_recently_used() -> None:
    store = MemoryStore(max_bytes=300)
    store.put_many([(key(i), bytes(100)) for i in range(3)])
    store.get_many([key(0)])  # key 1 is now the oldest
    assert store.put_many([(key(3), bytes(100))]) == 1
    assert store.contains([key(0), key(1), key(2), key(3)]) == [True, False, True, True]
    stats = store.stats()
    assert (stats.blocks, stats.bytes, stats.evictions, stats.capacity_bytes) == (3, 300, 1, 300)


def test_never_exceeds_budget_with_mixed_sizes() -> None:
    store = MemoryStore(max_bytes=10_000)
    for i in range(200):
        store.put_many([(key(i), bytes(37 * (i % 50) + 1))])
        assert store.stats().bytes <= 10_000


def test_oversized_value_is_refused_and_counted() -> None:
    store = MemoryStore(max_bytes=100)
    store.put_many([(key(0), bytes(50))])
    assert store.put_many([(key(1), bytes(101))]) == 0
    assert store.contains([key(0), key(1)]) == [True, False]
    assert store.refused == 1
    assert store.stats().errors == {"put": 1}


def test_pinned_blocks_refuse_new_ones_without_blocking() -> None:
    policy = PinnedPolicy()
    store = MemoryStore(max_bytes=200, policy=policy)
    store.put_many([(key(0), bytes(100)), (key(1), bytes(100))])
    policy.pinned = {key(0), key(1)}
    assert store.put_many([(key(2), bytes(100))]) == 0
    assert store.contains([key(0), key(1), key(2)]) == [True, True, False]
    assert store.refused == 1
    policy.pinned = {key(0)}
    assert store.put_many([(key(2), bytes(100))]) == 1
    assert store.contains([key(0), key(1), key(2)]) == [True, False, True]


def test_policy_naming_unknown_keys_cannot_loop_forever() -> None:
    class Confused(LRUPolicy):
        def victim(self) -> bytes | None:
            return b"not-in-the-store"

    store = MemoryStore(max_bytes=100, policy=Confused())
    store.put_many([(key(0), bytes(100))])
    assert store.put_many([(key(1), bytes(100))]) == 0


def test_policy_hears_about_every_change() -> None:
    events: list[tuple[str, bytes]] = []

    class Recording(LRUPolicy):
        def added(self, k: bytes, nbytes: int) -> None:
            events.append(("added", k))
            super().added(k, nbytes)

        def touched(self, k: bytes) -> None:
            events.append(("touched", k))
            super().touched(k)

        def removed(self, k: bytes) -> None:
            events.append(("removed", k))
            super().removed(k)

    store = MemoryStore(max_bytes=100, policy=Recording())
    store.put_many([(key(0), bytes(60))])
    store.get_many([key(0)])
    store.put_many([(key(1), bytes(60))])  # evicts key 0
    store.delete([key(1)])
    assert events == [
        ("added", key(0)),
        ("touched", key(0)),
        ("removed", key(0)),
        ("added", key(1)),
        ("removed", key(1)),
    ]


def test_values_are_kept_without_copies() -> None:
    store = MemoryStore(max_bytes=1 << 20)
    value = bytearray(b"x" * 1000)
    store.put_many([(key(0), value)])
    assert store.get_many([key(0)])[0] is value


def test_concurrent_writers_and_readers_keep_the_books_straight() -> None:
    store = MemoryStore(max_bytes=50_000)

    def work(offset: int) -> None:
        for i in range(500):
            store.put_many([(key(offset + i), bytes(100 + i % 7))])
            store.get_many([key(offset + i // 2)])

    threads = [threading.Thread(target=work, args=(n * 10_000,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = store.stats()
    held = [v for v in store.get_many([key(n * 10_000 + i) for n in range(4) for i in range(500)]) if v]
    assert stats.bytes == sum(len(v) for v in held) <= 50_000
    assert stats.blocks == len(held)


def test_refreshing_a_key_keeps_its_policy_entry() -> None:
    removed: list[bytes] = []

    class Recording(LRUPolicy):
        def removed(self, k: bytes) -> None:
            removed.append(k)
            super().removed(k)

    store = MemoryStore(max_bytes=300, policy=Recording())
    store.put_many([(key(0), bytes(100)), (key(1), bytes(100))])
    assert store.put_many([(key(0), bytes(150))]) == 1  # grows in place, nothing evicted
    assert store.put_many([(key(0), bytes(50))]) == 1
    assert removed == []
    assert store.stats().bytes == 150
    assert store.put_many([(key(0), bytes(250))]) == 1  # needs key 1's room
    assert removed == [key(1)]
    assert store.stats().bytes == 250 and store.contains([key(0), key(1)]) == [True, False]
