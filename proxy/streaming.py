"""Server-sent events in the OpenAI shape: a chunk per text delta of each choice (with its
logprobs when asked for), a chunk with each choice's finish_reason, an optional usage chunk
(``stream_options.include_usage``) once every choice is done, then ``data: [DONE]``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from model_runner.records import Finished, TextDelta
from proxy.chat_output import ChoiceOutput
from proxy.errors import error_body
from proxy.generation import GenerationService
from proxy.logprobs import LogprobFormatter
from proxy.responses import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    Usage,
)
from proxy.worker import EngineClosed, JobStream

log = logging.getLogger("kvproxy")

DONE = "data: [DONE]\n\n"


def sse(payload: BaseModel | dict[str, Any]) -> str:
    data = payload.model_dump(exclude_none=False) if isinstance(payload, BaseModel) else payload
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


@dataclass(frozen=True)
class StreamMeta:
    id: str
    created: int
    model: str
    include_usage: bool
    route: str
    tenant: str
    choices: int = 1
    cache_key: str | None = None


class ChatEncoder:
    """Chat chunks: each choice's deltas go through its ``ChoiceOutput`` (tool calls, reasoning)."""

    def __init__(self, meta: StreamMeta, outputs: list[ChoiceOutput]) -> None:
        self._meta = meta
        self._outputs = outputs

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        m = self._meta
        return sse(
            ChatCompletionChunk(id=m.id, created=m.created, model=m.model, choices=choices, usage=usage)
        )

    def opening(self) -> list[str]:
        return [
            self._chunk([ChatChunkChoice(index=o.index, delta=ChatDelta(role="assistant", content=""))])
            for o in self._outputs
        ]

    def text(self, event: TextDelta) -> list[str]:
        delta, logprobs = self._outputs[event.index].feed(event)
        if delta is None and logprobs is None:
            return []
        return [
            self._chunk([ChatChunkChoice(index=event.index, delta=delta or ChatDelta(), logprobs=logprobs)])
        ]

    def finished(self, event: Finished) -> list[str]:
        output = self._outputs[event.index]
        delta = output.finish(event.finish_reason)
        out = []
        if delta is not None:
            out.append(self._chunk([ChatChunkChoice(index=event.index, delta=delta)]))
        out.append(
            self._chunk(
                [ChatChunkChoice(index=event.index, delta=ChatDelta(), finish_reason=output.finish_reason)]
            )
        )
        return out

    def usage(self, usage: Usage) -> str:
        return self._chunk([], usage)


class CompletionEncoder:
    """Completion chunks: text and the legacy logprobs lists."""

    def __init__(self, meta: StreamMeta, logprobs: LogprobFormatter | None, with_top: bool) -> None:
        self._meta = meta
        self._logprobs = logprobs
        self._with_top = with_top
        self._offsets = [0] * meta.choices

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        m = self._meta
        return sse(Completion(id=m.id, created=m.created, model=m.model, choices=choices, usage=usage))

    def opening(self) -> list[str]:
        return []

    def text(self, event: TextDelta) -> list[str]:
        if not event.text and not event.logprobs:
            return []
        logprobs: CompletionLogprobs | None = None
        if self._logprobs is not None:
            logprobs = self._logprobs.completion(event.logprobs, self._offsets[event.index], self._with_top)
        self._offsets[event.index] += len(event.text)
        return [
            self._chunk(
                [CompletionChoice(index=event.index, text=event.text, finish_reason=None, logprobs=logprobs)]
            )
        ]

    def finished(self, event: Finished) -> list[str]:
        return [
            self._chunk([CompletionChoice(index=event.index, text="", finish_reason=event.finish_reason)])
        ]

    def usage(self, usage: Usage) -> str:
        return self._chunk([], usage)


Encoder = ChatEncoder | CompletionEncoder


async def stream_sse(
    generation: GenerationService,
    stream: JobStream[TextDelta | Finished],
    meta: StreamMeta,
    encoder: Encoder,
    on_done: Callable[[], Awaitable[None]] | None = None,
) -> AsyncIterator[str]:
    """The SSE body. When the client goes away Starlette cancels this generator; the ``finally``
    then cancels the job, so the engine stops and releases its locked blocks."""
    finishes: list[Finished] = []
    try:
        for chunk in encoder.opening():
            yield chunk
        async for event in stream:
            if isinstance(event, TextDelta):
                for chunk in encoder.text(event):
                    yield chunk
            elif isinstance(event, Finished):
                finishes.append(event)
                for chunk in encoder.finished(event):
                    yield chunk
                if len(finishes) < meta.choices:
                    continue
                usage = generation.record(
                    finishes, route=meta.route, tenant=meta.tenant, cache_key=meta.cache_key
                )
                if meta.include_usage:
                    yield encoder.usage(usage)
                if on_done is not None:
                    await on_done()  # before [DONE]: the client's next request comes after it
                yield DONE
                return
    except EngineClosed:
        yield sse(error_body("The server is shutting down.", type_="server_error", code="shutting_down"))
        yield DONE
    except Exception:
        # The status line has gone out already: report in-band, log the details here only.
        log.exception("generation failed mid-stream")
        yield sse(
            error_body("The server had an internal error.", type_="server_error", code="internal_error")
        )
        yield DONE
    finally:
        stream.cancel()


__all__ = ["ChatEncoder", "ChatLogprobs", "CompletionEncoder", "StreamMeta", "sse", "stream_sse"]
