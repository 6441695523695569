"""The router's FastAPI app: the same routes as a replica, answered by the replicas.

Generation routes go to one replica chosen by the `Picker`; ``GET /v1/models`` to any healthy
one; the cache admin routes to every healthy one (their answers side by side); ``/health``,
``/metrics``, ``/v1/route/stats`` (the metrics' figures as JSON) and ``/dashboard`` (the page that
shows them with every replica's stats side by side) are the router's own. One shared
``httpx.AsyncClient`` carries everything, so connections to the replicas are pooled and kept
alive.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Any

import httpx
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from proxy.body import MAX_BODY_BYTES
from proxy.errors import PayloadTooLarge, install_error_handlers
from proxy.route.forward import (
    Forwarder,
    Outgoing,
    client_api_key,
    no_replica_response,
    upstream_headers,
)
from proxy.route.metrics import METRICS_CONTENT_TYPE, RouteMetrics
from proxy.route.picking import Picker, RouteRequest, least_loaded_order
from proxy.route.replicas import Replicas

GENERATION_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/messages/count_tokens")
PREFIX_ADMIN_ROUTES = ("/v1/cache/warmup", "/v1/cache/pins")
"""Admin routes that prefill a prefix: sent where that prefix routes, so later requests find it."""
DEFAULT_TIMEOUT = httpx.Timeout(connect=2.0, read=600.0, write=60.0, pool=30.0)
"""Connect fails fast (the next replica is tried); read is per chunk, and a non-streamed answer
sends nothing until its generation is done, hence the long read timeout."""
DEFAULT_LIMITS = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
_REFUSAL_HEADERS = ("www-authenticate", "content-type")
_PARSE_IN_THREAD_BYTES = 256 * 1024
# A client that writes its whole body before reading still gets the 413, not a reset connection.
_DISCARD_BYTES = 64 * 1024 * 1024


class RouterServices:
    """What the handlers use; the client and forwarder exist between the lifespan's start and end."""

    def __init__(self, replicas: Replicas, picker: Picker, metrics: RouteMetrics) -> None:
        self.replicas = replicas
        self.picker = picker
        self.metrics = metrics
        self._forwarder: Forwarder | None = None

    @property
    def forwarder(self) -> Forwarder:
        if self._forwarder is None:
            raise RuntimeError("the router app is not started (its lifespan has not run)")
        return self._forwarder

    def start(self, client: httpx.AsyncClient) -> None:
        self._forwarder = Forwarder(client, self.replicas, self.picker, self.metrics)


def create_route_app(
    replicas: Replicas,
    picker: Picker,
    *,
    client: httpx.AsyncClient | None = None,
    metrics: RouteMetrics | None = None,
    timeout: httpx.Timeout = DEFAULT_TIMEOUT,
    limits: httpx.Limits = DEFAULT_LIMITS,
) -> FastAPI:
    """The router app. A ``client`` given is used as is and left open; without one, the app makes
    its own (``timeout``, ``limits``) in its lifespan and closes it. The lifespan also runs the
    replicas' health probes; ``picker.replica_down`` hears of every replica that goes down."""
    services = RouterServices(replicas, picker, metrics if metrics is not None else RouteMetrics())
    services.metrics.add_replicas(replicas.urls)
    replicas.on_down(picker.replica_down)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        own = client is None
        http = httpx.AsyncClient(timeout=timeout, limits=limits) if client is None else client
        services.start(http)
        await replicas.start(http)
        try:
            yield
        finally:
            await replicas.stop()
            if own:
                await http.aclose()

    app = FastAPI(title="kvproxy router", lifespan=lifespan, docs_url=None, redoc_url=None)
    install_error_handlers(app)
    app.include_router(_router(services))
    return app


