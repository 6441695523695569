"""Admin routes: GET /v1/cache/stats, DELETE /v1/cache, POST /v1/cache/warmup, and what a
cache-aware router (``kvproxy route``) reads from a replica: GET /v1/cache/info (how to hash a
prompt as this replica does) and GET /v1/cache/blocks (what its memory and disk hold)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends

from cache_store.hashing import FORMAT_VERSION
from proxy.body import documented_body, json_body
from proxy.deps import AdminDep, GenerationDep, RuntimeDep, ServicesDep
from proxy.generation import overloaded
from proxy.runtime import Runtime
from proxy.schemas import WarmupRequest
from proxy.worker import EngineClosed, QueueFull, on_engine
from proxy.worker import warmup as engine_warmup

router = APIRouter()

R = TypeVar("R")

_DRAIN_TIMEOUT_S = 120.0
_QUEUE_RETRY_S = 60.0


@router.get("/v1/cache/stats")
async def cache_stats(
    _: AdminDep, services: ServicesDep, runtime: RuntimeDep, generation: GenerationDep
) -> dict[str, Any]:
    tiers = await asyncio.to_thread(runtime.tier_stats)
    settings = services.settings
    summary = services.requests.summary()
    tier_json: dict[str, Any] = {}
    for name, st in tiers.items():
        lookups = st.hits + st.misses
        tier_json[name] = {
            **asdict(st),
            "hit_rate": st.hits / lookups if lookups else 0.0,
            "cached_tokens": summary["cached_tokens_by_tier"].get(name, 0),
        }
    engine = generation.engine.stats()
    sched = engine.scheduler
    return {
        "model": settings.model_name,
        "block_size": settings.block_size,
        "cacheable": runtime.cacheable,
        "uptime_s": round(time.time() - services.started_at, 1),
        "tiers": tier_json,
        "locked_blocks": runtime.locked_blocks(),
        "pins": runtime.pin_summary(),
        "writer": runtime.writer_stats(),
        "queue": {
            "waiting": sched.waiting,
            "max": settings.max_queue,
            "running": sched.running,
            "busy": sched.running > 0 or sched.waiting > 0,
        },
        "batch": generation.batch_figures(),
        "cancelled": {"requests": engine.cancelled_requests, "completion_tokens": engine.cancelled_tokens},
        **summary,
    }


@router.get("/v1/cache/info")
async def cache_info(
    _: AdminDep, services: ServicesDep, runtime: RuntimeDep, tokenizer: bool = True
) -> dict[str, Any]:
    """Everything a router needs to compute this replica's block hashes without the weights: the
    namespace's inputs (fingerprint, block size, format version; the tenant and ``cache_salt``
    come with each request) and the tokenizer itself; and where this replica's events are.
    ``?tokenizer=false`` leaves the tokenizer files out (megabytes for a large vocabulary: a
    router re-checking a replica after a restart needs only the rest)."""
    settings = services.settings
    files = await asyncio.to_thread(runtime.tokenizer_files) if tokenizer else {}
    events = runtime.events
    return {
        "model": settings.model_name,
        "served_model_names": list(settings.served_model_names),
        "fingerprint": runtime.engine.fingerprint,
        "block_size": runtime.block_size,
        "max_context": runtime.max_context,
        "cacheable": runtime.cacheable,
        "format_version": FORMAT_VERSION,
        "keep_billing_header": settings.keep_billing_header,
        "tokenizer_files": files,
        "events": None if events is None else {"stream": events.stream, "epoch": events.epoch},
        "redis_prefix": settings.redis_prefix if settings.redis_url else None,
    }


@router.get("/v1/cache/blocks")
async def cache_blocks(_: AdminDep, runtime: RuntimeDep) -> dict[str, Any]:
    """A snapshot of the blocks this replica holds, as hex hashes per tier, and the last event seq
    given before it was listed: apply the stream's events after ``seq`` to keep it current."""
    return await asyncio.to_thread(_snapshot_json, runtime)


def _snapshot_json(runtime: Runtime) -> dict[str, Any]:
    """Off the event loop: a large memory tier lists hundreds of thousands of hashes."""
    snapshot = runtime.block_snapshot()
    return {
        "epoch": snapshot.epoch,
        "seq": snapshot.seq,
        "memory": [key.hex() for key in snapshot.held.get("memory", [])],
        "disk": [key.hex() for key in snapshot.held.get("disk", [])],
    }


@router.delete("/v1/cache")
async def flush_cache(_: AdminDep, runtime: RuntimeDep, generation: GenerationDep) -> dict[str, Any]:
    # On the engine's step loop: a flush must not interleave with a step's store calls.
    try:
        outcomes = await on_engine(generation.engine, runtime.clear)
    except EngineClosed as exc:
        raise overloaded(exc) from None
    # A tier that failed (Redis down) is reported, not hidden behind a plain 200 "done".
    return {
        "deleted": max((o.removed for o in outcomes.values()), default=0),
        "complete": all(o.ok for o in outcomes.values()),
        "tiers": {name: {"deleted": o.removed, "ok": o.ok} for name, o in outcomes.items()},
    }


@router.post("/v1/cache/warmup", openapi_extra=documented_body(WarmupRequest))
async def warmup(
    principal: AdminDep,
    runtime: RuntimeDep,
    generation: GenerationDep,
    body: Annotated[WarmupRequest, Depends(json_body(WarmupRequest))],
) -> dict[str, Any]:
    tenant = body.tenant or principal.tenant
    salt = body.cache_salt or ""
    started = time.perf_counter()
    totals = {"prompts": 0, "tokens": 0, "blocks_written": 0, "already_cached": 0}
    for index, item in enumerate(body.items):
        ids = await generation.encode_item(item, f"items[{index}]")
        result = await queued(
            lambda ids=ids: engine_warmup(generation.engine, ids, tenant=tenant, cache_salt=salt)
        )
        for name, value in runtime.warmup_figures(result).items():
            totals[name] += value
    # Answer only once every tier holds the blocks (the lower tiers are written in the background).
    drained = await asyncio.to_thread(runtime.drain, _DRAIN_TIMEOUT_S)
    return {
        **totals,
        "tenant": tenant,
        "drained": drained,
        "seconds": round(time.perf_counter() - started, 3),
    }


async def queued(work: Callable[[], Awaitable[R]]) -> R:
    """Warmup shares the batch with live traffic: wait for a queue slot rather than fail."""
    deadline = time.monotonic() + _QUEUE_RETRY_S
    while True:
        try:
            return await work()
        except QueueFull as exc:
            if time.monotonic() > deadline:
                raise overloaded(exc) from None
            await asyncio.sleep(0.05)
        except EngineClosed as exc:
            raise overloaded(exc) from None
