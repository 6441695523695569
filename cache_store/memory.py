"""The memory tier: a byte-budgeted dict of block records with a pluggable eviction policy.

The policy decides *which* block goes when room is needed (plain LRU by default; the prefix trie
plugs in to evict only unlocked leaves). When the policy has nothing to give (every block pinned),
the incoming block is refused and counted: a put never blocks and never overshoots the budget.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from cache_store.listener import BlockListener, ChangeLog
from cache_store.store import Buffer, StoreStats


@runtime_checkable
class EvictionPolicy(Protocol):
    """Chooses victims for ``MemoryStore``. Called with the store's lock held: it must not call back
    into the store."""

    def added(self, key: bytes, nbytes: int) -> None:
        """``key`` now holds ``nbytes`` in the store."""
        ...

    def touched(self, key: bytes) -> None:
        """``key`` was read (a hit)."""
        ...

    def removed(self, key: bytes) -> None:
        """``key`` left the store (evicted, deleted or cleared). Must be idempotent."""
        ...

    def victim(self) -> bytes | None:
        """The key to evict next, or ``None`` when nothing may be evicted (all pinned)."""
        ...


class LRUPolicy:
    """Least recently used first."""

    def __init__(self) -> None:
        self._order: OrderedDict[bytes, None] = OrderedDict()

    def added(self, key: bytes, nbytes: int) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def touched(self, key: bytes) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def removed(self, key: bytes) -> None:
        self._order.pop(key, None)

    def victim(self) -> bytes | None:
        return next(iter(self._order), None)


class MemoryStore:
    """Block records in process memory, at most ``max_bytes`` of values.

    Values are kept as the very objects given (no copy; a ``memoryview`` is materialized once),
    so the caller must not mutate a buffer after putting it. ``events``, when given, hears of every
    block stored, evicted and deleted and of every clear (``cache_store.listener``).
    """

    name = "memory"

    # A policy that keeps naming keys this store does not hold would loop forever; after this
    # many such answers in a row the put is refused instead.
    _MAX_STALE_VICTIMS = 64

    def __init__(
        self,
        max_bytes: int,
        policy: EvictionPolicy | None = None,
        *,
        events: BlockListener | None = None,
    ) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must not be negative, got {max_bytes}")
        self.max_bytes = max_bytes
        self._policy: EvictionPolicy = policy if policy is not None else LRUPolicy()
        self._lock = threading.Lock()
        self._changes = ChangeLog(self.name, events)
        self._data: dict[bytes, bytes | bytearray] = {}
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._puts = 0
        self._evictions = 0
        self._refused = 0

    @property
    def refused(self) -> int:
        """Blocks refused because they were larger than the budget or nothing could be evicted."""
        with self._lock:
            return self._refused

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | bytearray | None]:
        out: list[bytes | bytearray | None] = []
        with self._lock:
            for key in keys:
                value = self._data.get(key)
                if value is None:
                    self._misses += 1
                else:
                    self._hits += 1
                    self._policy.touched(key)
                out.append(value)
        return out

    def put_many(self, items: Sequence[tuple[bytes, Buffer]]) -> int:
        stored = 0
        with self._lock:
            for key, raw in items:
                value = bytes(raw) if isinstance(raw, memoryview) else raw
                if self._put_locked(key, value):
                    stored += 1
                    self._changes.note("stored", key)
                else:
                    self._refused += 1
            self._changes.emit()
        return stored

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        with self._lock:
            return [key in self._data for key in keys]

    def delete(self, keys: Sequence[bytes]) -> int:
        removed = 0
        with self._lock:
            for key in keys:
                if self._remove_locked(key):
                    removed += 1
                    self._changes.note("deleted", key)
            self._changes.emit()
        return removed

    def clear(self) -> int:
        with self._lock:
            keys = list(self._data)
            for key in keys:
                self._remove_locked(key)
            self._changes.cleared()
            return len(keys)

    def keys(self) -> list[bytes]:
        """Every key held now (a snapshot, in no particular order)."""
        with self._lock:
            return list(self._data)

    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(
                name=self.name,
                blocks=len(self._data),
                bytes=self._bytes,
                capacity_bytes=self.max_bytes,
                hits=self._hits,
                misses=self._misses,
                puts=self._puts,
                evictions=self._evictions,
                errors={"put": self._refused} if self._refused else {},
            )

    def close(self) -> None:
        """Nothing to release; kept for the ``BlockStore`` protocol."""

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def __repr__(self) -> str:
        return f"MemoryStore(max_bytes={self.max_bytes}, blocks={len(self)})"

    # -- helpers (lock held) ------------------------------------------------------------------

    def _put_locked(self, key: bytes, value: bytes | bytearray) -> bool:
        size = len(value)
        if size > self.max_bytes:
            return False
        if key in self._data:
            # A refresh of a held key (blocks are content addressed, so normally the same bytes):
            # touch it first so the policy does not pick it to make room for itself.
            self._policy.touched(key)
        if not self._make_room(key, size):
            return False
        old = self._data.get(key)
        self._data[key] = value
        if old is None:
            self._bytes += size
            self._policy.added(key, size)
        else:
            # Replaced in place: the policy keeps its node (a trie keeps the block's parent link).
            self._bytes += size - len(old)
        self._puts += 1
        return True

    def _make_room(self, key: bytes, size: int) -> bool:
        """Evict until ``size`` bytes for ``key`` fit (counting what ``key`` already holds)."""
        stale = 0
        while True:
            held = self._data.get(key)
            if self._bytes - (len(held) if held is not None else 0) + size <= self.max_bytes:
                return True
            victim = self._policy.victim()
            if victim is None:
                return False
            if self._remove_locked(victim):
                self._evictions += 1
                self._changes.note("evicted", victim)
                stale = 0
            else:
                # The policy named a key we do not hold (e.g. a trie node known only to a lower
                # tier); tell it so and ask again, within a bound.
                self._policy.removed(victim)
                stale += 1
                if stale >= self._MAX_STALE_VICTIMS:
                    return False

    def _remove_locked(self, key: bytes) -> bool:
        value = self._data.pop(key, None)
        if value is None:
            return False
        self._bytes -= len(value)
        self._policy.removed(key)
        return True
