"""PrefixTrie: matching, locks and pin flags, LRU eviction of free leaves, and its role as MemoryStore's
policy."""

from __future__ import annotations

import threading

import pytest

from cache_store.memory import EvictionPolicy, MemoryStore
from cache_store.trie import PrefixTrie


def h(name: str) -> bytes:
    return name.encode().ljust(16, b".")


def chain(trie: PrefixTrie, names: str, parent: str | None = None, size: int = 10) -> list[bytes]:
    """Insert blocks named by the characters of ``names`` as one chain."""
    keys = [h(c) for c in names]
    trie.insert(keys, h(parent) if parent else None, [size] * len(keys))
    return keys


def drain(trie: PrefixTrie) -> str:
    out = []
    while (key := trie.evict_one()) is not None:
        out.append(key.rstrip(b".").decode())
    return "".join(out)


def test_match_is_the_leading_run() -> None:
    trie = PrefixTrie()
    a, b, c = chain(trie, "abc")
    assert trie.match([a, b, c]) == 3
    assert trie.match([a, b, h("x"), c]) == 2
    assert trie.match([h("x"), a]) == 0
    assert trie.match([]) == 0
    assert trie.contains([a, h("x")]) == [True, False]


def test_insert_counts_new_nodes_and_bytes() -> None:
    trie = PrefixTrie()
    assert trie.insert([h("a"), h("b")], None, [5, 7]) == 2
    assert trie.insert([h("a"), h("b"), h("c")], None, [5, 7, 9]) == 1
    stats = trie.stats()
    assert (stats.nodes, stats.bytes, stats.locked, stats.evictable) == (3, 21, 0, 1)
    with pytest.raises(ValueError):
        trie.insert([h("a")], None, [])


def test_eviction_takes_leaves_only_and_parents_after_their_last_child() -> None:
    trie = PrefixTrie()
    chain(trie, "abc")
    chain(trie, "de", parent="b")  # b has two children: c and d
    # Leaves first, each branch from its tip; b only once both c and e's branch are gone.
    assert drain(trie) == "cedba"


def test_eviction_order_is_lru_among_leaves() -> None:
    trie = PrefixTrie()
    x, y, z = (h(c) for c in "xyz")
    for key in (x, y, z):
        trie.insert([key], None, [1])
    trie.match([x])  # x becomes the most recently used
    assert drain(trie) == "yzx"


def test_touching_a_parent_protects_its_subtree_only_by_recency() -> None:
    trie = PrefixTrie()
    chain(trie, "ab")
    chain(trie, "c")
    trie.match([h("a"), h("b")])
    assert drain(trie) == "cba"


def test_lock_prevents_eviction_until_unlocked() -> None:
    trie = PrefixTrie()
    a, b = chain(trie, "ab")
    c = chain(trie, "c")[0]
    assert trie.lock([a, b, h("zz")]) == [a, b]
    assert trie.locked_blocks() == [a, b]
    assert trie.stats().locked == 2
    assert trie.evict_one() == c
    assert trie.evict_one() is None  # b is a pinned leaf, a is not a leaf
    trie.lock([b])  # locks nest
    trie.unlock([a, b])
    assert trie.evict_one() is None
    trie.unlock([b])
    assert drain(trie) == "ba"
    trie.unlock([a, b])  # unknown now: ignored


def test_pinned_nodes_are_not_evicted_until_unpinned() -> None:
    trie = PrefixTrie()
    a, b, c = chain(trie, "abc")
    chain(trie, "x")
    assert trie.set_pinned([a, b, c, h("zz")], True) == 3  # unknown hashes are ignored
    assert trie.set_pinned([c], True) == 1  # idempotent
    stats = trie.stats()
    assert (stats.pinned, stats.evictable, stats.locked) == (3, 1, 0)
    assert drain(trie) == "x"
    trie.set_pinned([c], False)
    assert drain(trie) == "c"  # b is a pinned leaf now
    trie.set_pinned([a, b], False)
    assert trie.stats().pinned == 0
    assert drain(trie) == "ba"
    assert trie.set_pinned([a], False) == 0


