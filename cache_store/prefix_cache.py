"""The prefix cache: block hashing + the trie + the tiered store + the record codec.

``lookup`` finds the longest verified leading run of a prompt's full blocks and pins it in the
trie until ``PrefixHit.release()``; ``store_blocks`` encodes new blocks and puts them in the trie
and memory now (lower tiers are written in the background by ``TieredStore``).

A hash match alone never decides: every record is decoded against the namespace, parent hash,
block hash and token ids the prompt implies (plus dtype and K/V shapes). The first record that
fails ends the match, is deleted from every tier and counted.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from cache_store.codec import (
    BlockKV,
    LayerShape,
    RecordError,
    StateSpec,
    StateTensor,
    decode_block,
    encode_block,
)
from cache_store.hashing import block_hashes
from cache_store.pins import PinOutcome, PinTable
from cache_store.tiered import TieredStore
from cache_store.trie import PrefixTrie, TrieStats

log = logging.getLogger(__name__)

MISS_REASONS = (
    "full_hit",
    "short_prompt",
    "no_shared_prefix",
    "diverged",
    "evicted",
    "verification_failed",
    "store_unavailable",
    "cache_disabled",
)

TokenIds = Sequence[int] | np.ndarray
BlockTensors = tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]
"""One block's ``(keys, values)``: per layer [kv_heads, block_size, head_dim] tensors."""


@dataclass
class PrefixHit:
    """The verified leading run of a prompt's blocks, pinned in the trie until ``release()``.

    ``hashes``: every full-block hash of the prompt; ``blocks``/``tiers``: the verified leading run
    and the tier each came from; ``miss_reason``: one of ``MISS_REASONS``; ``miss_block``: index of
    the block where the match stopped (``None`` on a full hit or when there is no full block).
    """

    hashes: list[bytes]
    blocks: list[BlockKV]
    tiers: list[str]
    miss_reason: str
    miss_block: int | None
    _trie: PrefixTrie | None = field(default=None, repr=False)
    _pinned: list[bytes] = field(default_factory=list, repr=False)
    _released: bool = field(default=False, repr=False)

    @classmethod
    def miss(cls, hashes: list[bytes], reason: str, miss_block: int | None = None) -> PrefixHit:
        """A hit with no blocks (e.g. ``cache_disabled``), nothing pinned."""
        return cls(hashes=hashes, blocks=[], tiers=[], miss_reason=reason, miss_block=miss_block)

    @property
    def matched_blocks(self) -> int:
        return len(self.blocks)

    def release(self) -> None:
        """Unpin the matched blocks; idempotent."""
        if self._released:
            return
        self._released = True
        if self._trie is not None and self._pinned:
            self._trie.unlock(self._pinned)

    def __enter__(self) -> PrefixHit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass(frozen=True)
class PrefixCacheStats:
    lookups: int
    hit_blocks: dict[str, int]
    """Verified blocks served, by tier."""
    miss_reasons: dict[str, int]
    verification_failures: dict[str, int]
    """Rejected records, by ``RecordError`` subclass name."""
    stored_blocks: int
    skipped_blocks: int
    """Blocks ``store_blocks`` did not write because the trie already held them."""
    trie: TrieStats


