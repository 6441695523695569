"""What each replica holds, as the router knows it.

Two sources, one per class:

- ``Holdings``: one replica's own tiers (memory, disk) replayed from the block events it appends
  to its Redis Stream (``cache_store.events``) over a snapshot (``GET /v1/cache/blocks``). Exact
  while the events are consecutive; a gap (events dropped, the stream trimmed past what was
  read) or a new epoch (the replica restarted) makes it stale until a new snapshot.
- ``RoutedBlocks``: the blocks of the requests the router itself sent to each replica lately,
  each for ``ttl_s``. With a short TTL it is the "soon in memory" set (a burst of requests on a
  new prefix sticks to the replica that is prefilling it); with a long one it is the whole index
  when there are no events (Redis down, no Redis).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

TIERS = ("memory", "disk")


@dataclass
class Holdings:
    """One replica's blocks by tier, kept in step with its event stream."""

    epoch: str | None = None
    seq: int = 0
    """The last event applied (events are numbered 1, 2, ... per epoch)."""
    exact: bool = False
    """False until a snapshot was loaded, and again after a gap: then ``held`` is not used."""
    tiers: dict[str, set[bytes]] = field(default_factory=lambda: {t: set() for t in TIERS})

    def reset(self, epoch: str, seq: int, blocks: dict[str, Iterable[bytes]]) -> None:
        """Start over from a snapshot taken after event ``seq``."""
        self.epoch, self.seq, self.exact = epoch, seq, True
        self.tiers = {t: set(blocks.get(t, ())) for t in TIERS}

    def forget(self) -> None:
        """The replica is gone or restarted: nothing it held counts any more."""
        self.epoch, self.seq, self.exact = None, 0, False
        self.tiers = {t: set() for t in TIERS}

    def apply(self, seq: int, op: str, tier: str, hashes: Sequence[bytes]) -> bool:
        """Apply event ``seq``; False when it does not follow the last one (a gap: the caller
        reloads a snapshot). Events already covered by the snapshot are skipped."""
        if seq <= self.seq:
            return True
        if seq != self.seq + 1:
            self.exact = False
            return False
        self.seq = seq
        held = self.tiers.get(tier)
        if held is None:
            return True
        if op == "stored":
            held.update(hashes)
        elif op in ("evicted", "deleted"):
            held.difference_update(hashes)
        elif op == "cleared":
            held.clear()
        return True

    def tier_of(self, block: bytes) -> str | None:
        for tier in TIERS:
            if block in self.tiers[tier]:
                return tier
        return None


class RoutedBlocks:
    """Blocks recently routed to each replica, forgotten after ``ttl_s`` (thread-safe)."""

    def __init__(
        self, ttl_s: float, max_blocks: int = 1_000_000, clock: Callable[[], float] = time.monotonic
    ):
        self.ttl_s = ttl_s
        self.max_blocks = max_blocks
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: dict[str, OrderedDict[bytes, float]] = {}

    def add(self, replica: str, hashes: Sequence[bytes]) -> None:
        now = self._clock()
        with self._lock:
            seen = self._seen.setdefault(replica, OrderedDict())
            for h in hashes:
                seen[h] = now
                seen.move_to_end(h)
            self._expire(seen, now)

    def has(self, replica: str, block: bytes) -> bool:
        now = self._clock()
        with self._lock:
            seen = self._seen.get(replica)
            stamp = seen.get(block) if seen is not None else None
            return stamp is not None and now - stamp <= self.ttl_s

    def forget(self, replica: str) -> None:
        with self._lock:
            self._seen.pop(replica, None)

    def _expire(self, seen: OrderedDict[bytes, float], now: float) -> None:
        while seen:
            _oldest, stamp = next(iter(seen.items()))
            if now - stamp <= self.ttl_s and len(seen) <= self.max_blocks:
                break
            seen.popitem(last=False)
