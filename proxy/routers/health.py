"""GET /health: 503 while the model loads, then 200 with per-tier state ("degraded" when a tier
is down). Open to everyone, so it shows no secrets: the Redis URL is redacted."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from proxy.deps import ServicesDep
from proxy.runtime import Runtime
from proxy.settings import redact_url

router = APIRouter()

# /health must answer fast even while a prefill keeps the machine busy: a tier that does not
# report in time is shown with its last known state.
_TIER_TIMEOUT_S = 0.15


@router.get("/health")
async def health(services: ServicesDep) -> JSONResponse:
    settings = services.settings
    body: dict[str, Any] = {"status": services.state, "model": settings.model_name}
    runtime = services.runtime
    if services.state != "ready" or runtime is None:
        if services.load_error:
            body["error"] = "the model failed to load; see the server log"
        return JSONResponse(body, status_code=503, headers={"Retry-After": "2"})
    try:
        tiers = await asyncio.wait_for(asyncio.to_thread(runtime.tier_stats), _TIER_TIMEOUT_S)
    except asyncio.TimeoutError:
        tiers = runtime.last_tier_stats
    tier_state: dict[str, Any] = {}
    for name, stats in tiers.items():
        state: dict[str, Any] = {"healthy": stats.healthy and stats.breaker != "open"}
        if stats.breaker is not None:
            state["breaker"] = stats.breaker
        if name == "redis" and settings.redis_url:
            state["url"] = redact_url(settings.redis_url)
            state["prefix"] = settings.redis_prefix
        tier_state[name] = state
    degraded = any(not s["healthy"] for s in tier_state.values())
    engine = runtime.engine.stats().scheduler
    body.update(
        status="degraded" if degraded else "ok",
        device=runtime.device,
        dtype=runtime.dtype,
        block_size=settings.block_size,
        cacheable=runtime.cacheable,
        tiers=tier_state,
        # A router polling /health sees a restart as a new epoch (memory empty, a new stream).
        epoch=runtime.epoch,
        events=_events_state(runtime),
        queue={
            "waiting": engine.waiting,
            "max": settings.max_queue,
            "running": engine.running,
            "busy": engine.running > 0 or engine.waiting > 0,
        },
    )
    return JSONResponse(body)


def _events_state(runtime: Runtime) -> dict[str, Any] | None:
    """The block event stream's figures (``None`` without one): how far it has got, what it lost."""
    if runtime.events is None:
        return None
    stats = runtime.events.stats()
    return {
        "stream": stats.stream,
        "seq": stats.last_seq,
        "published": stats.published,
        "dropped": stats.dropped,
    }
