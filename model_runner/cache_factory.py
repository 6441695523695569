"""Build the ``PrefixCache`` (trie + memory tier + optional disk and Redis) from store options.

The proxy's lifespan and the CLI's offline warmup both call ``build_prefix_cache``, so the two
always assemble the tiers the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cache_store.disk import DiskStore
from cache_store.listener import BlockListener
from cache_store.memory import MemoryStore
from cache_store.pins import PinTable
from cache_store.prefix_cache import PrefixCache
from cache_store.redis_store import RedisStore
from cache_store.store import BlockStore
from cache_store.tiered import StoreObserver, TieredStore
from cache_store.trie import PrefixTrie
from model_runner.paths import default_cache_dir

GiB = 1 << 30


@dataclass(frozen=True)
class StoreOptions:
    """The store settings of DESIGN.md's CLI. ``disk_dir`` ``None``: no disk tier;
    ``redis_url`` ``None``: no Redis tier."""

    memory_bytes: int = 1 * GiB
    disk_dir: Path | None = None
    disk_bytes: int = 10 * GiB
    redis_url: str | None = None
    redis_prefix: str = "kvp:v1:"
    redis_ttl_s: int | None = None
    redis_cluster: bool = False
    store_timeout_ms: int = 200
    breaker_cooldown_s: float = 10.0
    writer_queue_items: int = 4096
    max_pinned_bytes: int | None = None
    """What cache breakpoints may pin in memory; ``None``: half the memory tier."""
    pinned_tenant_fraction: float = 0.5
    """The share of ``max_pinned_bytes`` one tenant's pins may take."""

    def __post_init__(self) -> None:
        if self.memory_bytes < 0 or self.disk_bytes < 0:
            raise ValueError("memory_bytes and disk_bytes must not be negative")
        if self.max_pinned_bytes is not None and not 0 <= self.max_pinned_bytes <= self.memory_bytes:
            raise ValueError(
                f"max_pinned_bytes must be between 0 and memory_bytes ({self.memory_bytes}), "
                f"got {self.max_pinned_bytes}"
            )
        if not 0 < self.pinned_tenant_fraction <= 1:
            raise ValueError(f"pinned_tenant_fraction must be in (0, 1], got {self.pinned_tenant_fraction}")
        if self.store_timeout_ms <= 0:
            raise ValueError(f"store_timeout_ms must be positive, got {self.store_timeout_ms}")
        if self.breaker_cooldown_s < 0:
            raise ValueError(f"breaker_cooldown_s must not be negative, got {self.breaker_cooldown_s}")

    @property
    def pinned_bytes_cap(self) -> int:
        return self.memory_bytes // 2 if self.max_pinned_bytes is None else self.max_pinned_bytes


def default_disk_dir() -> Path:
    """``<user cache dir>/blocks``: where the disk tier lives unless ``--disk-dir`` says otherwise."""
    return default_cache_dir() / "blocks"


def build_prefix_cache(
    options: StoreOptions,
    block_size: int,
    *,
    observer: StoreObserver | None = None,
    clock: Callable[[], float] = time.monotonic,
    events: BlockListener | None = None,
) -> PrefixCache:
    """A ``PrefixCache`` over memory (evicting only unlocked, unpinned trie leaves) in front of
    the lower tiers ``options`` turns on, disk first (cheaper than the network), then Redis.
    ``clock`` times the pins' TTLs (tests pass their own). ``events`` hears what the memory and
    disk tiers store and drop (``cache_store.events.BlockEvents.emit``, for a cache-aware router)."""
    trie = PrefixTrie()
    pins = PinTable(
        trie,
        block_size=block_size,
        max_bytes=options.pinned_bytes_cap,
        tenant_fraction=options.pinned_tenant_fraction,
        clock=clock,
    )
    memory = MemoryStore(options.memory_bytes, policy=trie, events=events)
    lower: list[BlockStore] = []
    if options.disk_dir is not None:
        lower.append(DiskStore(options.disk_dir, options.disk_bytes, events=events))
    if options.redis_url is not None:
        lower.append(
            RedisStore(
                options.redis_url,
                prefix=options.redis_prefix,
                ttl_s=options.redis_ttl_s,
                timeout_ms=options.store_timeout_ms,
                breaker_cooldown_s=options.breaker_cooldown_s,
                cluster=options.redis_cluster,
            )
        )
    store = TieredStore(memory, lower, queue_items=options.writer_queue_items, observer=observer)
    return PrefixCache(store, trie, block_size, pins)