def _router(services: RouterServices) -> APIRouter:
    router = APIRouter()

    async def generation(request: Request) -> Response:
        body = await read_body(request)
        route = RouteRequest(
            route=request.url.path, body=await parse_object(body), api_key=client_api_key(request.headers)
        )
        return await services.forwarder.route(route, _outgoing(request, body))

    for path in (*GENERATION_ROUTES, *PREFIX_ADMIN_ROUTES):
        router.add_api_route(path, generation, methods=["POST"], include_in_schema=False)

    @router.get("/v1/cache/pins", include_in_schema=False)
    async def pins_list(request: Request) -> Response:
        return await fan_out(services, request)

    @router.delete("/v1/cache/pins/{pin_id}", include_in_schema=False)
    async def pin_delete(request: Request) -> Response:
        return await fan_out(services, request)

    @router.get("/v1/models", include_in_schema=False)
    async def models(request: Request) -> Response:
        order = least_loaded_order(services.replicas.healthy())
        return services.forwarder.forward(_outgoing(request, b""), order)

    @router.get("/v1/cache/stats", include_in_schema=False)
    async def cache_stats(request: Request) -> Response:
        return await fan_out(services, request)

    @router.delete("/v1/cache", include_in_schema=False)
    async def cache_clear(request: Request) -> Response:
        return await fan_out(services, request)

    @router.get("/health", include_in_schema=False)
    async def health() -> JSONResponse:
        states = services.replicas.all()
        healthy = sum(s.healthy for s in states)
        body = {
            "status": "ok" if healthy == len(states) else "degraded",
            "replicas": {
                s.url: {"healthy": s.healthy, "in_flight": s.in_flight, "epoch": s.epoch} for s in states
            },
        }
        if not healthy:
            return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})
        return JSONResponse(body)

    @router.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(services.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @router.get("/v1/route/stats", include_in_schema=False)
    async def route_stats() -> JSONResponse:
        # Open like /metrics, which carries the same figures; the replicas' stats need their key.
        return JSONResponse(services.metrics.snapshot())

    @router.get("/dashboard", include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        # Open like a replica's page; it asks for an admin key to read the replicas' stats.
        page = files("proxy").joinpath("static/route_dashboard.html").read_text(encoding="utf-8")
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    return router


def _outgoing(request: Request, body: bytes) -> Outgoing:
    query = request.url.query
    path = request.url.path + (f"?{query}" if query else "")
    return Outgoing(request.method, path, upstream_headers(request.headers), body)


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The raw body, refused with 413 past ``limit`` (the replicas' own cap) as it arrives."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + _DISCARD_BYTES:
        raise _too_large(limit)
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            chunks.clear()
            if total > limit + _DISCARD_BYTES:
                break
            continue
        chunks.append(chunk)
    if total > limit:
        raise _too_large(limit)
    return b"".join(chunks)


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The request body is larger than {limit // (1024 * 1024)} MiB.")


async def parse_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object for the picker, ``{}`` when it is not one (the replica answers
    the 400 itself). A big body is parsed off the event loop."""
    if len(body) > _PARSE_IN_THREAD_BYTES:
        return await asyncio.to_thread(_parse_object, body)
    return _parse_object(body)


def _parse_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


async def fan_out(services: RouterServices, request: Request) -> Response:
    """The same admin request to every healthy replica with the client's own auth headers.

    200 with ``{"replicas": {url: answer}}`` when any succeeded (a failed one shows
    ``{"error": ...}``); when none did and one refused the key (401/403), that refusal as is;
    otherwise 502 with the same per-replica map."""
    healthy = services.replicas.healthy()
    if not healthy:
        return no_replica_response(request.url.path)
    client = services.forwarder.client
    headers = upstream_headers(request.headers)
    query = request.url.query
    path = request.url.path + (f"?{query}" if query else "")

    async def one(url: str) -> tuple[str, httpx.Response | None, dict[str, Any]]:
        try:
            resp = await client.request(request.method, url + path, headers=headers)
        except httpx.HTTPError as exc:
            return url, None, {"error": f"{type(exc).__name__}: the replica did not answer"}
        try:
            data = resp.json()
        except ValueError:
            data = None
        if resp.is_success and isinstance(data, dict):
            return url, resp, data
        return url, resp, {"error": data if data is not None else f"HTTP {resp.status_code}"}

    answers = await asyncio.gather(*(one(s.url) for s in healthy))
    per_replica = {url: data for url, _, data in answers}
    if any(resp is not None and resp.is_success for _, resp, _ in answers):
        return JSONResponse({"replicas": per_replica})
    for _, resp, _ in answers:
        if resp is not None and resp.status_code in (401, 403):
            passed = {k: v for k, v in resp.headers.items() if k.lower() in _REFUSAL_HEADERS}
            return Response(resp.content, status_code=resp.status_code, headers=passed)
    return JSONResponse({"replicas": per_replica}, status_code=502)
