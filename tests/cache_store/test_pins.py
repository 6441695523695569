"""PinTable over a real PrefixTrie and a real MemoryStore(policy=trie): pinned prefixes survive memory
pressure until their TTL passes; touches and re-pins refresh; overlapping pins share bytes; a tenant
over its share yields its own pins, never another tenant's."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import pytest

from cache_store.hashing import block_hashes, namespace_hash
from cache_store.memory import MemoryStore
from cache_store.pins import PinTable, pin_id_of
from cache_store.trie import PrefixTrie

BS = 4  # tokens per block
SIZE = 10  # bytes per block record


class FakeClock:
    """A clock the test moves; never goes backwards, even when threads advance it together."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


def chain(tenant: str, blocks: int, seed: int = 0) -> list[bytes]:
    """Real chained block hashes: the same (tenant, seed) gives a prefix of a longer chain."""
    ns = namespace_hash(model_fingerprint="pins-test", block_size=BS, tenant=tenant)
    return block_hashes([seed * 10_000 + i for i in range(blocks * BS)], BS, ns)


@dataclass
class Rig:
    clock: FakeClock
    trie: PrefixTrie
    memory: MemoryStore
    table: PinTable

    def store(self, hashes: list[bytes]) -> None:
        """What PrefixCache.store_blocks does: index (locked), put into memory, unlock, and drop
        from the index what memory refused."""
        self.trie.insert(hashes, None, [SIZE] * len(hashes), pin=True)
        self.memory.put_many([(k, bytes(SIZE)) for k in hashes])
        self.trie.unlock(hashes)
        for key, held in zip(hashes, self.memory.contains(hashes), strict=True):
            if not held:
                self.trie.removed(key)

    def cached(self, tenant: str, blocks: int, seed: int = 0) -> list[bytes]:
        hashes = chain(tenant, blocks, seed)
        self.store(hashes)
        return hashes

    def flood(self, blocks: int) -> None:
        """Memory pressure: unrelated single-block prompts, more than the memory tier holds."""
        for i in range(blocks):
            self.store(chain("flood", 1, seed=100_000 + i + int(self.clock.now)))

    def held(self, hashes: list[bytes]) -> bool:
        return all(self.memory.contains(hashes))


def make_rig(*, memory_blocks: int = 10, max_bytes: int = 100, tenant_fraction: float = 0.5) -> Rig:
    clock = FakeClock()
    trie = PrefixTrie()
    memory = MemoryStore(max_bytes=memory_blocks * SIZE, policy=trie)
    table = PinTable(trie, block_size=BS, max_bytes=max_bytes, tenant_fraction=tenant_fraction, clock=clock)
    return Rig(clock, trie, memory, table)


def test_pinned_chain_survives_memory_pressure_and_is_evicted_after_its_ttl() -> None:
    rig = make_rig()
    pinned = rig.cached("t", 3)
    old = rig.cached("t", 3, seed=1)
    outcome = rig.table.pin("t", pinned, 60, source="cache_control")
    assert outcome.pin is not None and outcome.reason is None and outcome.yielded == ()
    assert rig.trie.stats().pinned == 3

    rig.flood(20)
    assert rig.held(pinned)
    assert not any(rig.memory.contains(old))
    assert len(rig.memory) == 10  # the rest of memory still turns over

    rig.clock.advance(60)
    assert rig.table.sweep() == 1
    assert rig.trie.stats().pinned == 0
    assert rig.table.stats().expired == 1
    rig.flood(20)
    assert not any(rig.memory.contains(pinned))


def test_expiry_is_lazy_on_any_call() -> None:
    rig = make_rig()
    hashes = rig.cached("t", 2)
    rig.table.pin("t", hashes, 5, source="admin")
    rig.clock.advance(4.9)
    assert len(rig.table.pins()) == 1
    rig.clock.advance(0.1)
    assert rig.table.pins() == []
    assert rig.trie.stats().pinned == 0
    assert rig.table.sweep() == 0
    assert rig.table.stats().expired == 1


