"""TTL pins: keep a tenant's prefix in the memory tier until a deadline.

Clients ask for a prefix to stay cached for a while (Anthropic ``cache_control`` breakpoints,
OpenAI ``prompt_cache_retention``, an admin pinning a system prompt). LRU alone cannot promise
that: one burst of unrelated traffic evicts it. A pin flags the prefix's trie nodes so that
``MemoryStore(policy=trie)`` never picks them as victims, until the pin's TTL runs out.

Pins are not locks. A lock is held by one request while it runs, is counted per node by the trie,
and must be released by that request. A pin outlives every request, is bounded in time (it
expires on its own, lazily on every call here and in ``sweep()``), and in space (a global byte
budget and a per-tenant share of it, so one tenant cannot pin the whole memory tier). The trie only
holds a boolean per node; the pin records and the per-block reference counts (overlapping pins,
e.g. a prefix and its extension, share blocks) live in ``PinTable``.

A tenant that runs out of share releases (*yields*) its own soonest-expiring pins to make room;
never another tenant's. When even yielding all of them would not make room, nothing is yielded and
the new pin is refused.

Lock order: ``PinTable`` calls the trie while holding its own lock; the trie never calls back.
"""

from __future__ import annotations

import heapq
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cache_store.trie import PrefixTrie

PIN_ID_PREFIX = "pin_"


def pin_id_of(last_hash: bytes) -> str:
    """The id of the pin ending at ``last_hash``: a block hash commits to the tenant and the whole
    prefix, so pinning the same prefix twice names the same pin."""
    return PIN_ID_PREFIX + last_hash.hex()


@dataclass(frozen=True)
class PinInfo:
    """A snapshot of one pin. ``expires_at`` is on the table's clock; ``expires_in_s`` was measured
    when the snapshot was taken; ``created_at`` is wall time, for display only."""

    id: str
    tenant: str
    source: str
    blocks: int
    tokens: int
    bytes: int
    ttl_s: float
    expires_at: float
    expires_in_s: float
    hits: int
    created_at: float


@dataclass(frozen=True)
class PinOutcome:
    """``pin``: the pin made or refreshed (``None`` when nothing was pinned, then ``reason`` is
    ``"not_in_memory"`` or ``"over_budget"``); ``yielded``: ids of the tenant's own pins released
    to make room."""

    pin: PinInfo | None
    yielded: tuple[str, ...]
    reason: str | None


@dataclass(frozen=True)
class PinStats:
    """``refused`` counts over-budget refusals only; ``removed`` counts ``unpin`` and ``clear``."""

    pins: int
    bytes: int
    max_bytes: int
    tenant_max_bytes: int
    created: int
    refreshed: int
    expired: int
    yielded: int
    refused: int
    removed: int


class _Pin:
    """A live pin; the table hands out ``PinInfo`` snapshots, never this."""

    __slots__ = ("created_at", "expires_at", "hashes", "hits", "nbytes", "source", "tenant", "ttl_s")

    def __init__(
        self, tenant: str, source: str, hashes: tuple[bytes, ...], nbytes: int, ttl_s: float, now: float
    ) -> None:
        self.tenant = tenant
        self.source = source
        self.hashes = hashes
        self.nbytes = nbytes
        self.ttl_s = ttl_s
        self.expires_at = now + ttl_s
        self.hits = 0
        self.created_at = time.time()

    @property
    def last(self) -> bytes:
        return self.hashes[-1]


class _Block:
    """One pinned block: how many pins cover it, and the size it was counted with (kept so that
    releasing it subtracts exactly what pinning it added)."""

    __slots__ = ("nbytes", "refs", "tenant")

    def __init__(self, tenant: str, nbytes: int) -> None:
        self.tenant = tenant
        self.nbytes = nbytes
        self.refs = 0


