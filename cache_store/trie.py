"""The prefix trie: an index of the blocks held by the memory tier, keyed by chained block hash.

Because every block hash already commits to its whole prefix, the trie needs no edge labels: a
node is "block h, child of block p". What it adds over a dict is structure for eviction: a block
is evicted only when it is an *unlocked, unpinned leaf* (nothing cached extends it, no request is
using it and no TTL pin holds it), least recently used first, so the memory tier always holds
whole prefixes. A parent becomes a candidate when its last child goes.

Evictable leaves live in a min-heap of ``(stamp, key)`` with lazy deletion: an entry is valid only
while its node is still an evictable leaf with that stamp; stale entries are skipped on pop and the
heap is rebuilt when they outnumber the nodes. Eviction is O(log n) amortized.

Locks and pins both keep a block from eviction but differ in who owns them: a lock is a count
held by a request for the length of that request and lives here; a pin is a single flag that
``pins.PinTable`` sets and clears (the table owns the pin records, their TTLs, tenant budgets and
per-block reference counts; the trie only needs to know "do not evict").

``PrefixTrie`` also implements ``memory.EvictionPolicy``, so ``MemoryStore(policy=trie)`` evicts
through it. It never calls out while holding its lock (the store calls it with the store's lock
held).
"""

from __future__ import annotations

import heapq
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


class _Node:
    __slots__ = ("children", "evictable", "key", "locks", "nbytes", "parent", "pinned", "stamp", "tiers")

    def __init__(self, key: bytes, parent: _Node | None, nbytes: int, stamp: int, tiers: int) -> None:
        self.key = key
        self.parent = parent  # a node object: a stale one (no longer in the trie) means "root"
        self.children = 0
        self.locks = 0
        self.pinned = False  # set by pins.PinTable: held until its pins expire
        self.nbytes = nbytes
        self.stamp = stamp
        self.tiers = tiers  # bit mask over PrefixTrie._tier_bits
        self.evictable = False


@dataclass(frozen=True)
class TrieStats:
    nodes: int
    bytes: int
    locked: int
    evictable: int
    evictions: int
    pinned: int = 0  # defaulted so records built by name before pins existed stay valid


