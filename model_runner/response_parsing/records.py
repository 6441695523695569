"""What parsing a reply yields: the message, its streamed events, and the parser protocol."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class ParsedToolCall:
    id: str
    """From the text when the format carries ids (Mistral), else ``call_`` + 24 letters/digits."""
    name: str
    arguments: str
    """The arguments object as JSON text, exactly as generated (re-serialised only when the
    format needed parsing, as transformers' parser does)."""


@dataclass(frozen=True)
class ParsedMessage:
    content: str | None
    """None when empty."""
    reasoning: str | None
    tool_calls: tuple[ParsedToolCall, ...]


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class ToolCallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArguments:
    index: int
    fragment: str
    """The fragments of one call concatenate to its ``ParsedToolCall.arguments``."""


ParseEvent = ContentDelta | ReasoningDelta | ToolCallStart | ToolCallArguments


class OutputParser(Protocol):
    def feed(self, text: str) -> list[ParseEvent]:
        """Events for the next text delta; text that may be the start of a marker is held back."""
        ...

    def finish(self) -> tuple[ParsedMessage, list[ParseEvent]]:
        """End of generation: the whole message and the last events (held text flushed; an
        unterminated or invalid tool call is content). The parser takes no text after this."""
        ...