class PrefixCache:
    """Prefix lookup and block storage over ``store`` (memory in front of disk/Redis) and ``trie``.

    ``trie`` must be the memory tier's eviction policy (``MemoryStore(policy=trie)``), so that
    what is pinned here is what memory keeps. ``pins`` (over the same trie) keeps prefixes in
    memory for a TTL (cache breakpoints); a lookup that reads a pinned prefix refreshes it.
    """

    def __init__(
        self, store: TieredStore, trie: PrefixTrie, block_size: int, pins: PinTable | None = None
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.store = store
        self.trie = trie
        self.block_size = block_size
        self.pins = pins
        self._lock = threading.Lock()
        self._lookups = 0
        self._hit_blocks: Counter[str] = Counter()
        self._reasons: Counter[str] = Counter()
        self._failures: Counter[str] = Counter()
        self._stored = 0
        self._skipped = 0

    def lookup(
        self,
        namespace: bytes,
        token_ids: TokenIds,
        *,
        dtype: torch.dtype | None,
        layer_shapes: Sequence[LayerShape] | None,
        state_specs: Sequence[StateSpec] | None = None,
    ) -> PrefixHit:
        """Every full-block hash of ``token_ids`` and the longest verified leading run of cached
        blocks, pinned until ``release()``. ``layer_shapes``: expected ``(k_shape, v_shape)`` per
        K/V layer, each ``(kv_heads, block_size, head_dim)``; ``None`` skips that check.
        ``state_specs``: the recurrent state a record may carry (a record with other state is bad)."""
        hashes = block_hashes(token_ids, self.block_size, namespace)
        if not hashes:
            return self._count(PrefixHit.miss(hashes, "short_prompt"))
        get_errors = self._lower_get_errors()
        found = self.store.get_prefix(hashes)
        # Blocks promoted from a lower tier entered the trie as roots: restore their chain.
        self.trie.link(hashes[: len(found)])
        bs = self.block_size
        blocks: list[BlockKV] = []
        tiers: list[str] = []
        reason: str | None = None
        for i, (record, tier) in enumerate(found):
            try:
                block = decode_block(
                    record,
                    namespace=namespace,
                    parent=namespace if i == 0 else hashes[i - 1],
                    block_hash=hashes[i],
                    token_ids=[int(t) for t in token_ids[i * bs : (i + 1) * bs]],
                    dtype=dtype,
                    layer_shapes=layer_shapes,
                    state_specs=state_specs,
                )
            except RecordError as exc:
                self._reject(hashes[i], tier, exc)
                reason = "verification_failed"
                break
            blocks.append(block)
            tiers.append(tier)
        miss_block: int | None = None if len(blocks) == len(hashes) else len(blocks)
        if reason is None:
            reason = "full_hit" if miss_block is None else self._why_missing(hashes, len(blocks), get_errors)
        hit = PrefixHit(hashes=hashes, blocks=blocks, tiers=tiers, miss_reason=reason, miss_block=miss_block)
        hit._trie = self.trie
        hit._pinned = self.trie.lock(hashes[: len(blocks)])
        if self.pins is not None and blocks:
            self.pins.touch(hashes[: len(blocks)])
        return self._count(hit)

    def pin(self, tenant: str, hashes: Sequence[bytes], ttl_s: float, *, source: str) -> PinOutcome | None:
        """Keep the prefix ``hashes`` (the leading run memory holds) in memory for ``ttl_s``;
        ``None`` when this cache has no pin table."""
        if self.pins is None:
            return None
        return self.pins.pin(tenant, hashes, ttl_s, source=source)

    def clear_index(self) -> None:
        """Forget what memory held (after the tiers were cleared): the trie and every pin."""
        if self.pins is not None:
            self.pins.clear()
        self.trie.clear()

    def store_blocks(
        self,
        namespace: bytes,
        token_ids: TokenIds,
        hashes: Sequence[bytes],
        first_block: int,
        keys_values: Sequence[BlockTensors],
        *,
        states: Mapping[int, Sequence[StateTensor]] | None = None,
        dtype: torch.dtype | None = None,
        replace_held: bool = False,
    ) -> list[int]:
        """Encode and store blocks ``first_block, first_block + 1, ...``: ``keys_values[j]`` holds
        block ``first_block + j``; ``states[i]``, when given, the recurrent state after block ``i``
        (the record's state section; ``dtype`` names the record dtype of a model without K/V
        layers). Blocks the trie already holds are skipped, unless ``replace_held`` and they come
        with state: their record is rewritten with it (same K/V, one atomic put per tier). Returns
        the indices of the blocks written that were not held before (memory now, lower tiers in
        the background)."""
        if first_block < 0 or first_block + len(keys_values) > len(hashes):
            raise ValueError(
                f"blocks {first_block}..{first_block + len(keys_values) - 1} outside the "
                f"{len(hashes)} hashed blocks"
            )
        if len(token_ids) < len(hashes) * self.block_size:
            raise ValueError("token_ids is shorter than the hashed blocks")
        indices = range(first_block, first_block + len(keys_values))
        present = self.trie.contains([hashes[i] for i in indices])
        # A block whose parent memory does not hold can never be read from memory (a lookup
        # takes memory's leading run), and putting it there would evict the blocks of a prefix
        # that can: such blocks go to the lower tiers only.
        linked = first_block == 0 or self.trie.contains([hashes[first_block - 1]])[0]
        bs = self.block_size
        items: list[tuple[bytes, bytearray]] = []
        lower_only: list[tuple[bytes, bytearray]] = []
        written: list[int] = []
        states = states or {}
        for i, (keys, values), known in zip(indices, keys_values, present, strict=True):
            if known and not (replace_held and states.get(i)):
                linked = True
                continue
            if not known:
                written.append(i)
            linked = linked or known
            record = encode_block(
                namespace=namespace,
                parent=namespace if i == 0 else hashes[i - 1],
                block_hash=hashes[i],
                token_ids=[int(t) for t in token_ids[i * bs : (i + 1) * bs]],
                keys=keys,
                values=values,
                states=states.get(i, ()),
                dtype=dtype,
            )
            if not linked:
                lower_only.append((hashes[i], record))
                continue
            # Into the trie (pinned) before memory, so the trie policy never meets one of our keys
            # as a stranger and cannot pick a block between its insert and its put.
            self.trie.insert([hashes[i]], hashes[i - 1] if i else None, [len(record)], pin=True)
            items.append((hashes[i], record))
        if lower_only:
            self.store.put_lower(lower_only)
        new_keys = [key for key, _ in items]
        try:
            taken = self.store.put_many(items) if items else 0
        finally:
            self.trie.unlock(new_keys)
        if taken < len(items):
            # Memory refused some (full of pinned blocks): they must not stay in the trie, or they
            # would be skipped as "present" forever. The lower tiers still get them.
            held = self.store.memory.contains(new_keys)
            for key, ok in zip(new_keys, held, strict=True):
                if not ok:
                    self.trie.removed(key)
        with self._lock:
            self._stored += len(items) + len(lower_only)
            self._skipped += len(keys_values) - len(items) - len(lower_only)
        return written

    def stats(self) -> PrefixCacheStats:
        trie = self.trie.stats()
        with self._lock:
            return PrefixCacheStats(
                lookups=self._lookups,
                hit_blocks=dict(self._hit_blocks),
                miss_reasons=dict(self._reasons),
                verification_failures=dict(self._failures),
                stored_blocks=self._stored,
                skipped_blocks=self._skipped,
                trie=trie,
            )

    # -- helpers ------------------------------------------------------------------------------

    def _count(self, hit: PrefixHit) -> PrefixHit:
        with self._lock:
            self._lookups += 1
            self._reasons[hit.miss_reason] += 1
            self._hit_blocks.update(hit.tiers)
        return hit

    def _reject(self, key: bytes, tier: str, exc: RecordError) -> None:
        """A record failed verification: drop it from every tier and from the trie."""
        log.warning("block %s from %s failed verification: %s", key.hex(), tier, exc)
        self.store.delete([key])
        self.trie.removed(key)
        with self._lock:
            self._failures[type(exc).__name__] += 1

    def _lower_get_errors(self) -> int:
        return sum(tier.stats().errors.get("get", 0) for tier in self.store.lower)

    def _why_missing(self, hashes: Sequence[bytes], k: int, get_errors_before: int) -> str:
        """Why block ``k`` was found in no tier."""
        lower = [tier.stats() for tier in self.store.lower]
        if any(not s.healthy or s.breaker == "open" for s in lower) or (
            sum(s.errors.get("get", 0) for s in lower) != get_errors_before
        ):
            return "store_unavailable"
        if self.trie.was_evicted(hashes[k]):
            return "evicted"
        return "no_shared_prefix" if k == 0 else "diverged"
