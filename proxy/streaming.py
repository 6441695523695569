"""Server-sent events in the OpenAI shape: one chunk per text delta, a final chunk with the
finish_reason, an optional usage chunk (``stream_options.include_usage``), then ``data: [DONE]``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from model_runner.records import Finished, TextDelta
from proxy.errors import error_body
from proxy.generation import GenerationService
from proxy.schemas import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    Completion,
    CompletionChoice,
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
    kind: Literal["chat", "completion"]
    id: str
    created: int
    model: str
    include_usage: bool
    route: str
    tenant: str


def _chunk(
    meta: StreamMeta,
    *,
    text: str | None = None,
    role: bool = False,
    finish_reason: str | None = None,
    usage: Usage | None = None,
    no_choices: bool = False,
) -> BaseModel:
    if meta.kind == "chat":
        choices = (
            []
            if no_choices
            else [
                ChatChunkChoice(
                    delta=ChatDelta(role="assistant" if role else None, content=text),
                    finish_reason=finish_reason,
                )
            ]
        )
        return ChatCompletionChunk(
            id=meta.id, created=meta.created, model=meta.model, choices=choices, usage=usage
        )
    choices_c = [] if no_choices else [CompletionChoice(text=text or "", finish_reason=finish_reason)]
    return Completion(id=meta.id, created=meta.created, model=meta.model, choices=choices_c, usage=usage)


async def stream_sse(
    generation: GenerationService, stream: JobStream[TextDelta | Finished], meta: StreamMeta
) -> AsyncIterator[str]:
    """The SSE body. When the client goes away Starlette cancels this generator; the ``finally``
    then cancels the job, so the engine stops and releases its locked blocks."""
    try:
        if meta.kind == "chat":
            yield sse(_chunk(meta, text="", role=True))
        async for event in stream:
            if isinstance(event, TextDelta):
                if event.text:
                    yield sse(_chunk(meta, text=event.text))
            elif isinstance(event, Finished):
                usage = generation.record(event, route=meta.route, tenant=meta.tenant)
                yield sse(
                    _chunk(
                        meta,
                        text="" if meta.kind == "completion" else None,
                        finish_reason=event.finish_reason,
                    )
                )
                if meta.include_usage:
                    yield sse(_chunk(meta, usage=usage, no_choices=True))
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
