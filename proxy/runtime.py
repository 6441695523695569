"""The loaded model and its cache, behind the few calls the routes and the CLI make.

This is the one place where the proxy touches model_runner's loader and cache factory, so the
server and the offline warmup always build the same stores the same way.
"""

from __future__ import annotations

import base64
import logging
import math
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cache_store.events import BlockEvents
from cache_store.prefix_cache import PrefixCache
from cache_store.store import StoreStats
from cache_store.tiered import TierClear
from model_runner.cache_factory import StoreOptions, build_prefix_cache
from model_runner.engine import Engine, StepObserver
from model_runner.engine_config import EngineConfig
from model_runner.loading import load_model
from model_runner.records import WarmupResult
from proxy.metrics import Metrics, TierFigures
from proxy.settings import ServeSettings

log = logging.getLogger("kvproxy")


def store_options(settings: ServeSettings) -> StoreOptions:
    return StoreOptions(
        memory_bytes=settings.memory_bytes,
        disk_dir=None if settings.no_disk else settings.disk_dir,
        disk_bytes=settings.disk_bytes,
        redis_url=settings.redis_url,
        redis_prefix=settings.redis_prefix,
        redis_ttl_s=settings.redis_ttl,
        redis_cluster=settings.redis_cluster,
        store_timeout_ms=settings.store_timeout_ms,
        breaker_cooldown_s=settings.breaker_cooldown_s,
        max_pinned_bytes=settings.max_pinned_bytes,
        pinned_tenant_fraction=settings.max_pinned_tenant_share,
    )


@dataclass(frozen=True)
class BlockSnapshot:
    """What this replica's listable tiers held, with the last event seq given before the listing
    (replaying the events after ``seq`` over it gives the current state, never less)."""

    epoch: str | None
    seq: int
    held: dict[str, list[bytes]]


@dataclass
class Runtime:
    engine: Engine
    cache: PrefixCache | None
    block_size: int
    events: BlockEvents | None = None
    """The block event stream a cache-aware router follows (only with a Redis URL)."""
    last_tier_stats: dict[str, StoreStats] = field(default_factory=dict)
    """The latest figures, for /health when a tier is too slow to answer right now."""
    _tokenizer_files: dict[str, str] | None = field(default=None, init=False, repr=False)
    _files_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def device(self) -> str:
        return str(self.engine.loaded.device)

    @property
    def dtype(self) -> str:
        return str(self.engine.loaded.dtype).removeprefix("torch.")

    @property
    def max_context(self) -> int:
        return self.engine.max_context

    @property
    def cacheable(self) -> bool:
        return self.engine.caching

    def tier_stats(self) -> dict[str, StoreStats]:
        """Every tier's figures (may call Redis: never on the event loop)."""
        stats = self.cache.store.stats() if self.cache is not None else {}
        self.last_tier_stats = stats
        return stats

    def tier_figures(self) -> dict[str, TierFigures]:
        return {
            name: TierFigures(st.blocks, st.bytes, st.evictions) for name, st in self.tier_stats().items()
        }

    def pinned_bytes(self) -> int:
        pins = self.cache.pins if self.cache is not None else None
        return pins.pinned_bytes() if pins is not None else 0

    def pin_summary(self) -> dict[str, int]:
        """How many pins, the bytes they hold and the bounds (details: GET /v1/cache/pins)."""
        pins = self.cache.pins if self.cache is not None else None
        if pins is None:
            return {"count": 0, "bytes": 0, "max_bytes": 0, "tenant_max_bytes": 0}
        stats = pins.stats()
        return {
            "count": stats.pins,
            "bytes": stats.bytes,
            "max_bytes": stats.max_bytes,
            "tenant_max_bytes": stats.tenant_max_bytes,
        }

    def block_snapshot(self) -> BlockSnapshot:
        """The hashes memory and disk hold now. The seq is taken first: an event given while the
        tiers are listed has a higher seq, so a router replaying the events after it misses
        nothing (a stored block listed and replayed again is the same block)."""
        seq = self.events.last_seq() if self.events is not None else 0
        held = self.cache.store.held_keys() if self.cache is not None else {}
        return BlockSnapshot(epoch=self.epoch, seq=seq, held=held)

    @property
    def epoch(self) -> str | None:
        """This start's event epoch (``None`` without events): a new one means a restart."""
        return self.events.epoch if self.events is not None else None

    def tokenizer_files(self) -> dict[str, str]:
        """The loaded tokenizer as the files ``save_pretrained`` writes, base64 by relative path:
        a router rebuilds the very tokenizer from them (no weights) to hash prompts the same way.
        Saved once (slow: run it off the event loop)."""
        with self._files_lock:
            if self._tokenizer_files is None:
                self._tokenizer_files = saved_tokenizer_files(self.engine.loaded.tokenizer)
            return self._tokenizer_files

    def locked_blocks(self) -> int:
        return len(self.cache.trie.locked_blocks()) if self.cache is not None else 0

    def writer_stats(self) -> dict[str, Any]:
        return asdict(self.cache.store.writer_stats()) if self.cache is not None else {}

    def warmup(self, prompt_ids: list[int], *, tenant: str, cache_salt: str) -> dict[str, int]:
        """Prefill and store one prompt (blocking); its figures for the warmup summary."""
        return self.warmup_figures(self.engine.warmup(prompt_ids, tenant=tenant, cache_salt=cache_salt))

    def warmup_figures(self, result: WarmupResult) -> dict[str, int]:
        """One warmed prompt's figures for the warmup summary."""
        return {
            "prompts": 1,
            "tokens": result.prompt_tokens,
            "blocks_written": result.stored_blocks,
            "already_cached": math.ceil(result.cached_tokens / self.block_size),
        }

    def clear(self) -> dict[str, TierClear]:
        """Empty every tier (Redis: only our prefix), per tier what was removed and whether it
        failed. Run on the engine's step loop, between steps."""
        if self.cache is None:
            return {}
        outcomes = self.cache.store.clear_tiers()
        self.cache.clear_index()
        return outcomes

    def drain(self, timeout_s: float) -> bool:
        """Wait until the background writer has put every queued block into its tiers."""
        return self.cache.store.drain(timeout_s) if self.cache is not None else True

    def close(self, *, grace_s: float, drain_s: float) -> bool:
        """Stop the engine (running requests get ``grace_s``), then drain and close the stores.
        True when the engine stopped in time."""
        stopped = self.engine.close(grace_s=grace_s)
        if self.cache is not None:
            self.cache.store.close(timeout_s=drain_s)
        if self.events is not None:
            # Last: the drained writer's disk events go out too.
            self.events.close(timeout_s=drain_s)
        return stopped