class PinTable:
    """TTL pins over a ``PrefixTrie`` with a global and per-tenant byte budget; thread-safe."""

    def __init__(
        self,
        trie: PrefixTrie,
        *,
        block_size: int,
        max_bytes: int,
        tenant_fraction: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``max_bytes``: the most pinned bytes in all (0 turns pinning off); each tenant may pin
        ``int(max_bytes * tenant_fraction)``. ``clock``: seconds, monotonic (TTLs are measured on it)."""
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if max_bytes < 0:
            raise ValueError(f"max_bytes must not be negative, got {max_bytes}")
        if not 0 < tenant_fraction <= 1:
            raise ValueError(f"tenant_fraction must be in (0, 1], got {tenant_fraction}")
        self._trie = trie
        self._block_size = block_size
        self._max_bytes = max_bytes
        self._tenant_max = int(max_bytes * tenant_fraction)
        self._clock = clock
        self._lock = threading.Lock()
        # Keyed by the pin's last block hash: ``touch`` finds the pins a prompt ends on with one
        # dict lookup per block, and the public id is just this key in hex.
        self._pins: dict[bytes, _Pin] = {}
        self._by_tenant: dict[str, set[bytes]] = {}
        self._blocks: dict[bytes, _Block] = {}
        self._tenant_bytes: dict[str, int] = {}
        self._bytes = 0
        # Min-heap of (expires_at, last hash), lazily deleted: an entry is valid only while its pin
        # exists with that very deadline (a touch pushes a new entry and strands the old one).
        self._expiry: list[tuple[float, bytes]] = []
        self._created = self._refreshed = self._expired = 0
        self._yielded = self._refused = self._removed = 0

    def pin(self, tenant: str, hashes: Sequence[bytes], ttl_s: float, *, source: str) -> PinOutcome:
        """Pin the leading run of ``hashes`` that the trie knows, for ``ttl_s`` seconds. The same
        prefix pinned again is refreshed (longer TTL and deadline of the two), not duplicated."""
        if not tenant:
            raise ValueError("tenant must not be empty")
        if not (ttl_s > 0 and math.isfinite(ttl_s)):
            raise ValueError(f"ttl_s must be positive and finite, got {ttl_s}")
        with self._lock:
            now = self._clock()
            self._expire(now)
            if self._max_bytes == 0:
                self._refused += 1
                return PinOutcome(None, (), "over_budget")
            sizes = self._trie.sizes(hashes)
            run = next((i for i, size in enumerate(sizes) if size is None), len(sizes))
            if run == 0:
                return PinOutcome(None, (), "not_in_memory")
            chain = tuple(hashes[:run])
            known = [size for size in sizes[:run] if size is not None]
            if len(set(chain)) != run:
                raise ValueError("a chain of block hashes cannot repeat a hash")

            existing = self._pins.get(chain[-1])
            if existing is not None:
                if existing.tenant != tenant:
                    raise ValueError(f"{pin_id_of(chain[-1])} belongs to another tenant")
                existing.ttl_s = max(existing.ttl_s, ttl_s)
                self._set_deadline(existing, max(existing.expires_at, now + ttl_s))
                # The node may have left the trie and come back (e.g. after a failed verification)
                # without its flag.
                self._trie.set_pinned(existing.hashes, True)
                self._refreshed += 1
                return PinOutcome(self._info(existing, now), (), None)

            extra = 0
            for key, size in zip(chain, known, strict=True):
                block = self._blocks.get(key)
                if block is None:
                    extra += size
                elif block.tenant != tenant:
                    raise ValueError(f"block {key.hex()} is pinned by another tenant")
            victims = self._plan_room(tenant, set(chain), extra)
            if victims is None:
                self._refused += 1
                return PinOutcome(None, (), "over_budget")

            pin = _Pin(tenant, source, chain, sum(known), ttl_s, now)
            # Take the new pin's references before releasing the victims, so a block they share
            # never drops to zero and loses its flag in between.
            self._add(pin, known)
            for victim in victims:
                self._release(victim)
            self._yielded += len(victims)
            self._created += 1
            # A block evicted between ``sizes`` and here is simply not flagged: the pin keeps its
            # budget until it expires, and a refresh re-flags the block if it comes back.
            return PinOutcome(self._info(pin, now), tuple(pin_id_of(v.last) for v in victims), None)

    def touch(self, hashes: Sequence[bytes]) -> int:
        """A lookup read ``hashes`` (a prompt's verified leading run): refresh every pin that ends
        on one of them (a full TTL from now, one more hit). Returns how many pins were refreshed."""
        with self._lock:
            now = self._clock()
            self._expire(now)
            flagged: dict[bytes, None] = {}
            touched = 0
            for key in dict.fromkeys(hashes):
                pin = self._pins.get(key)
                if pin is None:
                    continue
                pin.hits += 1
                self._set_deadline(pin, max(pin.expires_at, now + pin.ttl_s))
                flagged.update(dict.fromkeys(pin.hashes))
                touched += 1
            if flagged:
                self._trie.set_pinned(list(flagged), True)
            return touched

    def sweep(self) -> int:
        """Release every pin whose deadline has passed; returns how many."""
        with self._lock:
            return self._expire(self._clock())

    def unpin(self, pin_id: str) -> PinInfo | None:
        """Release one pin; its last snapshot, or ``None`` if there is no such (live) pin."""
        key = _key_of(pin_id)
        with self._lock:
            now = self._clock()
            self._expire(now)
            pin = self._pins.get(key) if key is not None else None
            if pin is None:
                return None
            info = self._info(pin, now)
            self._release(pin)
            self._removed += 1
            return info

    def get(self, pin_id: str) -> PinInfo | None:
        key = _key_of(pin_id)
        with self._lock:
            now = self._clock()
            self._expire(now)
            pin = self._pins.get(key) if key is not None else None
            return self._info(pin, now) if pin is not None else None

    def pins(self, tenant: str | None = None) -> list[PinInfo]:
        """Live pins (of ``tenant``, or all), soonest expiry first."""
        with self._lock:
            now = self._clock()
            self._expire(now)
            if tenant is None:
                chosen = list(self._pins.values())
            else:
                chosen = [self._pins[key] for key in self._by_tenant.get(tenant, ())]
            chosen.sort(key=_expiry_order)
            return [self._info(pin, now) for pin in chosen]

    def pinned_bytes(self, tenant: str | None = None) -> int:
        """Bytes pinned (by ``tenant``, or in all), each block counted once."""
        with self._lock:
            self._expire(self._clock())
            return self._bytes if tenant is None else self._tenant_bytes.get(tenant, 0)

    def clear(self) -> int:
        """Release every pin; returns how many there were."""
        with self._lock:
            n = len(self._pins)
            if self._blocks:
                self._trie.set_pinned(list(self._blocks), False)
            self._pins.clear()
            self._by_tenant.clear()
            self._blocks.clear()
            self._tenant_bytes.clear()
            self._expiry.clear()
            self._bytes = 0
            self._removed += n
            return n

    def stats(self) -> PinStats:
        with self._lock:
            self._expire(self._clock())
            return PinStats(
                pins=len(self._pins),
                bytes=self._bytes,
                max_bytes=self._max_bytes,
                tenant_max_bytes=self._tenant_max,
                created=self._created,
                refreshed=self._refreshed,
                expired=self._expired,
                yielded=self._yielded,
                refused=self._refused,
                removed=self._removed,
            )

    def __len__(self) -> int:
        with self._lock:
            self._expire(self._clock())
            return len(self._pins)

    # -- helpers (lock held) -------------------------------------------------------------------

    def _fits(self, tenant_bytes: int, total: int) -> bool:
        return tenant_bytes <= self._tenant_max and total <= self._max_bytes

    def _plan_room(self, tenant: str, chain: set[bytes], extra: int) -> list[_Pin] | None:
        """The tenant's own pins to release, soonest expiry first, so that ``extra`` more bytes fit;
        ``None`` when releasing all of them would not be enough. Simulated: nothing changes here."""
        tenant_bytes = self._tenant_bytes.get(tenant, 0)
        if self._fits(tenant_bytes + extra, self._bytes + extra):
            return []
        released: Counter[bytes] = Counter()
        freed = 0
        victims: list[_Pin] = []
        for pin in sorted((self._pins[k] for k in self._by_tenant.get(tenant, ())), key=_expiry_order):
            victims.append(pin)
            for key in pin.hashes:
                released[key] += 1
                block = self._blocks[key]
                # A block the new pin also covers stays pinned: releasing it frees nothing (and it
                # is not in ``extra`` either).
                if released[key] == block.refs and key not in chain:
                    freed += block.nbytes
            if self._fits(tenant_bytes - freed + extra, self._bytes - freed + extra):
                return victims
        return None

    def _add(self, pin: _Pin, sizes: Sequence[int]) -> None:
        for key, size in zip(pin.hashes, sizes, strict=True):
            block = self._blocks.get(key)
            if block is None:
                block = self._blocks[key] = _Block(pin.tenant, size)
                self._bytes += size
                self._tenant_bytes[pin.tenant] = self._tenant_bytes.get(pin.tenant, 0) + size
            block.refs += 1
        self._pins[pin.last] = pin
        self._by_tenant.setdefault(pin.tenant, set()).add(pin.last)
        self._push(pin)
        # Flags every block, not only the 0->1 ones: a shared block whose node left the trie and
        # came back gets its flag again.
        self._trie.set_pinned(pin.hashes, True)

    def _release(self, pin: _Pin) -> None:
        del self._pins[pin.last]
        keys = self._by_tenant[pin.tenant]
        keys.discard(pin.last)
        if not keys:
            del self._by_tenant[pin.tenant]
        unflag = []
        for key in pin.hashes:
            block = self._blocks[key]
            block.refs -= 1
            if block.refs == 0:
                del self._blocks[key]
                self._bytes -= block.nbytes
                left = self._tenant_bytes[block.tenant] - block.nbytes
                if left:
                    self._tenant_bytes[block.tenant] = left
                else:
                    del self._tenant_bytes[block.tenant]
                unflag.append(key)
        if unflag:
            self._trie.set_pinned(unflag, False)

    def _expire(self, now: float) -> int:
        n = 0
        while self._expiry and self._expiry[0][0] <= now:
            deadline, key = heapq.heappop(self._expiry)
            pin = self._pins.get(key)
            if pin is not None and pin.expires_at == deadline:
                self._release(pin)
                n += 1
        self._expired += n
        return n

    def _set_deadline(self, pin: _Pin, expires_at: float) -> None:
        if expires_at != pin.expires_at:
            pin.expires_at = expires_at
            self._push(pin)

    def _push(self, pin: _Pin) -> None:
        heapq.heappush(self._expiry, (pin.expires_at, pin.last))
        if len(self._expiry) > 2 * len(self._pins) + 1024:  # stale entries from touches pile up
            self._expiry = [(p.expires_at, k) for k, p in self._pins.items()]
            heapq.heapify(self._expiry)

    def _info(self, pin: _Pin, now: float) -> PinInfo:
        return PinInfo(
            id=pin_id_of(pin.last),
            tenant=pin.tenant,
            source=pin.source,
            blocks=len(pin.hashes),
            tokens=len(pin.hashes) * self._block_size,
            bytes=pin.nbytes,
            ttl_s=pin.ttl_s,
            expires_at=pin.expires_at,
            expires_in_s=max(0.0, pin.expires_at - now),
            hits=pin.hits,
            created_at=pin.created_at,
        )


def _expiry_order(pin: _Pin) -> tuple[float, bytes]:
    return (pin.expires_at, pin.last)


def _key_of(pin_id: str) -> bytes | None:
    """The last block hash a pin id names, or ``None`` for a string that is no pin id."""
    if not pin_id.startswith(PIN_ID_PREFIX):
        return None
    try:
        return bytes.fromhex(pin_id[len(PIN_ID_PREFIX) :])
    except ValueError:
        return None
