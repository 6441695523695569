"""The one model worker thread, with a bounded queue in front of it.

Forward passes and store calls run here, never on the event loop. Each job is a function of a
cancel event that returns an iterator; whatever it yields is handed to the asyncio side through
``loop.call_soon_threadsafe``. A consumer that goes away (client disconnected) sets the cancel
event, so the engine stops decoding and releases its block locks. A full queue refuses the job at
once (the caller answers 503 + Retry-After) rather than letting requests pile up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

log = logging.getLogger("kvproxy")

T = TypeVar("T")
R = TypeVar("R")


class QueueFull(Exception):
    """The queue holds --max-queue jobs already."""


class WorkerClosed(Exception):
    """The server is shutting down and takes no new work (or dropped this job while stopping)."""


_ITEM, _ERROR, _END = "item", "error", "end"


class JobStream(Generic[T]):
    """The asyncio side of one job: iterate it for the items; ``cancel()`` stops the job."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.cancel_event = threading.Event()
        self.started = threading.Event()

    # -- called on the worker thread --
    def deliver(self, kind: str, value: Any = None) -> None:
        try:
            self._loop.call_soon_threadsafe(self._items.put_nowait, (kind, value))
        except RuntimeError:
            # The loop is closed: nobody is listening any more.
            self.cancel_event.set()

    # -- called on the event loop --
    def cancel(self) -> None:
        self.cancel_event.set()

    async def __aiter__(self) -> AsyncIterator[T]:
        try:
            while True:
                kind, value = await self._items.get()
                if kind == _ITEM:
                    yield value
                elif kind == _ERROR:
                    raise value
                else:
                    return
        finally:
            # Normal end, error, or the consumer stopped early (disconnect): the job must stop.
            self.cancel_event.set()

    async def result(self) -> T:
        """The single item of a call-style job."""
        try:
            async for item in self:
                return item
        finally:
            self.cancel_event.set()
        raise WorkerClosed("the job ended without a result")


@dataclass
class _Job:
    work: Callable[[threading.Event], Iterator[Any]]
    stream: JobStream[Any]
    queued_at: float


@dataclass(frozen=True)
class WorkerStats:
    queued: int
    max_queue: int
    busy: bool
    completed: int
    rejected: int


class ModelWorker:
    def __init__(self, max_queue: int, *, name: str = "kvproxy-model") -> None:
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        self._max_queue = max_queue
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._current: _Job | None = None
        self._completed = 0
        self._rejected = 0

    def start(self) -> None:
        self._thread.start()

    # ---- submitting (event loop) ----

    def submit(self, work: Callable[[threading.Event], Iterator[T]]) -> JobStream[T]:
        """Queue ``work(cancel)``; raises QueueFull or WorkerClosed instead of waiting."""
        if self._closed.is_set():
            raise WorkerClosed("the server is shutting down")
        stream: JobStream[T] = JobStream(asyncio.get_running_loop())
        try:
            self._queue.put_nowait(_Job(work, stream, time.monotonic()))
        except queue.Full:
            with self._lock:
                self._rejected += 1
            raise QueueFull(f"the request queue is full ({self._max_queue} waiting)") from None
        return stream

    async def call(self, work: Callable[[threading.Event], R]) -> R:
        """Run a plain function on the worker thread and await its result."""

        def once(cancel: threading.Event) -> Iterator[R]:
            yield work(cancel)

        return await self.submit(once).result()

    # ---- the thread ----

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            stream = job.stream
            if stream.cancel_event.is_set():
                stream.deliver(_END)
                continue
            with self._lock:
                self._current = job
            stream.started.set()
            try:
                for item in job.work(stream.cancel_event):
                    stream.deliver(_ITEM, item)
                stream.deliver(_END)
            except Exception as exc:  # handed to the awaiting request, which maps it to HTTP
                stream.deliver(_ERROR, exc)
            except BaseException as exc:
                stream.deliver(_ERROR, WorkerClosed(f"worker stopped: {exc.__class__.__name__}"))
                raise
            finally:
                with self._lock:
                    self._current = None
                    self._completed += 1

    # ---- shutdown ----

    def close(self, grace_s: float = 10.0) -> bool:
        """Stop taking jobs, drop queued ones, give the running job ``grace_s`` then cancel it.

        Returns True when the thread stopped within the bound.
        """
        self._closed.set()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.stream.cancel_event.set()
                job.stream.deliver(_ERROR, WorkerClosed("the server is shutting down"))
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and self.busy:
            time.sleep(0.02)
        with self._lock:
            if self._current is not None:
                self._current.stream.cancel_event.set()
        # The stop sentinel; if a submit raced the close and filled the queue, the thread is a
        # daemon and its job was cancelled anyway.
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=1.0)
        if self._thread.is_alive():
            self._thread.join(timeout=max(1.0, deadline - time.monotonic()))
        return not self._thread.is_alive()

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._current is not None

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def stats(self) -> WorkerStats:
        with self._lock:
            return WorkerStats(
                queued=self._queue.qsize(),
                max_queue=self._max_queue,
                busy=self._current is not None,
                completed=self._completed,
                rejected=self._rejected,
            )