def test_pin_and_lock_are_independent() -> None:
    trie = PrefixTrie()
    (a,) = chain(trie, "a")
    trie.lock([a])
    trie.set_pinned([a], True)
    trie.unlock([a])
    assert trie.evict_one() is None  # still pinned
    trie.lock([a])
    trie.set_pinned([a], False)
    assert trie.evict_one() is None  # still locked
    trie.unlock([a])
    assert trie.evict_one() == a


def test_sizes() -> None:
    trie = PrefixTrie()
    trie.insert([h("a"), h("b")], None, [5, 7])
    assert trie.sizes([h("b"), h("x"), h("a")]) == [7, None, 5]
    assert trie.sizes([]) == []
    trie.insert([h("a")], None, [9])  # a re-insert updates the size
    assert trie.sizes([h("a")]) == [9]


def test_pinned_count_follows_nodes_that_leave() -> None:
    trie = PrefixTrie()
    keys = chain(trie, "abcd")
    trie.set_pinned(keys, True)
    trie.removed(h("d"))  # e.g. deleted from memory after a failed verification
    assert trie.stats().pinned == 3
    trie.remove(h("b"))  # b and c
    assert trie.stats().pinned == 1
    chain(trie, "d", parent="a")  # a node that comes back has no flag
    assert trie.stats().pinned == 1
    assert trie.clear() == 2
    stats = trie.stats()
    assert (stats.nodes, stats.pinned, stats.evictable) == (0, 0, 0)
    chain(trie, "a")
    assert trie.stats().pinned == 0
    assert trie.evict_one() == h("a")


def test_remove_takes_the_whole_subtree() -> None:
    trie = PrefixTrie()
    chain(trie, "abc")
    chain(trie, "de", parent="b")
    chain(trie, "x")
    removed = trie.remove(h("b"))
    assert sorted(k.rstrip(b".").decode() for k in removed) == ["b", "c", "d", "e"]
    assert trie.remove(h("b")) == []
    assert trie.stats().nodes == 2
    assert drain(trie) == "ax"  # a is a leaf again


def test_remove_makes_the_parent_a_leaf_again() -> None:
    trie = PrefixTrie()
    chain(trie, "abc")
    trie.match([h("a")])
    trie.remove(h("b"))
    assert trie.stats().evictable == 1
    assert drain(trie) == "a"


def test_tiers() -> None:
    trie = PrefixTrie()
    (a,) = chain(trie, "a")
    assert trie.tiers(a) == {"memory"}
    trie.add_tier(a, "disk")
    trie.insert([a], None, [10], tier="redis")
    assert trie.tiers(a) == {"memory", "disk", "redis"}
    assert trie.tiers(h("nope")) == frozenset()


def test_evicted_hashes_are_remembered_boundedly() -> None:
    trie = PrefixTrie(remember_evicted=2)
    chain(trie, "abc")
    drain(trie)
    assert not trie.was_evicted(h("c"))  # the oldest evicted fell out
    assert trie.was_evicted(h("b")) and trie.was_evicted(h("a"))


def test_heap_stays_bounded_under_many_touches() -> None:
    trie = PrefixTrie()
    keys = chain(trie, "abcdefgh")
    for _ in range(10_000):
        trie.match(keys)
    assert len(trie._heap) <= 2 * len(trie) + 1024
    assert drain(trie) == "hgfedcba"


# -- as the memory tier's eviction policy --------------------------------------------------------


def test_is_an_eviction_policy() -> None:
    assert isinstance(PrefixTrie(), EvictionPolicy)