class PrefixTrie:
    """Block-hash prefix trie with lock counts and LRU eviction of unlocked leaves; thread-safe."""

    def __init__(self, remember_evicted: int = 65536) -> None:
        """``remember_evicted``: how many recently evicted hashes to keep for ``was_evicted``."""
        if remember_evicted < 0:
            raise ValueError("remember_evicted must not be negative")
        self._lock = threading.Lock()
        self._nodes: dict[bytes, _Node] = {}
        self._heap: list[tuple[int, bytes]] = []
        self._clock = 0
        self._bytes = 0
        self._locked = 0
        self._evictable = 0
        self._pinned = 0
        self._evictions = 0
        self._tier_bits: dict[str, int] = {}
        self._evicted: OrderedDict[bytes, None] = OrderedDict()
        self._remember = remember_evicted

    # -- the trie ------------------------------------------------------------------------------

    def insert(
        self,
        hashes: Sequence[bytes],
        parent: bytes | None,
        nbytes: Sequence[int],
        tier: str = "memory",
        *,
        pin: bool = False,
    ) -> int:
        """Add the chain ``hashes`` (``parent`` is the parent of ``hashes[0]``; ``None`` or an
        unknown hash means root level). Known nodes are touched, tagged with ``tier`` and linked
        under their parent if they were roots. ``pin``: also ``lock`` each hash (a request lock, not
        a TTL pin), atomically (so a concurrent eviction cannot take a block between its insert and
        its put into memory). Returns how many nodes were created."""
        if len(nbytes) != len(hashes):
            raise ValueError("insert needs one byte size per hash")
        with self._lock:
            bit = self._tier_bit(tier)
            created = 0
            prev = self._nodes.get(parent) if parent is not None else None
            for key, size in zip(hashes, nbytes, strict=True):
                node = self._nodes.get(key)
                if node is None:
                    node = _Node(key, prev, size, self._tick(), bit)
                    self._nodes[key] = node
                    self._bytes += size
                    if prev is not None:
                        prev.children += 1
                        self._refresh(prev)
                    created += 1
                else:
                    self._bytes += size - node.nbytes
                    node.nbytes = size
                    node.tiers |= bit
                    self._link(node, prev)
                    self._touch(node)
                if pin:
                    if node.locks == 0:
                        self._locked += 1
                    node.locks += 1
                self._refresh(node)
                prev = node
            return created

    def link(self, hashes: Sequence[bytes], parent: bytes | None = None) -> None:
        """Record that the *known* nodes among ``hashes`` form a chain (e.g. blocks promoted from a
        lower tier arrive as roots); unknown hashes are skipped, nothing is created."""
        with self._lock:
            prev = self._nodes.get(parent) if parent is not None else None
            for key in hashes:
                node = self._nodes.get(key)
                if node is not None:
                    self._link(node, prev)
                prev = node

    def match(self, hashes: Sequence[bytes]) -> int:
        """Length of the leading run of ``hashes`` present; those nodes become most recently used."""
        with self._lock:
            n = 0
            for key in hashes:
                node = self._nodes.get(key)
                if node is None:
                    break
                self._touch(node)
                n += 1
            return n

    def contains(self, hashes: Sequence[bytes]) -> list[bool]:
        with self._lock:
            return [key in self._nodes for key in hashes]

    def lock(self, hashes: Sequence[bytes]) -> list[bytes]:
        """Lock the known nodes among ``hashes`` against eviction (per request, counted; not a TTL
        pin); returns the hashes locked (pass exactly those to ``unlock``)."""
        with self._lock:
            pinned = []
            for key in hashes:
                node = self._nodes.get(key)
                if node is not None:
                    if node.locks == 0:
                        self._locked += 1
                    node.locks += 1
                    self._refresh(node)
                    pinned.append(key)
            return pinned

    def unlock(self, hashes: Sequence[bytes]) -> None:
        """Undo one ``lock`` of each hash; unknown or unpinned hashes are ignored."""
        with self._lock:
            for key in hashes:
                node = self._nodes.get(key)
                if node is not None and node.locks > 0:
                    node.locks -= 1
                    if node.locks == 0:
                        self._locked -= 1
                    self._refresh(node)

    def set_pinned(self, hashes: Sequence[bytes], pinned: bool) -> int:
        """Set or clear the pin flag of the known nodes among ``hashes`` (idempotent; unknown
        hashes are ignored: a block that left the trie has nothing to protect). Returns how many
        known nodes it touched. Reference counting across overlapping pins is the caller's job."""
        with self._lock:
            touched = 0
            for key in hashes:
                node = self._nodes.get(key)
                if node is None:
                    continue
                touched += 1
                if node.pinned != pinned:
                    node.pinned = pinned
                    self._pinned += 1 if pinned else -1
                    self._refresh(node)
            return touched

    def sizes(self, hashes: Sequence[bytes]) -> list[int | None]:
        """Each node's byte size, ``None`` for a hash the trie does not know. Does not touch."""
        with self._lock:
            return [node.nbytes if (node := self._nodes.get(key)) is not None else None for key in hashes]

    def evict_one(self) -> bytes | None:
        """Remove and return the least recently used unlocked, unpinned leaf; ``None`` if none."""
        with self._lock:
            while self._heap:
                stamp, key = heapq.heappop(self._heap)
                node = self._nodes.get(key)
                if node is not None and node.evictable and node.stamp == stamp:
                    self._drop(node)
                    self._evictions += 1
                    return key
            return None

    def remove(self, block_hash: bytes) -> list[bytes]:
        """Remove a node and its whole subtree; returns every removed hash (the caller drops them
        from the memory tier). O(nodes): meant for rare events (a record that failed verification)."""
        with self._lock:
            root = self._nodes.get(block_hash)
            if root is None:
                return []
            kids: dict[bytes, list[_Node]] = {}
            for node in self._nodes.values():
                parent = self._live_parent(node)
                if parent is not None:
                    kids.setdefault(parent.key, []).append(node)
            doomed, stack = [], [root]
            while stack:
                node = stack.pop()
                doomed.append(node)
                stack.extend(kids.get(node.key, ()))
            for node in reversed(doomed):  # leaves first, so parents' child counts stay exact
                self._drop(node)
            return [node.key for node in doomed]

    def add_tier(self, block_hash: bytes, tier: str) -> None:
        with self._lock:
            node = self._nodes.get(block_hash)
            if node is not None:
                node.tiers |= self._tier_bit(tier)

    def tiers(self, block_hash: bytes) -> frozenset[str]:
        """The tiers known to hold ``block_hash`` (empty if the trie does not know it)."""
        with self._lock:
            node = self._nodes.get(block_hash)
            if node is None:
                return frozenset()
            return frozenset(name for name, bit in self._tier_bits.items() if node.tiers & bit)

    def locked_blocks(self) -> list[bytes]:
        with self._lock:
            return [key for key, node in self._nodes.items() if node.locks]

    def was_evicted(self, block_hash: bytes) -> bool:
        """Whether ``block_hash`` recently left the trie (evicted, deleted, removed or cleared); the
        record is bounded by ``remember_evicted``."""
        with self._lock:
            return block_hash in self._evicted

    def clear(self) -> int:
        with self._lock:
            n = len(self._nodes)
            for key in self._nodes:
                self._remember_evicted(key)
            self._nodes.clear()
            self._heap.clear()
            self._bytes = self._locked = self._evictable = self._pinned = 0
            return n

    def stats(self) -> TrieStats:
        with self._lock:
            return TrieStats(
                nodes=len(self._nodes),
                bytes=self._bytes,
                locked=self._locked,
                evictable=self._evictable,
                evictions=self._evictions,
                pinned=self._pinned,
            )

    def __len__(self) -> int:
        with self._lock:
            return len(self._nodes)

    # -- memory.EvictionPolicy -----------------------------------------------------------------

    def added(self, key: bytes, nbytes: int) -> None:
        """The memory tier stored ``key``: tag it, or create a root-level node if it is new."""
        self.insert([key], None, [nbytes], "memory")

    def touched(self, key: bytes) -> None:
        with self._lock:
            node = self._nodes.get(key)
            if node is not None:
                self._touch(node)

    def removed(self, key: bytes) -> None:
        """The memory tier dropped ``key``: forget the node; its children become roots."""
        with self._lock:
            node = self._nodes.get(key)
            if node is not None:
                self._drop(node)

    def victim(self) -> bytes | None:
        return self.evict_one()

    # -- helpers (lock held) -------------------------------------------------------------------

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _tier_bit(self, tier: str) -> int:
        bit = self._tier_bits.get(tier)
        if bit is None:
            bit = self._tier_bits[tier] = 1 << len(self._tier_bits)
        return bit

    def _live_parent(self, node: _Node) -> _Node | None:
        parent = node.parent
        if parent is not None and self._nodes.get(parent.key) is not parent:
            node.parent = parent = None  # the parent left the trie: this node is a root now
        return parent

    def _link(self, node: _Node, parent: _Node | None) -> None:
        if parent is None or parent is node or self._live_parent(node) is not None:
            return
        node.parent = parent
        parent.children += 1
        self._refresh(parent)

    def _touch(self, node: _Node) -> None:
        node.stamp = self._tick()
        if node.evictable:
            self._push(node)

    def _refresh(self, node: _Node) -> None:
        """Re-derive whether ``node`` is an evictable leaf and keep the heap and counter in step."""
        evictable = node.children == 0 and node.locks == 0 and not node.pinned
        if evictable != node.evictable:
            node.evictable = evictable
            self._evictable += 1 if evictable else -1
            if evictable:
                self._push(node)

    def _push(self, node: _Node) -> None:
        heapq.heappush(self._heap, (node.stamp, node.key))
        if len(self._heap) > 2 * len(self._nodes) + 1024:
            self._heap = [(n.stamp, k) for k, n in self._nodes.items() if n.evictable]
            heapq.heapify(self._heap)

    def _drop(self, node: _Node) -> None:
        """Forget ``node`` (evicted, deleted or removed) and remember that it was cached."""
        del self._nodes[node.key]
        self._remember_evicted(node.key)
        self._bytes -= node.nbytes
        if node.locks:
            self._locked -= 1
        if node.pinned:
            self._pinned -= 1
        if node.evictable:
            self._evictable -= 1
        parent = self._live_parent(node)
        if parent is not None:
            parent.children -= 1
            self._refresh(parent)

    def _remember_evicted(self, key: bytes) -> None:
        if self._remember:
            self._evicted[key] = None
            self._evicted.move_to_end(key)
            if len(self._evicted) > self._remember:
                self._evicted.popitem(last=False)
