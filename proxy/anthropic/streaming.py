"""Server-sent events in Anthropic's shape, each frame with its ``event:`` line, in its order:
``message_start``, a ``ping``, then per content block ``content_block_start``,
``content_block_delta`` (``thinking_delta``, ``text_delta``, ``input_json_delta``) and
``content_block_stop``, then ``message_delta`` (``stop_reason`` and the cumulative usage) and
``message_stop``. While nothing else is sent (a long prefill) a ``ping`` goes out every few
seconds. An error after the status line is an ``error`` event.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from model_runner.records import Finished, TextDelta
from proxy.anthropic.plan import MessagesPlan
from proxy.anthropic.responses import Message, MessageUsage, message_usage, stop_reason
from proxy.chat_output import ChoiceOutput
from proxy.errors import anthropic_error
from proxy.generation import GenerationService
from proxy.responses import ChatDelta
from proxy.worker import EngineClosed, JobStream

log = logging.getLogger("kvproxy")

PING_INTERVAL_S = 5.0

T = TypeVar("T")


def event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


PING = event("ping", {"type": "ping"})


@dataclass(frozen=True)
class MessageMeta:
    id: str
    model: str
    route: str
    tenant: str
    block_size: int


class BlockEncoder:
    """Turns one choice's parsed deltas into content blocks: a block opens when its kind first
    appears and closes when another kind starts (a tool call is one whole block)."""

    def __init__(self) -> None:
        self._index = -1
        self._open: str | None = None

    def deltas(self, delta: ChatDelta | None) -> list[str]:
        if delta is None:
            return []
        out: list[str] = []
        if delta.reasoning_content:
            out += self._ensure("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            out.append(self._delta({"type": "thinking_delta", "thinking": delta.reasoning_content}))
        if delta.content:
            out += self._ensure("text", {"type": "text", "text": ""})
            out.append(self._delta({"type": "text_delta", "text": delta.content}))
        for call in delta.tool_calls or []:
            function = call.function
            out += self._close()
            self._index += 1
            self._open = "tool_use"
            block = {"type": "tool_use", "id": call.id or "", "name": function.name or "", "input": {}}
            out.append(
                event(
                    "content_block_start",
                    {"type": "content_block_start", "index": self._index, "content_block": block},
                )
            )
            out.append(self._delta({"type": "input_json_delta", "partial_json": function.arguments or ""}))
            out += self._close()
        return out

    def close(self) -> list[str]:
        return self._close()

    def _ensure(self, kind: str, block: dict[str, Any]) -> list[str]:
        if self._open == kind:
            return []
        out = self._close()
        self._index += 1
        self._open = kind
        out.append(
            event(
                "content_block_start",
                {"type": "content_block_start", "index": self._index, "content_block": block},
            )
        )
        return out

    def _delta(self, delta: dict[str, Any]) -> str:
        return event(
            "content_block_delta", {"type": "content_block_delta", "index": self._index, "delta": delta}
        )

    def _close(self) -> list[str]:
        if self._open is None:
            return []
        self._open = None
        return [event("content_block_stop", {"type": "content_block_stop", "index": self._index})]


async def with_pings(events: AsyncIterator[T], every_s: float) -> AsyncIterator[T | None]:
    """``events``, with a ``None`` whenever ``every_s`` pass without one. Closing this generator
    (the client went away) cancels the reader, which stops ``events``."""
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for item in events:
                await queue.put(("item", item))
            await queue.put(("end", None))
        except Exception as exc:
            await queue.put(("error", exc))

    reader = asyncio.create_task(pump())
    try:
        while True:
            try:
                kind, value = await asyncio.wait_for(queue.get(), every_s)
            except TimeoutError:
                yield None
                continue
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        reader.cancel()


async def message_sse(
    generation: GenerationService,
    stream: JobStream[TextDelta | Finished],
    meta: MessageMeta,
    plan: MessagesPlan,
    output: ChoiceOutput,
    on_done: Callable[[], Awaitable[None]] | None = None,
) -> AsyncIterator[str]:
    """The SSE body of one streamed message; the ``finally`` cancels the job when the client
    goes away."""
    blocks = BlockEncoder()
    start = Message(
        id=meta.id,
        content=[],
        model=meta.model,
        stop_reason=None,
        usage=MessageUsage(input_tokens=plan.prompt_tokens, output_tokens=0),
    ).model_dump(exclude={"usage": {"kvproxy"}})
    try:
        yield event("message_start", {"type": "message_start", "message": start})
        yield PING
        async for item in with_pings(stream.__aiter__(), PING_INTERVAL_S):
            if item is None:
                yield PING
            elif isinstance(item, TextDelta):
                delta, _ = output.feed(item)
                for frame in blocks.deltas(delta):
                    yield frame
            elif isinstance(item, Finished):
                for frame in blocks.deltas(output.finish(item.finish_reason)):
                    yield frame
                for frame in blocks.close():
                    yield frame
                kvproxy = generation.record([item], route=meta.route, tenant=meta.tenant).kvproxy
                usage = message_usage(item.usage, plan, meta.block_size, kvproxy).model_dump()
                reason = stop_reason(output.finish_reason, item.stop_sequence)
                yield event(
                    "message_delta",
                    {
                        "type": "message_delta",
                        "delta": {
                            "stop_reason": reason,
                            "stop_sequence": item.stop_sequence if reason == "stop_sequence" else None,
                        },
                        "usage": usage,
                    },
                )
                if on_done is not None:
                    await on_done()  # before message_stop: the client's next request comes after it
                yield event("message_stop", {"type": "message_stop"})
                return
    except EngineClosed:
        yield _error(529, "The server is shutting down.")
    except Exception:
        log.exception("generation failed mid-stream")
        yield _error(500, "The server had an internal error.")
    finally:
        stream.cancel()


def _error(status: int, message: str) -> str:
    _, body = anthropic_error(status, message)
    return event("error", body)
