"""What a caller gets from submitting to the engine: a ``Handle`` to cancel with and the events to
read (``drain_events``), or a refusal (``QueueFull``, ``EngineClosed``)."""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator

from model_runner.records import Failed, Finished, TextDelta
from model_runner.sequence import Event
from model_runner.sequence import Sequence as Seq


class QueueFull(Exception):
    """``max_waiting`` requests are waiting already."""


class EngineClosed(Exception):
    """The engine is shutting down and takes no new work (or dropped this request while stopping)."""


class Handle:
    """A submitted request: ``cancel()`` makes it leave the batch at the next step."""

    def __init__(self, seq: Seq, wake: Callable[[], None]) -> None:
        self._seq = seq
        self._wake = wake

    def cancel(self) -> None:
        if not self._seq.cancel.is_set():
            self._seq.cancel.set()
            self._wake()


def drain_events(handle: Handle, events: queue.SimpleQueue[Event]) -> Iterator[TextDelta | Finished]:
    """The request's ``TextDelta``s and its ``Finished``, in order, from ``events`` (its sink's
    queue); a ``Failed`` event is raised as its error. The request is cancelled when the consumer
    stops early."""
    try:
        while True:
            event = events.get()
            if isinstance(event, Failed):
                raise event.error
            if isinstance(event, TextDelta | Finished):
                yield event
            if isinstance(event, Finished):
                return
    finally:
        handle.cancel()  # the consumer stopped early: the request leaves the batch
