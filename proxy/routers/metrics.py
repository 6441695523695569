"""GET /metrics (Prometheus text format; open, like /health)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import Response

from proxy.deps import ServicesDep
from proxy.metrics import CONTENT_TYPE

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics(services: ServicesDep) -> Response:
    # A scrape reads every tier's figures (Redis included): off the event loop.
    body = await asyncio.to_thread(services.metrics.render)
    return Response(body, media_type=CONTENT_TYPE)