def test_pin_info_fields() -> None:
    rig = make_rig()
    hashes = rig.cached("t", 3)
    info = rig.table.pin("t", hashes, 30, source="prompt_cache_retention").pin
    assert info is not None
    assert info.id == "pin_" + hashes[-1].hex() == pin_id_of(hashes[-1])
    assert (info.tenant, info.source, info.blocks, info.tokens, info.bytes) == (
        "t",
        "prompt_cache_retention",
        3,
        3 * BS,
        3 * SIZE,
    )
    assert (info.ttl_s, info.expires_at, info.expires_in_s, info.hits) == (30, 1030.0, 30.0, 0)
    assert info.created_at > 0
    rig.clock.advance(12)
    got = rig.table.get(info.id)
    assert got is not None and got.expires_in_s == 18.0


def test_touch_refreshes_pins_ending_in_the_read_run_and_counts_hits() -> None:
    rig = make_rig()
    hashes = rig.cached("t", 4)
    pin_id = rig.table.pin("t", hashes[:3], 60, source="cache_control").pin.id  # type: ignore[union-attr]
    rig.clock.advance(50)
    assert rig.table.touch(hashes[:2]) == 0  # the pin ends on block 2: not read in full
    assert rig.table.touch(hashes) == 1
    rig.clock.advance(50)  # past the original deadline
    assert rig.table.sweep() == 0
    info = rig.table.get(pin_id)
    assert info is not None and info.hits == 1 and info.expires_in_s == 10.0
    rig.flood(20)
    assert rig.held(hashes[:3])
    rig.clock.advance(10)
    assert rig.table.get(pin_id) is None


def test_repinning_the_same_prefix_refreshes_it() -> None:
    rig = make_rig()
    hashes = rig.cached("t", 2)
    first = rig.table.pin("t", hashes, 100, source="cache_control").pin
    rig.clock.advance(10)
    shorter = rig.table.pin("t", hashes, 30, source="cache_control").pin
    assert first is not None and shorter is not None
    assert shorter.id == first.id
    assert (shorter.ttl_s, shorter.expires_at) == (100, 1100.0)  # never shortened
    longer = rig.table.pin("t", hashes + chain("t", 3)[2:], 200, source="admin").pin  # block 2 unknown
    assert longer is not None and longer.id == first.id
    assert (longer.ttl_s, longer.expires_at, longer.source) == (200, 1210.0, "cache_control")
    stats = rig.table.stats()
    assert (stats.pins, stats.created, stats.refreshed, stats.bytes) == (1, 1, 2, 2 * SIZE)


def test_pin_takes_the_leading_run_the_trie_knows() -> None:
    rig = make_rig()
    hashes = chain("t", 4)
    rig.store(hashes[:2])
    rig.store(hashes[3:])  # block 2 is missing: block 3 is not part of the run
    info = rig.table.pin("t", hashes, 10, source="cache_control").pin
    assert info is not None and info.blocks == 2 and info.id == pin_id_of(hashes[1])


def test_not_in_memory_when_block_zero_is_unknown() -> None:
    rig = make_rig()
    hashes = chain("t", 3)
    rig.store(hashes[1:])
    for attempt in (hashes, []):
        outcome = rig.table.pin("t", attempt, 10, source="cache_control")
        assert (outcome.pin, outcome.yielded, outcome.reason) == (None, (), "not_in_memory")
    assert rig.table.stats().refused == 0  # refused counts budget refusals only