def saved_tokenizer_files(tokenizer: Any) -> dict[str, str]:
    """``tokenizer.save_pretrained`` into a temp dir, read back as ``{relative path: base64}``."""
    with tempfile.TemporaryDirectory(prefix="kvproxy-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        root = Path(tmp)
        return {
            path.relative_to(root).as_posix(): base64.b64encode(path.read_bytes()).decode("ascii")
            for path in sorted(root.rglob("*"))
            if path.is_file()
        }


def block_events(settings: ServeSettings) -> BlockEvents | None:
    """The replica's block event stream, with a Redis URL only (the router reads it there)."""
    if settings.redis_url is None:
        return None
    return BlockEvents(
        settings.redis_url,
        prefix=settings.redis_prefix,
        cluster=settings.redis_cluster,
        timeout_ms=settings.store_timeout_ms,
    )


def engine_config(settings: ServeSettings) -> EngineConfig:
    return EngineConfig(
        max_batch=settings.max_batch,
        max_batch_tokens=settings.max_batch_tokens,
        kv_budget_bytes=settings.kv_budget_bytes,
        max_waiting=settings.max_queue,
    )


def build_runtime(
    settings: ServeSettings,
    metrics: Metrics | None,
    *,
    observer: StepObserver | None = None,
    clock: Callable[[], float] = time.monotonic,
    publish_events: bool = False,
) -> Runtime:
    """Load the model and build its cache and engine (slow: run it off the event loop).
    ``clock`` times pins (tests give their own). ``publish_events``: a serving replica with a
    Redis URL publishes its block events for a router (an offline warmup has no one to tell)."""
    loaded = load_model(
        settings.model, device=settings.device, dtype=settings.dtype, max_context=settings.max_context
    )
    cache: PrefixCache | None = None
    events = block_events(settings) if publish_events and loaded.cacheable else None
    try:
        if loaded.cacheable:
            store_observer = metrics.observe_store if metrics is not None else None
            cache = build_prefix_cache(
                store_options(settings),
                settings.block_size,
                observer=store_observer,
                clock=clock,
                events=events.emit if events is not None else None,
            )
        else:
            log.warning("prefix caching is off for %s: %s", settings.model_name, loaded.cache_reason)
        engine = Engine(
            loaded,
            cache,
            settings.block_size,
            engine_config(settings),
            observer=observer,
        )
    except BaseException:
        if events is not None:
            events.close(timeout_s=1.0)
        raise
    if engine.batching_reason is not None:
        log.warning("requests to %s run one at a time: %s", settings.model_name, engine.batching_reason)
    return Runtime(engine=engine, cache=cache, block_size=settings.block_size, events=events)
