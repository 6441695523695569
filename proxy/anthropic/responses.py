"""Anthropic Messages API responses: the message, its content blocks, and usage that tells the
truth about the cache.

``usage``: ``cache_read_input_tokens`` are the prompt tokens restored from the cache (whole blocks,
as ``cached_tokens`` on the OpenAI routes); ``cache_creation_input_tokens`` are the tokens of the
blocks up to the last breakpoint that this request wrote to the cache (whole blocks), split by the
TTL of the breakpoint that covers them; ``input_tokens`` is the rest of the prompt. The three add
up to the prompt's length (``count_tokens``).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, Field

from model_runner.records import UsageReport
from proxy.anthropic.plan import MessagesPlan
from proxy.responses import KvproxyUsage

StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class CacheCreation(BaseModel):
    ephemeral_5m_input_tokens: int = 0
    ephemeral_1h_input_tokens: int = 0


class MessageUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation: CacheCreation = Field(default_factory=CacheCreation)
    service_tier: str = "standard"
    kvproxy: KvproxyUsage | None = None
    """What standard clients ignore: cached tokens by tier, time to first token, miss reason."""


class TextContent(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ThinkingContent(BaseModel):
    type: Literal["thinking"] = "thinking"
    thinking: str
    signature: str = ""


class ToolUseContent(BaseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


ContentOut = TextContent | ThinkingContent | ToolUseContent


class Message(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    content: list[ContentOut]
    model: str
    stop_reason: StopReason | None
    stop_sequence: str | None = None
    usage: MessageUsage


class CountTokens(BaseModel):
    input_tokens: int


def stop_reason(finish_reason: str | None, stop_sequence: str | None) -> StopReason:
    """Anthropic's ``stop_reason`` from a choice's finish (``ChoiceOutput.finish_reason``)."""
    if finish_reason == "length":
        return "max_tokens"
    if finish_reason in ("tool_calls", "function_call"):
        return "tool_use"
    return "stop_sequence" if stop_sequence is not None else "end_turn"


def tool_input(arguments: str) -> dict[str, Any]:
    """A parsed call's arguments (valid JSON by construction: the parser emits only those)."""
    value = json.loads(arguments) if arguments else {}
    return value if isinstance(value, dict) else {"value": value}


def message_usage(
    report: UsageReport, plan: MessagesPlan, block_size: int, kvproxy: KvproxyUsage | None = None
) -> MessageUsage:
    written = set(report.written_blocks)
    by_ttl: dict[str, int] = {"5m": 0, "1h": 0}
    covered = 0  # blocks already counted under a longer-lived breakpoint
    # Breakpoints come in order, 1h ones first: each counts the blocks it covers beyond the last.
    for placed in plan.breakpoints:
        blocks = placed.tokens // block_size
        if blocks > covered:
            by_ttl[placed.breakpoint.ttl] += (
                sum(1 for b in range(covered, blocks) if b in written) * block_size
            )
            covered = blocks
    creation = by_ttl["5m"] + by_ttl["1h"]
    read = report.cached_tokens
    return MessageUsage(
        input_tokens=max(report.prompt_tokens - read - creation, 0),
        output_tokens=report.completion_tokens,
        cache_creation_input_tokens=creation,
        cache_read_input_tokens=read,
        cache_creation=CacheCreation(
            ephemeral_5m_input_tokens=by_ttl["5m"], ephemeral_1h_input_tokens=by_ttl["1h"]
        ),
        kvproxy=kvproxy,
    )
