"""``create_app(settings)``: the FastAPI app, its lifespan and its routers.

Services are built when the app starts (not at import) and kept in one typed container on
``app.state.services``, reached through ``proxy.deps.get_services``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy.anthropic.schemas import CountTokensRequest, MessagesRequest
from proxy.body import add_body_schemas
from proxy.errors import install_error_handlers
from proxy.routers import cache, chat, completions, dashboard, health, messages, metrics, models, pins
from proxy.schemas import ChatCompletionRequest, CompletionRequest, PinCreateRequest, WarmupRequest
from proxy.services import Services
from proxy.settings import ServeSettings

log = logging.getLogger("kvproxy")

SHUTDOWN_GRACE_S = 10.0
"""How long uvicorn lets in-flight requests finish after SIGTERM before it cancels them."""
WORKER_GRACE_S = 2.0
"""Then how long running requests may go on in the engine before they are cancelled (a cancelled
request leaves the batch at the next step)."""
DRAIN_TIMEOUT_S = 15.0
"""Then the bound on writing the queued blocks to disk/Redis."""
PIN_SWEEP_S = 10.0
"""How often expired pins are swept."""


class RequestMetricsMiddleware:
    """Counts every response in ``kvproxy_requests_total{route,status}``; the route label is the
    matched route template (never the raw path, which would explode label cardinality)."""

    def __init__(self, app: ASGIApp, services: Services) -> None:
        self.app = app
        self.services = services

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            self.services.metrics.observe_request(self._route(scope), status)

    @staticmethod
    def _route(scope: Scope) -> str:
        # The router records the matched route in the (shared) scope on its way in.
        return str(getattr(scope.get("route"), "path", "other"))


async def _sweep_pins(services: Services) -> None:
    """Expired pins are dropped lazily by every pin call, and here periodically, so an idle
    server gives their memory back too."""
    while True:
        await asyncio.sleep(PIN_SWEEP_S)
        try:
            await asyncio.to_thread(services.sweep_pins)
        except Exception:
            log.exception("sweeping expired pins failed")


def create_app(settings: ServeSettings, services: Services | None = None) -> FastAPI:
    """The app for ``settings``; ``services`` may be given pre-built (the CLI builds them to
    report a bad keys file before binding the port)."""
    services = services or Services.create(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services.start()
        sweeper = asyncio.create_task(_sweep_pins(services))
        try:
            yield
        finally:
            sweeper.cancel()
            log.info("shutting down: finishing running work, draining the store writer")
            # In a thread: the loop must keep running so that requests cancelled by the server's
            # shutdown run their cleanup (which cancels their jobs) while we wait for the worker.
            await asyncio.to_thread(services.close, grace_s=WORKER_GRACE_S, drain_s=DRAIN_TIMEOUT_S)

    app = FastAPI(
        title="kvproxy",
        summary="OpenAI-compatible prefix-caching server",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.services = services
    install_error_handlers(app)
    for module in (chat, completions, messages, models, cache, pins, health, metrics, dashboard):
        app.include_router(module.router)
    app.add_middleware(RequestMetricsMiddleware, services=services)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            app.openapi_schema = add_body_schemas(
                schema,
                (
                    ChatCompletionRequest,
                    CompletionRequest,
                    MessagesRequest,
                    CountTokensRequest,
                    WarmupRequest,
                    PinCreateRequest,
                ),
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
