"""``CachePicker``: send each request to the replica where its prompt costs least to start.

For every healthy replica the request's blocks are walked in order (a replica restores the
longest cached prefix, so the walk stops at the first block it cannot get): a block in that
replica's memory costs nothing, one in its disk or in the shared Redis costs a restore
(``restore_weight`` of a recompute), the rest are recomputed (1 each). A load term adds
``load_weight`` blocks per request the replica is busy with (the router's own in-flight count
plus the requests the replica last reported waiting to join its batch), plus the blocks the
requests routed there and not answered yet still have to prefill. The lowest cost wins;
ties go to the prompt's rendezvous home. Then:

- a load imbalance gate: when the winner is swamped (``imbalance_abs`` more requests than the
  least loaded and ``imbalance_rel`` times its load) the least loaded one takes it;
- a request that no replica holds anything of goes to its home: rendezvous hashing on its
  ``prompt_cache_key`` if it has one, else on its first block (so a tenant's prefix keeps one
  home and a burst of new prompts spreads evenly);
- a routed request's blocks count as in that replica's memory from the moment it is sent, for
  ``soon_ttl_s`` (it is prefilling them), so a burst on one new prefix sticks together.

What each replica holds comes from its block events (``EventFeed``); without them (no Redis,
Redis down, a gap not yet reloaded) from what the router routed there lately (``approx_ttl_s``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import xxhash

from proxy.route.holdings import Holdings, RoutedBlocks
from proxy.route.picking import Pick, RouteRequest
from proxy.route.prompts import PromptHasher
from proxy.route.replicas import ReplicaState

log = logging.getLogger("kvproxy.route")


class HoldingsSource(Protocol):
    """Where the exact holdings come from (``EventFeed``)."""

    def holdings(self, replica: str) -> Holdings | None: ...

    def forget(self, replica: str) -> None: ...


class SharedTier(Protocol):
    """The shared store (``cache_store.redis_store.RedisStore``): which blocks it holds."""

    def contains(self, keys: Sequence[bytes]) -> list[bool]: ...


@dataclass(frozen=True)
class RouteWeights:
    """Every weight and threshold of the scoring (each a ``kvproxy route`` option)."""

    restore_weight: float = 0.3
    """A block restored from disk or Redis against one recomputed. The restore alone is cheaper
    (a replayed prompt is restored 19-20x faster than prefilled, server bench), but a conversation
    that moves for a small load difference is then held in two memory tiers: with 0.05, 18 of 63
    follow-up turns moved and the memory share was 0.86 of an oracle's; with 0.3, 0.94-1.00 and
    at most one move (``bench/route_bench.py``, Redis configuration)."""
    load_weight: float = 4.0
    """Prefill blocks one request in flight on a replica is worth. Swept once on the quick router
    bench (3 replicas, 500-900-token prompts, with Redis): 1 kept every turn on its replica (1.00
    of the oracle's memory share) but let the busiest replica reach 1.50x the mean load; 4 gave
    0.89 and 1.17x; 8 gave 0.82 and 1.33x (single runs, noisy)."""
    imbalance_abs: int = 8
    imbalance_rel: float = 2.0
    soon_ttl_s: float = 5.0
    approx_ttl_s: float = 300.0
    prefill_ttl_s: float = 10.0
    """How long a routed request's blocks count as prefill work queued on its replica when it has
    not answered yet (a streamed answer starts once its prefill is done; a plain one ends)."""
    shared_check_blocks: int = 256
    """At most this many blocks are looked up in Redis per request (one pipelined EXISTS)."""


@dataclass(frozen=True)
class _Score:
    url: str
    cost: float
    memory: int
    """Leading blocks in the replica's memory (or routed there a moment ago)."""
    cached: int
    """Leading blocks it can restore from any tier (memory included)."""
    load: float
    home: int


def rendezvous(key: bytes, urls: Sequence[str]) -> list[str]:
    """``urls`` ordered by highest random weight for ``key``: each key has a stable home, and a
    replica leaving moves only the keys it was home to."""
    return sorted(urls, key=lambda url: xxhash.xxh3_64_intdigest(url.encode() + b"\x00" + key), reverse=True)


def replica_load(replica: ReplicaState) -> float:
    """Requests a replica is busy with: those the router has in flight there, plus those its last
    health probe saw waiting to join its batch (other clients' too). Its reported running count
    is left out: up to a probe interval old, it would count requests that already finished."""
    return float(replica.in_flight + replica.waiting)


class CachePicker:
    """The ``Picker`` of ``kvproxy route`` (see the module docstring)."""

    def __init__(
        self,
        hasher: PromptHasher,
        feed: HoldingsSource | None = None,
        shared: SharedTier | None = None,
        weights: RouteWeights | None = None,
    ) -> None:
        self.hasher = hasher
        self.feed = feed
        self.shared = shared
        self.weights = weights or RouteWeights()
        self.soon = RoutedBlocks(self.weights.soon_ttl_s)
        self.recent = RoutedBlocks(self.weights.approx_ttl_s)
        self._pending: OrderedDict[int, list[bytes]] = OrderedDict()
        self._prefilling: dict[str, dict[int, tuple[frozenset[bytes], float]]] = {}
        """Replica -> the blocks each request sent there still has to prefill (until it answers,
        at most ``prefill_ttl_s``)."""

    async def pick(self, request: RouteRequest, replicas: Sequence[ReplicaState]) -> Pick:
        urls = [r.url for r in replicas]
        loads = {r.url: replica_load(r) for r in replicas}
        hashes = await asyncio.to_thread(self.hasher.hashes, request.route, request.body, request.api_key)
        if not hashes:
            # Nothing to reuse (no full block, or a body the replica will refuse): least loaded.
            order = sorted(urls, key=lambda u: loads.get(u, 0.0))
            return Pick(order=order, reason="least_loaded")
        self._remember(request, hashes)
        key = request.body.get("prompt_cache_key") if isinstance(request.body, dict) else None
        home_key = ("key:" + key).encode() if isinstance(key, str) and key else hashes[0]
        homes = rendezvous(home_key, urls)
        scores = [self._score(url, hashes, loads.get(url, 0.0), homes.index(url)) for url in urls]
        if any(s.memory < len(hashes) for s in scores) and self.shared is not None:
            shared = await asyncio.to_thread(self._shared_prefix, hashes)
            scores = [self._score(s.url, hashes, s.load, s.home, shared) for s in scores]
        scores.sort(key=lambda s: (s.cost, s.home))
        best = scores[0]
        least = min(scores, key=lambda s: (s.load, s.home))
        bs = self.hasher.block_size
        if (
            best.load - least.load > self.weights.imbalance_abs
            and best.load > self.weights.imbalance_rel * least.load
        ):
            order = [least.url] + [s.url for s in scores if s.url != least.url]
            self._prefill_on(least.url, request, hashes[least.cached :])
            return Pick(order=order, reason="imbalance", expected_cached_tokens=least.cached * bs)
        if best.cached < max(s.cached for s in scores):
            reason = "imbalance"  # the load outweighed a replica that holds more of the prompt
        elif best.memory > 0:
            reason = "memory"
        elif best.cached > 0:
            reason = "shared"
        elif best.url != homes[0]:
            reason = "least_loaded"  # nothing held anywhere, and the home was busier
        else:
            reason = "key" if home_key != hashes[0] else "cold_home"
        self._prefill_on(best.url, request, hashes[best.cached :])
        return Pick(order=[s.url for s in scores], reason=reason, expected_cached_tokens=best.cached * bs)

    def routed(self, request: RouteRequest, replica: str, pick: Pick) -> None:
        for waiting in self._prefilling.values():
            waiting.pop(id(request), None)
        hashes = self._pending.pop(id(request), None)
        if hashes:
            self.soon.add(replica, hashes)
            self.recent.add(replica, hashes)

    def replica_down(self, replica: str) -> None:
        self._prefilling.pop(replica, None)
        self.soon.forget(replica)
        self.recent.forget(replica)
        if self.feed is not None:
            self.feed.forget(replica)

    # -- helpers ------------------------------------------------------------------------------

    def _remember(self, request: RouteRequest, hashes: list[bytes]) -> None:
        self._pending[id(request)] = hashes
        while len(self._pending) > 4096:
            self._pending.popitem(last=False)

    def _prefill_on(self, url: str, request: RouteRequest, uncached: list[bytes]) -> None:
        """``request`` goes to ``url``: its blocks count as there from now (a burst on one new
        prefix sticks together), and the ones it must compute as prefill work queued there."""
        hashes = self._pending.get(id(request))
        if hashes:
            self.soon.add(url, hashes)
        deadline = time.monotonic() + self.weights.prefill_ttl_s
        self._prefilling.setdefault(url, {})[id(request)] = (frozenset(uncached), deadline)

    def prefill_backlog(self, url: str, mine: frozenset[bytes] = frozenset()) -> int:
        """Blocks that requests routed to ``url`` and not answered yet still have to prefill,
        except the ones in ``mine`` (a request that shares them waits for them either way)."""
        waiting = self._prefilling.get(url)
        if not waiting:
            return 0
        now = time.monotonic()
        for rid in [rid for rid, (_, deadline) in waiting.items() if deadline < now]:
            del waiting[rid]
        return sum(len(blocks - mine) for blocks, _ in waiting.values())

    def _score(self, url: str, hashes: list[bytes], load: float, home: int, shared: int = 0) -> _Score:
        """Cost of starting ``hashes`` on ``url``: memory blocks free, restored ones
        ``restore_weight``, the rest recomputed, plus the load term."""
        holdings = self.feed.holdings(url) if self.feed is not None else None
        memory = restored = 0
        for i, block in enumerate(hashes):
            tier = holdings.tier_of(block) if holdings is not None else None
            if (
                tier == "memory"
                or self.soon.has(url, block)
                or (holdings is None and self.recent.has(url, block))
            ):
                if restored == 0:
                    memory += 1
                    continue
                restored += 1  # past a restored block the prefix is read on through the lower tiers
            elif tier == "disk" or i < shared:
                restored += 1
            else:
                break
        w = self.weights
        cost = (
            w.restore_weight * restored
            + (len(hashes) - memory - restored)
            + w.load_weight * load
            + self.prefill_backlog(url, frozenset(hashes))
        )
        return _Score(url, cost, memory, memory + restored, load, home)

    def _shared_prefix(self, hashes: list[bytes]) -> int:
        """Leading blocks held in the shared tier (at most ``shared_check_blocks`` looked up)."""
        assert self.shared is not None
        try:
            found = self.shared.contains(hashes[: self.weights.shared_check_blocks])
        except Exception:  # a sick Redis is only a missing hint
            return 0
        n = 0
        for held in found:
            if not held:
                break
            n += 1
        return n
