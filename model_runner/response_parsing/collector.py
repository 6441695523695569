"""Assembling the message: where stages put text and calls, as events and as the whole message."""

from __future__ import annotations

import random
import string
from collections.abc import Callable

from model_runner.response_parsing.records import (
    ContentDelta,
    ParsedMessage,
    ParsedToolCall,
    ParseEvent,
    ReasoningDelta,
    ToolCallArguments,
    ToolCallStart,
)

_ALNUM = string.ascii_letters + string.digits


class Channel:
    """One text stream (content or reasoning). Whitespace adjacent to a marker is dropped: held
    trailing whitespace dies at ``marker()``, and leading whitespace after it is skipped."""

    def __init__(self, emit: Callable[[str], None]) -> None:
        self._emit = emit
        self._pending = ""
        self._skip_leading = False

    def push(self, text: str) -> None:
        if self._skip_leading:
            text = text.lstrip()
            if not text:
                return
            self._skip_leading = False
        text = self._pending + text
        body = text.rstrip()
        self._pending = text[len(body) :]  # may still turn out to precede a marker
        if body:
            self._emit(body)

    def marker(self) -> None:
        self._pending = ""
        self._skip_leading = True

    def flush(self) -> None:
        if self._pending:
            self._emit(self._pending)
            self._pending = ""


class Collector:
    """Where stages put text and calls: it records the events and the message they add up to."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._events: list[ParseEvent] = []
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self._calls: list[ParsedToolCall] = []
        self.content = Channel(self._emit_content)
        self.reasoning = Channel(self._emit_reasoning)

    def _emit_content(self, text: str) -> None:
        self._content.append(text)
        self._events.append(ContentDelta(text))

    def _emit_reasoning(self, text: str) -> None:
        self._reasoning.append(text)
        self._events.append(ReasoningDelta(text))

    def call(self, name: str, arguments: str, call_id: str | None) -> None:
        self.content.marker()
        call_id = call_id or "call_" + "".join(self._rng.choice(_ALNUM) for _ in range(24))
        index = len(self._calls)
        self._calls.append(ParsedToolCall(call_id, name, arguments))
        self._events += [ToolCallStart(index, call_id, name), ToolCallArguments(index, arguments)]

    def drain(self) -> list[ParseEvent]:
        events, self._events = self._events, []
        return events

    def flush(self) -> None:
        self.reasoning.flush()
        self.content.flush()

    def message(self) -> ParsedMessage:
        content, reasoning = "".join(self._content), "".join(self._reasoning)
        return ParsedMessage(content or None, reasoning or None, tuple(self._calls))