def test_overlapping_pins_count_shared_blocks_once() -> None:
    rig = make_rig()
    hashes = rig.cached("t", 4)
    short = rig.table.pin("t", hashes[:2], 100, source="cache_control").pin
    long = rig.table.pin("t", hashes, 50, source="cache_control").pin
    assert short is not None and long is not None and short.id != long.id
    assert (short.bytes, long.bytes) == (2 * SIZE, 4 * SIZE)
    assert rig.table.pinned_bytes("t") == rig.table.pinned_bytes() == 4 * SIZE
    assert rig.trie.stats().pinned == 4

    released = rig.table.unpin(long.id)
    assert released is not None and released.id == long.id
    assert rig.table.get(long.id) is None
    assert rig.table.pinned_bytes() == 2 * SIZE
    assert rig.trie.stats().pinned == 2
    rig.flood(20)
    assert rig.held(hashes[:2])
    assert not any(rig.memory.contains(hashes[2:]))


def test_releasing_the_shorter_pin_keeps_the_longer_ones_blocks() -> None:
    rig = make_rig()
    hashes = rig.cached("t", 3)
    short = rig.table.pin("t", hashes[:1], 10, source="cache_control").pin
    rig.table.pin("t", hashes, 100, source="cache_control")
    assert short is not None
    rig.clock.advance(10)
    assert rig.table.sweep() == 1
    assert rig.trie.stats().pinned == 3
    assert rig.table.pinned_bytes() == 3 * SIZE
    rig.flood(20)
    assert rig.held(hashes)


def test_a_tenant_over_its_share_yields_its_own_soonest_expiring_pin() -> None:
    rig = make_rig(memory_blocks=20, max_bytes=100)  # 50 bytes (5 blocks) per tenant
    keep = rig.cached("a", 2, seed=1)
    soon = rig.cached("a", 2, seed=2)
    other = rig.cached("b", 2, seed=3)
    table = rig.table
    keep_id = table.pin("a", keep, 100, source="cache_control").pin.id  # type: ignore[union-attr]
    soon_id = table.pin("a", soon, 50, source="cache_control").pin.id  # type: ignore[union-attr]
    other_id = table.pin("b", other, 10, source="cache_control").pin.id  # type: ignore[union-attr]

    new = rig.cached("a", 2, seed=4)
    outcome = table.pin("a", new, 30, source="cache_control")
    assert outcome.pin is not None and outcome.yielded == (soon_id,)
    assert {p.id for p in table.pins()} == {keep_id, other_id, outcome.pin.id}
    assert table.pinned_bytes("a") == 4 * SIZE and table.pinned_bytes("b") == 2 * SIZE
    assert rig.trie.stats().pinned == 6
    assert table.stats().yielded == 1


def test_the_global_budget_only_ever_costs_the_pinning_tenant() -> None:
    rig = make_rig(memory_blocks=20, max_bytes=60, tenant_fraction=1.0)
    table = rig.table
    b_pin = table.pin("b", rig.cached("b", 4, seed=1), 10, source="admin").pin
    a_old = table.pin("a", rig.cached("a", 2, seed=2), 100, source="admin").pin
    assert b_pin is not None and a_old is not None

    outcome = table.pin("a", rig.cached("a", 2, seed=3), 100, source="admin")
    assert outcome.pin is not None and outcome.yielded == (a_old.id,)  # b's sooner pin stays
    assert table.get(b_pin.id) is not None

    # Even yielding all of a's pins would leave 40 + 40 > 60: refused, nothing yielded.
    refused = table.pin("a", rig.cached("a", 4, seed=4), 100, source="admin")
    assert (refused.pin, refused.yielded, refused.reason) == (None, (), "over_budget")
    assert {p.id for p in table.pins()} == {b_pin.id, outcome.pin.id}
    stats = table.stats()
    assert (stats.refused, stats.yielded, stats.bytes) == (1, 1, 60)


def test_a_pin_too_big_for_the_share_is_refused_without_yielding() -> None:
    rig = make_rig(memory_blocks=20, max_bytes=100)  # 50 bytes per tenant
    small = rig.table.pin("t", rig.cached("t", 2, seed=1), 10, source="cache_control").pin
    big = rig.table.pin("t", rig.cached("t", 6, seed=2), 10, source="cache_control")
    assert (big.pin, big.yielded, big.reason) == (None, (), "over_budget")
    assert small is not None and rig.table.get(small.id) is not None
    assert rig.trie.stats().pinned == 2


