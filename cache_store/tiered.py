"""Memory in front of disk and/or Redis: read-through with promotion, write-behind.

Reads ask memory first, then each lower tier in order, with one batched call per tier for the
keys still missing; what a lower tier returns is promoted into memory. Writes land in memory at
once and reach the lower tiers through a single background writer thread fed by a bounded
queue, so a request never waits on disk or network: when the queue is full the write is dropped
and counted (the block stays in memory; a lower tier is only a cache).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

from cache_store.memory import MemoryStore
from cache_store.store import BlockStore, Buffer, StoreStats

log = logging.getLogger(__name__)

T = TypeVar("T")

StoreObserver = Callable[[str, str, float, bool], None]
"""``observer(tier, op, seconds, ok)``, called after every tier call."""

_BATCH_ITEMS = 64
_STOP = object()


@runtime_checkable
class ListableStore(Protocol):
    """A tier of this process that can list what it holds (memory, disk; not a shared Redis)."""

    name: str

    def keys(self) -> list[bytes]: ...


@dataclass(frozen=True)
class TierClear:
    """What ``clear_tiers`` did to one tier."""

    removed: int
    ok: bool
    """False when the tier counted an error during the clear (it may still hold blocks)."""


@dataclass(frozen=True)
class WriterStats:
    """Background writer figures: blocks waiting, written to every lower tier, dropped because the
    queue was full, and failed (at least one lower tier did not store them)."""

    queued: int
    written: int
    dropped: int
    failed: int


@dataclass
class _Pending:
    key: bytes
    value: Buffer
    seq: int


class TieredStore:
    """``memory`` in front of ``lower`` tiers (e.g. ``[DiskStore, RedisStore]``), in read order."""

    name = "tiered"

    def __init__(
        self,
        memory: MemoryStore,
        lower: Sequence[BlockStore],
        *,
        queue_items: int = 4096,
        observer: StoreObserver | None = None,
    ) -> None:
        if queue_items < 1:
            raise ValueError(f"queue_items must be at least 1, got {queue_items}")
        names = [memory.name, *(t.name for t in lower)]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique, got {names}")
        self.memory = memory
        self.lower: tuple[BlockStore, ...] = tuple(lower)
        self._observer = observer
        self._queue: queue.Queue[_Pending | object] = queue.Queue(maxsize=queue_items)
        self._cond = threading.Condition()
        self._pending = 0  # enqueued and not yet finished by the writer
        self._seq = 0
        self._cleared_seq = 0  # entries enqueued before a clear() are stale
        self._deleted: dict[bytes, int] = {}  # key -> seq of its last delete() while writes pend
        self._written = 0
        self._dropped = 0
        self._failed = 0
        # Held by the writer around a batch and by delete()/clear(), so a write already taken
        # from the queue can never land after a delete of the same key.
        self._io_lock = threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None
        if self.lower:
            self._thread = threading.Thread(target=self._writer_loop, name="kvproxy-tier-writer", daemon=True)
            self._thread.start()

    # -- reads ----------------------------------------------------------------------------------

    def get_prefix(self, keys: Sequence[bytes]) -> list[tuple[bytes | bytearray, str]]:
        """The longest leading run of ``keys`` found in any tier, as ``(value, tier name)``."""
        found = self._lookup(keys, stop_at_first_gap=True)
        out: list[tuple[bytes | bytearray, str]] = []
        for hit in found:
            if hit is None:
                break
            out.append(hit)
        return out

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | bytearray | None]:
        return [None if hit is None else hit[0] for hit in self._lookup(keys, stop_at_first_gap=False)]

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        present = self._observe(self.memory, "contains", self.memory.contains, keys)
        for tier in self.lower:
            missing = [i for i, ok in enumerate(present) if not ok]
            if not missing:
                break
            answer = self._observe(tier, "contains", tier.contains, [keys[i] for i in missing])
            for i, ok in zip(missing, answer, strict=True):
                present[i] = ok
        return present

    # -- writes ---------------------------------------------------------------------------------

    def put_many(self, items: Sequence[tuple[bytes, Buffer]]) -> int:
        """Store in memory now (returns how many memory took) and queue for the lower tiers."""
        stored = self._observe(self.memory, "put", self.memory.put_many, items)
        self.put_lower(items)
        return stored

    def put_lower(self, items: Sequence[tuple[bytes, Buffer]]) -> None:
        """Queue ``items`` for the lower tiers only (memory is not written)."""
        if not self.lower or self._closed:
            return
        for key, value in items:
            with self._cond:
                self._seq += 1
                entry = _Pending(key, value, self._seq)
                try:
                    self._queue.put_nowait(entry)
                except queue.Full:
                    self._dropped += 1
                    continue
                self._pending += 1

    def drain(self, timeout_s: float) -> bool:
        """Wait until every queued write has reached (or failed at) its tiers; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def delete(self, keys: Sequence[bytes]) -> int:
        """Remove ``keys`` from every tier now; returns how many the tier holding most of them had."""
        with self._io_lock:
            with self._cond:
                if self._pending:
                    for key in keys:
                        self._deleted[key] = self._seq
            counts = [self._observe(self.memory, "delete", self.memory.delete, keys)]
            counts += [self._observe(t, "delete", t.delete, keys) for t in self.lower]
        return max(counts)

    def clear(self) -> int:
        """Empty every tier (Redis: only this prefix); queued writes are discarded. Returns the
        largest count any tier removed (``clear_tiers`` tells each tier apart)."""
        return max(outcome.removed for outcome in self.clear_tiers().values())

    def clear_tiers(self) -> dict[str, TierClear]:
        """Empty every tier and say, per tier, how much it removed and whether it failed (a tier
        that errors removes what it can and is reported, never raised)."""
        with self._io_lock:
            with self._cond:
                self._cleared_seq = self._seq
                self._deleted.clear()
            outcomes: dict[str, TierClear] = {}
            for tier in (self.memory, *self.lower):
                errors_before = sum(tier.stats().errors.values())
                removed = self._observe(tier, "clear", tier.clear)
                ok = sum(tier.stats().errors.values()) == errors_before
                outcomes[tier.name] = TierClear(removed=removed, ok=ok)
        return outcomes

    # -- figures and lifecycle ------------------------------------------------------------------

    def stats(self) -> dict[str, StoreStats]:
        return {tier.name: tier.stats() for tier in (self.memory, *self.lower)}

    def held_keys(self) -> dict[str, list[bytes]]:
        """What each tier that can list holds now, by tier name (a cache-aware router's
        snapshot of this replica; a shared Redis is asked by the router itself)."""
        tiers = (self.memory, *self.lower)
        return {tier.name: tier.keys() for tier in tiers if isinstance(tier, ListableStore)}

    def writer_stats(self) -> WriterStats:
        with self._cond:
            return WriterStats(
                queued=self._pending, written=self._written, dropped=self._dropped, failed=self._failed
            )

    def close(self, timeout_s: float = 5.0) -> None:
        """Drain for at most ``timeout_s``, stop the writer, close every tier. Idempotent."""
        if self._closed:
            return
        if not self.drain(timeout_s):
            log.warning("tier writer still had %d blocks queued at close", self.writer_stats().queued)
        self._closed = True
        if self._thread is not None:
            # Unblock the writer even if the queue is full of stale work.
            stopped = False
            while not stopped:
                try:
                    self._queue.put(_STOP, timeout=0.1)
                    stopped = True
                except queue.Full:
                    self._discard_one()
            self._thread.join(timeout=max(timeout_s, 1.0))
        for tier in (self.memory, *self.lower):
            tier.close()

    def __repr__(self) -> str:
        tiers = ", ".join(t.name for t in (self.memory, *self.lower))
        return f"TieredStore({tiers})"

    # -- helpers --------------------------------------------------------------------------------

    def _lookup(
        self, keys: Sequence[bytes], *, stop_at_first_gap: bool
    ) -> list[tuple[bytes | bytearray, str] | None]:
        values = self._observe(self.memory, "get", self.memory.get_many, keys)
        found: list[tuple[bytes | bytearray, str] | None] = [
            None if v is None else (v, self.memory.name) for v in values
        ]
        start = 0
        if stop_at_first_gap:
            # Only the keys after the first memory miss can extend the leading run.
            start = next((i for i, hit in enumerate(found) if hit is None), len(found))
        promoted: list[int] = []
        for tier in self.lower:
            missing = [i for i in range(start, len(keys)) if found[i] is None]
            if not missing:
                break
            got = self._observe(tier, "get", tier.get_many, [keys[i] for i in missing])
            for i, value in zip(missing, got, strict=True):
                if value is not None:
                    found[i] = (value, tier.name)
                    promoted.append(i)
        if stop_at_first_gap:
            # Blocks past the run's end are of no use to this request; leave memory to others.
            gap = next((i for i, hit in enumerate(found) if hit is None), len(found))
            promoted = [i for i in promoted if i < gap]
        promote = [(keys[i], found[i][0]) for i in promoted]  # type: ignore[index]
        if promote:
            self._observe(self.memory, "put", self.memory.put_many, promote)
        return found

    def _observe(self, tier: BlockStore, op: str, fn: Callable[..., T], *args: Any) -> T:
        """Run one tier call, timing it for the observer; ``ok`` means no new errors were counted."""
        if self._observer is None:
            return fn(*args)
        errors_before = sum(tier.stats().errors.values())
        start = time.perf_counter()
        result = fn(*args)
        seconds = time.perf_counter() - start
        ok = sum(tier.stats().errors.values()) == errors_before
        try:
            self._observer(tier.name, op, seconds, ok)
        except Exception:  # a metrics bug must never break a read or a write
            log.exception("store observer failed")
        return result

    def _writer_loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            while len(batch) < _BATCH_ITEMS:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    self._write_batch(batch)
                    return
                batch.append(nxt)
            self._write_batch(batch)

    def _write_batch(self, batch: list[object]) -> None:
        entries = [e for e in batch if isinstance(e, _Pending)]
        live: list[_Pending] = []
        failed = 0
        try:
            with self._io_lock:
                live = self._live(entries)
                items = [(e.key, e.value) for e in live]
                for tier in self.lower if items else ():
                    try:
                        stored = self._observe(tier, "put", tier.put_many, items)
                    except Exception:  # a buggy tier must not kill the writer thread
                        log.exception("tier %s put failed", tier.name)
                        stored = 0
                    failed = max(failed, len(items) - stored)
        finally:
            with self._cond:
                self._written += len(live) - failed
                self._failed += failed
                self._pending -= len(entries)
                if not self._pending:
                    self._deleted.clear()
                self._cond.notify_all()

    def _live(self, entries: list[_Pending]) -> list[_Pending]:
        """Entries not made stale by a clear() or a delete() issued after they were queued."""
        with self._cond:
            return [e for e in entries if e.seq > self._cleared_seq and self._deleted.get(e.key, 0) < e.seq]

    def _discard_one(self) -> None:
        try:
            entry = self._queue.get_nowait()
        except queue.Empty:
            return
        if isinstance(entry, _Pending):
            with self._cond:
                self._pending -= 1
                self._dropped += 1
                self._cond.notify_all()
