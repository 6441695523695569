"""PrefixCache over real tiers (MemoryStore + DiskStore + RedisStore): hits, misses and their reasons,
verification failures (corruption, collisions) and pinning."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from cache_store.codec import encode_block
from cache_store.disk import DiskStore
from cache_store.hashing import block_hashes, namespace_hash
from cache_store.memory import MemoryStore
from cache_store.prefix_cache import PrefixCache, PrefixHit
from cache_store.redis_store import RedisStore
from cache_store.store import BlockStore
from cache_store.tiered import TieredStore
from cache_store.trie import PrefixTrie
from tests.support.redis_fixtures import RedisServer

BS = 4
LAYERS, HEADS, K_DIM, V_DIM = 2, 2, 8, 4
SHAPES = [((HEADS, BS, K_DIM), (HEADS, BS, V_DIM))] * LAYERS
NS = namespace_hash(model_fingerprint="prefix-cache-test", block_size=BS, tenant="t")
PROMPT = list(range(1, 4 * BS + 3))  # 4 full blocks + 2 tokens


def kv_for(tokens: list[int], i: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Deterministic K/V for block i of a prompt: [heads, BS, dim] per layer."""
    gen = torch.Generator().manual_seed(sum(tokens[: (i + 1) * BS]) * 31 + i)
    keys = [torch.randn(HEADS, BS, K_DIM, generator=gen) for _ in range(LAYERS)]
    values = [torch.randn(HEADS, BS, V_DIM, generator=gen) for _ in range(LAYERS)]
    return keys, values


def record_size() -> int:
    keys, values = kv_for(PROMPT, 0)
    record = encode_block(
        namespace=NS, parent=NS, block_hash=NS, token_ids=PROMPT[:BS], keys=keys, values=values
    )
    return len(record)


@dataclass
class Tiers:
    cache: PrefixCache
    trie: PrefixTrie
    store: TieredStore
    memory: MemoryStore
    lower: list[BlockStore]

    def lookup(self, tokens: list[int], ns: bytes = NS) -> PrefixHit:
        return self.cache.lookup(ns, tokens, dtype=torch.float32, layer_shapes=SHAPES)

    def store_prompt(self, tokens: list[int], first: int = 0, ns: bytes = NS) -> int:
        hashes = block_hashes(tokens, BS, ns)
        kvs = [kv_for(tokens, i) for i in range(first, len(hashes))]
        written = len(self.cache.store_blocks(ns, tokens, hashes, first, kvs))
        assert self.store.drain(10)
        return written


def build(lower: list[BlockStore], memory_bytes: int = 1 << 20) -> Tiers:
    trie = PrefixTrie()
    memory = MemoryStore(memory_bytes, policy=trie)
    store = TieredStore(memory, lower)
    return Tiers(PrefixCache(store, trie, BS), trie, store, memory, lower)


@pytest.fixture
def tiers(tmp_path: Path, redis_url: str, redis_prefix: str) -> Iterator[Tiers]:
    t = build([DiskStore(tmp_path / "blocks", 1 << 30), RedisStore(redis_url, prefix=redis_prefix)])
    yield t
    t.store.close()


def assert_blocks_match(hit: PrefixHit, tokens: list[int]) -> None:
    for i, block in enumerate(hit.blocks):
        keys, values = kv_for(tokens, i)
        assert block.token_ids == tuple(tokens[i * BS : (i + 1) * BS])
        assert all(torch.equal(a, b) for a, b in zip(block.keys, keys, strict=True))
        assert all(torch.equal(a, b) for a, b in zip(block.values, values, strict=True))


def test_short_prompt_has_no_blocks(tiers: Tiers) -> None:
    hit = tiers.lookup(PROMPT[: BS - 1])
    assert (hit.hashes, hit.blocks, hit.miss_reason, hit.miss_block) == ([], [], "short_prompt", None)


def test_cold_miss_then_full_hit_from_memory_with_pins_released(tiers: Tiers) -> None:
    cold = tiers.lookup(PROMPT)
    assert (cold.miss_reason, cold.miss_block, len(cold.hashes)) == ("no_shared_prefix", 0, 4)
    cold.release()
    assert tiers.store_prompt(PROMPT) == 4
    hit = tiers.lookup(PROMPT)
    assert (hit.miss_reason, hit.miss_block, hit.tiers) == ("full_hit", None, ["memory"] * 4)
    assert_blocks_match(hit, PROMPT)
    assert sorted(tiers.trie.locked_blocks()) == sorted(hit.hashes)
    hit.release()
    hit.release()  # idempotent
    assert tiers.trie.stats().locked == 0
    stats = tiers.cache.stats()
    assert stats.lookups == 2 and stats.hit_blocks == {"memory": 4} and stats.stored_blocks == 4