def test_extending_a_pinned_prefix_needs_room_only_for_the_new_blocks() -> None:
    rig = make_rig(memory_blocks=20, max_bytes=100)  # 5 blocks per tenant
    hashes = rig.cached("t", 5)
    short = rig.table.pin("t", hashes[:4], 20, source="cache_control").pin
    long = rig.table.pin("t", hashes, 10, source="cache_control").pin
    assert short is not None and long is not None
    assert rig.table.stats().yielded == 0 and rig.table.pinned_bytes("t") == 5 * SIZE
    # A sixth block must yield the long pin (sooner); that frees only its last block, since the
    # short pin still holds the other four, and that is enough.
    outcome = rig.table.pin("t", rig.cached("t", 1, seed=9), 30, source="cache_control")
    assert outcome.pin is not None and outcome.yielded == (long.id,)
    assert rig.table.get(short.id) is not None
    assert rig.table.pinned_bytes("t") == 5 * SIZE
    assert rig.trie.stats().pinned == 5
    assert rig.trie.contains(hashes) == [True] * 5  # the fifth block is unpinned, not gone


def test_yielding_a_pin_whose_blocks_another_pin_holds_frees_nothing() -> None:
    rig = make_rig(memory_blocks=20, max_bytes=100)  # 5 blocks per tenant
    hashes = rig.cached("t", 5)
    short = rig.table.pin("t", hashes[:4], 10, source="cache_control").pin
    long = rig.table.pin("t", hashes, 20, source="cache_control").pin
    assert short is not None and long is not None
    # The short pin goes first (sooner) but frees nothing: the long one holds all its blocks.
    outcome = rig.table.pin("t", rig.cached("t", 1, seed=9), 30, source="cache_control")
    assert outcome.pin is not None and outcome.yielded == (short.id, long.id)
    assert rig.table.pinned_bytes("t") == SIZE
    assert rig.trie.stats().pinned == 1


def test_zero_budget_turns_pinning_off() -> None:
    rig = make_rig(max_bytes=0)
    outcome = rig.table.pin("t", rig.cached("t", 1), 10, source="admin")
    assert (outcome.pin, outcome.reason) == (None, "over_budget")
    assert rig.trie.stats().pinned == 0
    assert rig.table.stats().refused == 1


def test_a_block_that_left_the_trie_gets_its_flag_back_on_touch() -> None:
    rig = make_rig()
    hashes = rig.cached("t", 2)
    rig.table.pin("t", hashes, 60, source="cache_control")
    rig.memory.delete([hashes[1]])  # e.g. a record that failed verification
    assert rig.trie.stats().pinned == 1
    rig.store(hashes[1:])
    assert rig.trie.stats().pinned == 1  # a new node, no flag yet
    assert rig.table.touch(hashes) == 1
    assert rig.trie.stats().pinned == 2
    rig.flood(20)
    assert rig.held(hashes)


