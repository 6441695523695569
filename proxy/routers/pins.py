"""Admin routes for pins: GET /v1/cache/pins, POST /v1/cache/pins, DELETE /v1/cache/pins/{id}.

A pin keeps a tenant's prefix in the memory tier until its TTL passes (refreshed whenever a request
reads it). Cache breakpoints (``cache_control``) and ``prompt_cache_retention`` make them per
request; these routes let an operator see every tenant's pins, pin a prompt for a tenant (a warmup
that pins) and drop one. Pins live in memory only: after a restart the prefixes are still on disk
or in Redis as ordinary blocks, but nothing pins them.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Depends

from cache_store.pins import PinInfo, PinTable
from model_runner.records import PinRequest
from proxy.body import documented_body, json_body
from proxy.deps import AdminDep, GenerationDep, RuntimeDep
from proxy.errors import ApiError, InvalidRequest, NotFound
from proxy.routers.cache import queued
from proxy.schemas import PinCreateRequest
from proxy.worker import warmup as engine_warmup

router = APIRouter()


class PinNotMade(ApiError):
    status = 409
    default_code = "pin_not_made"


def pin_json(info: PinInfo) -> dict[str, Any]:
    """A pin for clients: its deadline as seconds from now (the table's clock is monotonic)."""
    data = asdict(info)
    data.pop("expires_at")
    data["expires_in_s"] = round(info.expires_in_s, 3)
    return data


def _table(runtime: RuntimeDep) -> PinTable:
    if runtime.cache is None or runtime.cache.pins is None:
        raise InvalidRequest(
            "Prefix caching is off for this model, so there is nothing to pin.", code="cache_disabled"
        )
    return runtime.cache.pins


@router.get("/v1/cache/pins")
async def list_pins(_: AdminDep, runtime: RuntimeDep) -> dict[str, Any]:
    if runtime.cache is None or runtime.cache.pins is None:
        return {"pins": [], "pinned_bytes": 0, "max_pinned_bytes": 0, "tenant_max_bytes": 0}
    table = runtime.cache.pins
    stats = table.stats()
    return {
        "pins": [pin_json(p) for p in table.pins()],
        "pinned_bytes": stats.bytes,
        "max_pinned_bytes": stats.max_bytes,
        "tenant_max_bytes": stats.tenant_max_bytes,
        "stats": asdict(stats),
    }


@router.post("/v1/cache/pins", openapi_extra=documented_body(PinCreateRequest))
async def create_pin(
    principal: AdminDep,
    runtime: RuntimeDep,
    generation: GenerationDep,
    body: Annotated[PinCreateRequest, Depends(json_body(PinCreateRequest))],
) -> dict[str, Any]:
    _table(runtime)
    tenant = body.tenant or principal.tenant
    ids = await generation.encode_item(body, "prompt" if body.prompt is not None else "messages")
    if len(ids) < runtime.block_size:
        raise InvalidRequest(
            f"The prompt is {len(ids)} tokens, shorter than one cache block ({runtime.block_size}): "
            "there is nothing to pin.",
            param="prompt" if body.prompt is not None else "messages",
        )
    want = PinRequest(len(ids), body.ttl_s, "admin")
    result = await queued(
        lambda: engine_warmup(
            generation.engine, ids, tenant=tenant, cache_salt=body.cache_salt or "", pins=(want,)
        )
    )
    outcome = result.pins[0] if result.pins else None
    if outcome is None or outcome.pin is None:
        reason = outcome.reason if outcome is not None else "not_in_memory"
        raise PinNotMade(
            f"The prompt was cached but could not be pinned ({reason}): the pins of tenant "
            f"'{tenant}' would exceed its share of --max-pinned-bytes, or memory could not hold it.",
        )
    return {
        "pin": pin_json(outcome.pin),
        "yielded": list(outcome.yielded),
        "prompt_tokens": result.prompt_tokens,
        "blocks_written": result.stored_blocks,
    }


@router.delete("/v1/cache/pins/{pin_id}")
async def delete_pin(pin_id: str, _: AdminDep, runtime: RuntimeDep) -> dict[str, Any]:
    info = _table(runtime).unpin(pin_id)
    if info is None:
        raise NotFound(f"No pin '{pin_id[:80]}' (it may have expired).", param="pin_id", code="pin_not_found")
    return {"deleted": pin_json(info)}