def test_hits_come_from_each_lower_tier_and_are_promoted(tiers: Tiers) -> None:
    tiers.store_prompt(PROMPT)
    disk = tiers.lower[0]
    assert disk.contains(block_hashes(PROMPT, BS, NS)) == [True] * 4
    tiers.memory.clear()
    with tiers.lookup(PROMPT) as hit:
        assert (hit.miss_reason, hit.tiers) == ("full_hit", ["disk"] * 4)
        assert_blocks_match(hit, PROMPT)
    # Promoted into memory and re-chained in the trie: one leaf, evicted tip first.
    assert tiers.trie.stats().evictable == 1
    tiers.memory.clear()
    disk.clear()
    with tiers.lookup(PROMPT) as hit:
        assert (hit.miss_reason, hit.tiers) == ("full_hit", ["redis"] * 4)
        assert_blocks_match(hit, PROMPT)
    with tiers.lookup(PROMPT) as hit:
        assert hit.tiers == ["memory"] * 4


def test_diverged_at_the_first_different_block(tiers: Tiers) -> None:
    tiers.store_prompt(PROMPT)
    other = [*PROMPT[: 2 * BS], 999, *PROMPT[2 * BS + 1 :]]
    with tiers.lookup(other) as hit:
        assert (hit.miss_reason, hit.miss_block, len(hit.blocks)) == ("diverged", 2, 2)
        assert_blocks_match(hit, other)
    with tiers.lookup([7, *PROMPT[1:]]) as hit:
        assert (hit.miss_reason, hit.miss_block, hit.blocks) == ("no_shared_prefix", 0, [])


def test_another_namespace_shares_nothing(tiers: Tiers) -> None:
    tiers.store_prompt(PROMPT)
    other_ns = namespace_hash(model_fingerprint="prefix-cache-test", block_size=BS, tenant="other")
    with tiers.lookup(PROMPT, ns=other_ns) as hit:
        assert (hit.miss_reason, hit.blocks) == ("no_shared_prefix", [])


def test_evicted_once_a_block_left_every_tier(tmp_path: Path) -> None:
    record_bytes = record_size()
    disk = DiskStore(tmp_path / "blocks", 1 << 30)
    t = build([disk], memory_bytes=4 * record_bytes)
    try:
        t.store_prompt(PROMPT)
        t.store_prompt([50 + x for x in PROMPT])  # memory evicts the first prompt's blocks, tip first
        disk.delete(block_hashes(PROMPT, BS, NS))  # ... and the disk lost them too
        with t.lookup(PROMPT) as hit:
            assert hit.blocks == [] and hit.miss_reason == "evicted" and hit.miss_block == 0
        other = [50 + x for x in PROMPT]
        t.store.clear()  # a flush: every block left every tier
        with t.lookup(other) as hit:
            assert hit.miss_reason == "evicted"
        with t.lookup([9999, *PROMPT[1:]]) as hit:
            assert hit.miss_reason == "no_shared_prefix"
    finally:
        t.store.close()


def test_store_unavailable_when_the_tier_that_holds_the_block_is_down(private_redis: RedisServer) -> None:
    t = build([RedisStore(private_redis.url, prefix="kvptest:down:", timeout_ms=200)])
    try:
        t.store_prompt(PROMPT)
        t.memory.clear()
        private_redis.kill()
        with t.lookup(PROMPT) as hit:
            assert (hit.miss_reason, hit.miss_block, hit.blocks) == ("store_unavailable", 0, [])
    finally:
        t.store.close()


def _corrupt(record: bytes | bytearray) -> bytes:
    bad = bytearray(record)
    bad[-1] ^= 0x01
    return bytes(bad)