def test_unpin_clear_and_stats() -> None:
    rig = make_rig(memory_blocks=20)
    table = rig.table
    a = table.pin("a", rig.cached("a", 2, seed=1), 30, source="admin").pin
    b = table.pin("b", rig.cached("b", 1, seed=2), 20, source="admin").pin
    c = table.pin("b", rig.cached("b", 2, seed=3), 10, source="admin").pin
    assert a is not None and b is not None and c is not None
    assert [p.id for p in table.pins()] == [c.id, b.id, a.id]  # soonest expiry first
    assert [p.id for p in table.pins("b")] == [c.id, b.id]
    assert table.pins("nobody") == []
    assert len(table) == 3

    removed = table.unpin(a.id)
    assert removed is not None and removed.id == a.id
    for bad in (a.id, "pin_zz", "nope", ""):
        assert table.unpin(bad) is None
        assert table.get(bad) is None
    assert table.pinned_bytes("a") == 0
    assert table.clear() == 2
    assert table.clear() == 0
    assert table.pins() == [] and table.pinned_bytes() == 0
    assert rig.trie.stats().pinned == 0
    stats = table.stats()
    assert (stats.pins, stats.bytes, stats.max_bytes, stats.tenant_max_bytes) == (0, 0, 100, 50)
    assert (stats.created, stats.refreshed, stats.expired) == (3, 0, 0)
    assert (stats.yielded, stats.refused, stats.removed) == (0, 0, 3)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"block_size": 0},
        {"max_bytes": -1},
        {"tenant_fraction": 0.0},
        {"tenant_fraction": 1.5},
        {"tenant_fraction": math.nan},
    ],
)
def test_constructor_rejects_bad_config(kwargs: dict[str, float]) -> None:
    args: dict = {"block_size": BS, "max_bytes": 100} | kwargs
    with pytest.raises(ValueError):
        PinTable(PrefixTrie(), **args)


@pytest.mark.parametrize(
    ("tenant", "ttl_s"),
    [("t", 0), ("t", -1), ("t", math.nan), ("t", math.inf), ("", 10)],
)
def test_pin_rejects_bad_input(tenant: str, ttl_s: float) -> None:
    rig = make_rig()
    with pytest.raises(ValueError):
        rig.table.pin(tenant, rig.cached("t", 1), ttl_s, source="admin")


def test_pin_rejects_blocks_claimed_by_another_tenant() -> None:
    rig = make_rig()
    hashes = rig.cached("t", 2)
    rig.table.pin("t", hashes, 10, source="admin")
    with pytest.raises(ValueError):
        rig.table.pin("u", hashes, 10, source="admin")
    with pytest.raises(ValueError):
        rig.table.pin("u", hashes[:1], 10, source="admin")


def test_expiry_heap_stays_bounded_under_many_touches() -> None:
    rig = make_rig()
    hashes = rig.cached("t", 2)
    rig.table.pin("t", hashes, 10, source="admin")
    for _ in range(5_000):
        rig.clock.advance(0.001)
        rig.table.touch(hashes)
    assert len(rig.table._expiry) <= 2 * len(rig.table) + 1024
    rig.clock.advance(10)
    assert rig.table.sweep() == 1


def test_thread_safety_under_concurrent_use() -> None:
    rig = make_rig(memory_blocks=200, max_bytes=400)
    tenants = ["a", "b", "c", "d"]
    chains = {t: [rig.cached(t, 3, seed=s) for s in range(5)] for t in tenants}
    errors: list[BaseException] = []

    def worker(tenant: str) -> None:
        try:
            for i in range(200):
                hashes = chains[tenant][i % 5]
                outcome = rig.table.pin(tenant, hashes[: 1 + i % 3], 1 + i % 7, source="admin")
                rig.table.touch(hashes)
                if outcome.pin is not None and i % 4 == 0:
                    rig.table.unpin(outcome.pin.id)
                rig.clock.advance(0.5)  # racy on purpose: expiry runs in every thread
        except BaseException as exc:  # pragma: no cover - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in tenants]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    pins = rig.table.pins()
    covered = {
        key
        for p in pins
        for hashes in chains[p.tenant]
        for key in hashes[: p.blocks]
        if pin_id_of(hashes[p.blocks - 1]) == p.id
    }
    assert rig.table.pinned_bytes() == len(covered) * SIZE
    assert rig.trie.stats().pinned == len(covered)
    for tenant in tenants:
        assert rig.table.pinned_bytes(tenant) <= rig.table.stats().tenant_max_bytes
    rig.table.clear()
    assert rig.trie.stats().pinned == 0