def test_memory_store_evicts_unlocked_leaves_through_the_trie() -> None:
    trie = PrefixTrie()
    memory = MemoryStore(max_bytes=40, policy=trie)
    a, b, c = chain(trie, "abc")
    (x,) = chain(trie, "x")
    memory.put_many([(k, b"v" * 10) for k in (a, b, c, x)])
    assert len(memory) == 4
    trie.lock([a, b, c])
    (y,) = chain(trie, "y")
    assert memory.put_many([(y, b"v" * 10)]) == 1  # x was the only unlocked leaf
    assert memory.contains([a, b, c, x, y]) == [True, True, True, False, True]
    trie.lock([y])
    (z,) = chain(trie, "z")
    trie.lock([z])
    assert memory.put_many([(z, b"v" * 10)]) == 0  # everything pinned: refused, never blocks
    trie.unlock([a, b, c, y, z])
    trie.removed(z)  # the refused block leaves the index (what PrefixCache does)
    assert memory.put_many([(z, b"v" * 10)]) == 1
    assert trie.stats().nodes == len(memory) == 4


def test_memory_store_never_evicts_pinned_blocks() -> None:
    trie = PrefixTrie()
    memory = MemoryStore(max_bytes=30, policy=trie)
    keys = chain(trie, "abc")
    memory.put_many([(k, b"v" * 10) for k in keys])
    trie.set_pinned(keys, True)
    assert memory.put_many([(h("x"), b"v" * 10)]) == 0  # everything pinned: refused
    assert memory.contains(keys) == [True] * 3
    trie.set_pinned(keys[2:], False)
    assert memory.put_many([(h("x"), b"v" * 10)]) == 1
    assert memory.contains([*keys, h("x")]) == [True, True, False, True]


def test_a_key_unknown_to_the_trie_becomes_a_root() -> None:
    trie = PrefixTrie()
    memory = MemoryStore(max_bytes=20, policy=trie)
    memory.put_many([(h("p"), b"v" * 10)])  # e.g. promoted from disk
    assert trie.contains([h("p")]) == [True]
    assert trie.stats().bytes == 10
    memory.put_many([(h("q"), b"v" * 10), (h("r"), b"v" * 10)])
    assert memory.contains([h("p"), h("q"), h("r")]) == [False, True, True]
    assert trie.contains([h("p")]) == [False]
    # link() restores the chain of known nodes without creating any.
    trie.link([h("q"), h("missing"), h("r")])
    trie.link([h("q"), h("r")])
    assert trie.stats().evictable == 1
    assert trie.evict_one() == h("r")


def test_memory_delete_drops_the_node_and_children_become_roots() -> None:
    trie = PrefixTrie()
    memory = MemoryStore(max_bytes=100, policy=trie)
    keys = chain(trie, "abc")
    memory.put_many([(k, b"v" * 10) for k in keys])
    memory.delete([h("b")])
    assert trie.contains(keys) == [True, False, True]
    assert trie.stats().evictable == 2  # a lost its child, c is a root leaf
    # Re-inserting b links it back between a and c.
    trie.insert([h("b")], h("a"), [10])
    trie.link([h("b"), h("c")])
    assert drain(trie) == "cba"


def test_thread_safety_under_concurrent_use() -> None:
    trie = PrefixTrie()
    memory = MemoryStore(max_bytes=50 * 8, policy=trie)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            for i in range(300):
                keys = [f"{seed}-{i % 7}-{j}".encode().ljust(16, b".") for j in range(4)]
                trie.insert(keys, None, [8] * 4)
                pinned = trie.lock(keys)
                memory.put_many([(k, b"v" * 8) for k in keys])
                trie.match(keys)
                trie.unlock(pinned)
        except BaseException as exc:  # pragma: no cover - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    stats = trie.stats()
    assert stats.locked == 0
    assert memory.stats().bytes <= 400
    assert 0 < stats.evictable <= stats.nodes == sum(1 for _ in iter(trie.evict_one, None))
    assert trie.stats().nodes == 0