@pytest.mark.parametrize("tier", ["memory", "disk", "redis"])
def test_a_corrupted_record_ends_the_match_and_is_deleted_everywhere(tiers: Tiers, tier: str) -> None:
    tiers.store_prompt(PROMPT)
    hashes = block_hashes(PROMPT, BS, NS)
    (good,) = tiers.lower[0].get_many([hashes[2]])
    assert good is not None
    target = {"memory": tiers.memory, "disk": tiers.lower[0], "redis": tiers.lower[1]}[tier]
    tiers.memory.clear()
    for store in tiers.lower:
        store.delete([hashes[2]])
    target.put_many([(hashes[2], _corrupt(good))])
    if tier != "memory":
        firsts = tiers.lower[0].get_many(hashes[:2])
        tiers.memory.put_many([(h, v) for h, v in zip(hashes[:2], firsts, strict=True) if v is not None])
    with tiers.lookup(PROMPT) as hit:
        assert (hit.miss_reason, hit.miss_block, len(hit.blocks)) == ("verification_failed", 2, 2)
        assert_blocks_match(hit, PROMPT)
    assert tiers.store.contains([hashes[2]]) == [False]
    assert tiers.trie.contains([hashes[2]]) == [False]
    assert tiers.cache.stats().verification_failures == {"ChecksumMismatch": 1}
    assert tiers.trie.stats().locked == 0
    # The next request re-stores the block and hits again.
    assert tiers.store_prompt(PROMPT, first=2) == 1
    with tiers.lookup(PROMPT) as hit:
        assert hit.miss_reason == "full_hit"


def test_a_forced_collision_is_caught_and_deleted(tiers: Tiers) -> None:
    """A valid record of block X stored under block Y's key (what an XXH3 collision would look like)."""
    other = [100 + x for x in PROMPT]
    tiers.store_prompt(PROMPT)
    tiers.store_prompt(other)
    hashes, other_hashes = block_hashes(PROMPT, BS, NS), block_hashes(other, BS, NS)
    (foreign,) = tiers.lower[0].get_many([other_hashes[1]])
    assert foreign is not None
    tiers.store.delete([hashes[1]])
    tiers.lower[1].put_many([(hashes[1], foreign)])  # the collision lives in Redis
    with tiers.lookup(PROMPT) as hit:
        assert (hit.miss_reason, hit.miss_block, len(hit.blocks)) == ("verification_failed", 1, 1)
    assert tiers.lower[1].contains([hashes[1]]) == [False]
    assert sum(tiers.cache.stats().verification_failures.values()) == 1


def test_store_blocks_skips_what_the_trie_holds(tiers: Tiers) -> None:
    assert tiers.store_prompt(PROMPT[: 2 * BS]) == 2
    assert tiers.store_prompt(PROMPT) == 2  # blocks 0 and 1 are already there
    stats = tiers.cache.stats()
    assert (stats.stored_blocks, stats.skipped_blocks) == (4, 2)
    assert tiers.trie.stats().evictable == 1  # one chain
    with pytest.raises(ValueError):
        tiers.cache.store_blocks(NS, PROMPT, block_hashes(PROMPT, BS, NS), 3, [kv_for(PROMPT, 3)] * 2)


def test_pinned_blocks_survive_memory_pressure(tmp_path: Path) -> None:
    t = build([DiskStore(tmp_path / "blocks", 1 << 30)], memory_bytes=5 * record_size())
    try:
        t.store_prompt(PROMPT)
        hit = t.lookup(PROMPT)
        other = [200 + x for x in PROMPT]
        t.store_prompt(other)  # only one slot is free: the rest is refused, not evicted
        assert t.memory.contains(hit.hashes) == [True] * 4
        assert t.trie.stats().nodes == len(t.memory)  # refused blocks did not stay in the trie
        hit.release()
        t.store_prompt([300 + x for x in PROMPT])
        assert t.memory.contains(hit.hashes) != [True] * 4
        with t.lookup(other) as again:  # what memory refused, the disk still has
            assert again.miss_reason == "full_hit"
    finally:
        t.store.close()


def test_blocks_whose_parent_memory_lost_go_to_the_lower_tiers_only(tmp_path: Path) -> None:
    """Memory holds two blocks. A prompt's blocks stored in two calls (as chunked prefill does):
    the second call's blocks have a parent memory refused, so they must not evict the prefix
    memory can serve; the lower tier still gets every block."""
    disk = DiskStore(tmp_path / "blocks", 1 << 30)
    t = build([disk], memory_bytes=2 * record_size() + 64)
    tokens = list(range(1, 6 * BS + 1))  # 6 full blocks
    hashes = block_hashes(tokens, BS, NS)
    first = t.cache.store_blocks(NS, tokens, hashes, 0, [kv_for(tokens, i) for i in range(3)])
    second = t.cache.store_blocks(NS, tokens, hashes, 3, [kv_for(tokens, i) for i in range(3, 6)])
    assert (first, second) == ([0, 1, 2], [3, 4, 5])
    assert t.store.drain(10)
    assert t.memory.contains(hashes) == [True, True, False, False, False, False]
    assert disk.contains(hashes) == [True] * 6
    with t.lookup(tokens) as hit:
        assert hit.tiers == ["memory", "memory", "disk", "disk", "disk", "disk"]
        assert_blocks_match(hit, tokens)
    t.store.close()
