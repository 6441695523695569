"""The pieces of Anthropic's event stream: content blocks open and close in order as the parsed
deltas change kind, a tool call is one whole block, and pings fill the silences of a long
prefill (without ending the stream they wait on)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from proxy.anthropic.streaming import BlockEncoder, with_pings
from proxy.responses import ChatDelta, FunctionCallDelta, ToolCallDelta


def frames(chunks: list[str]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for chunk in chunks:
        name_line, data_line = chunk.strip().split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: ")
        data = json.loads(data_line.removeprefix("data: "))
        assert data["type"] == name_line.removeprefix("event: ")
        out.append((data["type"], data))
    return out


def test_blocks_follow_the_kind_of_each_delta() -> None:
    enc = BlockEncoder()
    call = ToolCallDelta(
        index=0, id="call_1", type="function", function=FunctionCallDelta(name="f", arguments='{"a": 1}')
    )
    chunks = [
        *enc.deltas(ChatDelta(reasoning_content="hmm")),
        *enc.deltas(ChatDelta(reasoning_content=" ok")),
        *enc.deltas(ChatDelta(content="Hi")),
        *enc.deltas(None),
        *enc.deltas(ChatDelta(content=" there")),
        *enc.deltas(ChatDelta(tool_calls=[call])),
        *enc.close(),
    ]
    got = [
        (kind, data.get("index"), data.get("content_block", data.get("delta", {})).get("type"))
        for kind, data in frames(chunks)
    ]
    assert got == [
        ("content_block_start", 0, "thinking"),
        ("content_block_delta", 0, "thinking_delta"),
        ("content_block_delta", 0, "thinking_delta"),
        ("content_block_stop", 0, None),
        ("content_block_start", 1, "text"),
        ("content_block_delta", 1, "text_delta"),
        ("content_block_delta", 1, "text_delta"),
        ("content_block_stop", 1, None),
        ("content_block_start", 2, "tool_use"),
        ("content_block_delta", 2, "input_json_delta"),
        ("content_block_stop", 2, None),
    ]
    tool = frames(chunks)[8][1]["content_block"]
    assert tool == {"type": "tool_use", "id": "call_1", "name": "f", "input": {}}
    assert frames(chunks)[9][1]["delta"]["partial_json"] == '{"a": 1}'


def test_pings_fill_silences_and_closing_stops_the_source() -> None:
    stopped = asyncio.Event()

    async def slow() -> AsyncIterator[int]:
        try:
            await asyncio.sleep(0.35)  # a long prefill
            yield 1
            yield 2
            await asyncio.sleep(10)  # never reached: the consumer goes away
            yield 3
        finally:
            stopped.set()

    async def main() -> list[Any]:
        seen: list[Any] = []
        stream = with_pings(slow(), 0.1)
        async for item in stream:
            seen.append(item)
            if item == 2:
                break
        await stream.aclose()
        await asyncio.wait_for(stopped.wait(), 2)
        return seen

    seen = asyncio.run(main())
    assert seen[-2:] == [1, 2]
    assert 2 <= seen.count(None) <= 4 and set(seen[:-2]) == {None}


def test_pings_pass_errors_through() -> None:
    async def failing() -> AsyncIterator[int]:
        yield 1
        raise RuntimeError("engine fault")

    async def main() -> list[Any]:
        seen: list[Any] = []
        try:
            async for item in with_pings(failing(), 1.0):
                seen.append(item)
        except RuntimeError as exc:
            seen.append(str(exc))
        return seen

    assert asyncio.run(main()) == [1, "engine fault"]
