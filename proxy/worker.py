"""Between the event loop and the engine's step loop: submitting work and streaming it back.

The engine (``model_runner.engine``) batches every request on its own thread and hands each
request's events to a sink on that thread; ``JobStream`` turns them into an async iterator
through ``loop.call_soon_threadsafe``. A consumer that goes away (client disconnected) cancels
the request, which leaves the batch at the next step and releases its block locks. A full queue
refuses the request at once (the caller answers 503 + Retry-After) rather than letting requests
pile up.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Generic, TypeVar

from model_runner.engine import Engine, EngineClosed, Handle, QueueFull
from model_runner.records import Failed, Finished, GenerationRequest, PinRequest, TextDelta, WarmupResult

__all__ = ["EngineClosed", "JobStream", "QueueFull", "on_engine", "open_stream", "start_warmup", "warmup"]

T = TypeVar("T")
R = TypeVar("R")

_END = object()


class JobStream(Generic[T]):
    """The asyncio side of one request: iterate it for the events; ``cancel()`` stops it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, finishes: int = 1) -> None:
        self._loop = loop
        self._finishes = finishes
        """``Finished`` events that end the stream (one per choice)."""
        self._items: asyncio.Queue[Any] = asyncio.Queue()
        self._handle: Handle | None = None
        self._cancelled = False

    def attach(self, handle: Handle) -> None:
        self._handle = handle
        if self._cancelled:
            handle.cancel()

    # -- called on the engine's thread --
    def deliver(self, event: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._items.put_nowait, event)
        except RuntimeError:
            # The loop is closed: nobody is listening any more.
            self.cancel()

    # -- called on the event loop --
    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        self._cancelled = True
        if self._handle is not None:
            self._handle.cancel()

    async def __aiter__(self) -> AsyncIterator[T]:
        finished = 0
        try:
            while True:
                event = await self._items.get()
                if isinstance(event, Failed):
                    raise event.error
                yield event
                if isinstance(event, Finished):
                    finished += 1
                if finished >= self._finishes or isinstance(event, WarmupResult):
                    return
        finally:
            # Normal end, error, or the consumer stopped early (disconnect): the request must stop.
            self.cancel()


def open_stream(engine: Engine, request: GenerationRequest) -> JobStream[TextDelta | Finished]:
    """Submit ``request``; raises ``QueueFull`` / ``EngineClosed`` (and the engine's request
    errors) at once. The caller must ``cancel()`` the stream when it stops reading early."""
    stream: JobStream[TextDelta | Finished] = JobStream(asyncio.get_running_loop(), finishes=request.n)
    stream.attach(engine.submit(request, stream.deliver))
    return stream


def start_warmup(
    engine: Engine,
    prompt_ids: Sequence[int],
    *,
    tenant: str,
    cache_salt: str,
    pins: tuple[PinRequest, ...] = (),
) -> JobStream[WarmupResult]:
    """Queue a warmup now (raises ``QueueFull`` / ``EngineClosed`` at once); iterate the stream
    for its one ``WarmupResult``."""
    stream: JobStream[WarmupResult] = JobStream(asyncio.get_running_loop())
    stream.attach(
        engine.submit_warmup(prompt_ids, stream.deliver, tenant=tenant, cache_salt=cache_salt, pins=pins)
    )
    return stream


async def warmup(
    engine: Engine,
    prompt_ids: Sequence[int],
    *,
    tenant: str,
    cache_salt: str,
    pins: tuple[PinRequest, ...] = (),
) -> WarmupResult:
    """Prefill and store one prompt through the engine's scheduler (it shares the batch), then
    make ``pins``."""
    stream = start_warmup(engine, prompt_ids, tenant=tenant, cache_salt=cache_salt, pins=pins)
    async for result in stream:
        return result
    raise EngineClosed("the warmup ended without a result")


async def on_engine(engine: Engine, work: Callable[[], R]) -> R:
    """Run ``work`` on the engine's step loop, between two steps, and await its result."""
    return await asyncio.wrap_future(engine.call(work))
