"""An Anthropic conversation as the chat template sees it, and where its cache breakpoints fall.

The conversation becomes an internal OpenAI-shaped chat request, so tools, forced tool calls
(``tool_choice`` ``any`` / ``tool``), output parsing and the chat template's own rendering are
the ones the OpenAI routes use: ``tool_result`` blocks become ``tool`` messages, ``tool_use``
blocks an assistant's ``tool_calls``, ``thinking`` blocks its ``reasoning_content``.

Breakpoints (``cache_control`` on tools, system blocks, message blocks, or the top-level one on
the last block) name a place in Anthropic's order: tools, then system, then messages. A chat
template may render them in another order (tools inside the system turn, after its text), so the
prompt prefix a breakpoint caches is found by rendering: the conversation is rendered again with
every piece after the breakpoint altered, and the prefix the two prompts share is what depends
only on what comes up to the breakpoint.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from proxy.anthropic.schemas import (
    MAX_BREAKPOINTS,
    CacheControl,
    Conversation,
    MessagesRequest,
    RedactedThinkingBlock,
    TextBlock,
    ThinkingBlock,
    ToolResultBlock,
    ToolUseBlock,
)
from proxy.errors import InvalidRequest

BILLING_HEADER = "x-anthropic-billing-header:"
"""Claude Code puts a per-request nonce in a system block that starts with this."""

_MARK = "kvp_after_breakpoint_"
"""Prepended to every piece after a breakpoint when finding where the breakpoint's prefix ends
(letters and underscores: a valid start of a tool name too)."""
_NAME_ROOM = 64 - len(_MARK)

Position = tuple[int, int, int]
"""(section, index, block): section 0 tools, 1 system, 2 messages."""


@dataclass(frozen=True)
class Breakpoint:
    at: Position
    ttl: str
    ttl_s: int
    where: str
    """The field that set it (``tools.0``, ``system.1``, ``messages.3.content.0``, ``cache_control``)."""


def _places(conv: Conversation, keep_billing_header: bool) -> Iterator[tuple[Position, str, Any]]:
    """Every block that can carry ``cache_control``, in Anthropic's order."""
    for i, tool in enumerate(conv.tools or []):
        yield (0, i, 0), f"tools.{i}", tool
    for j, block in enumerate(conv.system_blocks()):
        if keep_billing_header or not is_billing_header(block):
            yield (1, j, 0), f"system.{j}", block
    for m, message in enumerate(conv.messages):
        for k, block in enumerate(message.blocks()):
            yield (2, m, k), f"messages.{m}.content.{k}", block


def is_billing_header(block: TextBlock) -> bool:
    return block.text.lstrip().startswith(BILLING_HEADER)


def breakpoints(conv: Conversation, *, keep_billing_header: bool = False) -> list[Breakpoint]:
    """The request's breakpoints in order, validated as Anthropic does (at most 4, the top-level
    one included; a 1h one never after a 5m one)."""
    found: list[Breakpoint] = []
    dropped: set[Position] = set()  # the billing-header block's: validated, then dropped with it
    last: tuple[Position, str] | None = None
    for at, where, block in _places(conv, keep_billing_header=True):
        control: CacheControl | None = getattr(block, "cache_control", None)
        if control is not None:
            found.append(Breakpoint(at, control.ttl, control.ttl_s, where))
        if at[0] == 1 and not keep_billing_header and is_billing_header(block):
            dropped.add(at)
        if at[0] == 2:
            last = (at, where)
    if conv.cache_control is not None and last is not None:
        # Automatic caching: the last cacheable block (a breakpoint there already is kept once).
        control = conv.cache_control
        if not found or found[-1].at != last[0]:
            found.append(Breakpoint(last[0], control.ttl, control.ttl_s, "cache_control"))
    if len(found) > MAX_BREAKPOINTS:
        raise InvalidRequest(
            f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided. Found {len(found)}.",
            param="cache_control",
        )
    seen_5m: Breakpoint | None = None
    for bp in found:
        if bp.ttl == "5m" and seen_5m is None:
            seen_5m = bp
        elif bp.ttl == "1h" and seen_5m is not None:
            raise InvalidRequest(
                f"{bp.where}.cache_control: a ttl='1h' cache_control block must not come after a "
                f"ttl='5m' cache_control block ({seen_5m.where}).",
                param=f"{bp.where}.cache_control",
            )
    return [bp for bp in found if bp.at not in dropped]


def chat_body(
    conv: Conversation, *, keep_billing_header: bool = False, alter_after: Position | None = None
) -> dict[str, Any]:
    """The internal chat request body (OpenAI shape) of ``conv``; ``alter_after``: every piece
    after that position is marked (see the module docstring)."""

    def text(at: Position, value: str) -> str:
        return _MARK + value if alter_after is not None and at > alter_after else value

    def name(at: Position, value: str) -> str:
        return _MARK + value[:_NAME_ROOM] if alter_after is not None and at > alter_after else value

    tools = []
    for at, _, tool in _places(conv, keep_billing_header):
        if at[0] != 0:
            continue
        function: dict[str, Any] = {"name": name(at, tool.name), "parameters": tool.input_schema}
        if tool.description is not None:
            function["description"] = text(at, tool.description)
        tools.append({"type": "function", "function": function})
    messages: list[dict[str, Any]] = []
    system = [text(at, b.text) for at, _, b in _places(conv, keep_billing_header) if at[0] == 1]
    if system:
        messages.append({"role": "system", "content": "\n".join(system)})
    for m, message in enumerate(conv.messages):
        blocks = list(enumerate(message.blocks()))
        if message.role == "assistant":
            messages.append(
                _assistant(blocks, lambda k, v, m=m: text((2, m, k), v), lambda k, v, m=m: name((2, m, k), v))
            )
        else:
            messages.extend(_user(blocks, lambda k, v, m=m: text((2, m, k), v)))
    body: dict[str, Any] = {"model": conv.model, "messages": messages}
    fmt = conv.json_format()
    if fmt is not None:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "output", "schema": fmt.schema_},
        }
    if conv.output_config is not None and conv.output_config.effort is not None:
        body["reasoning_effort"] = conv.output_config.effort
    if tools:
        body["tools"] = tools
        choice = conv.tool_choice
        if choice is not None:
            body["tool_choice"] = (
                {"type": "function", "function": {"name": choice.name}}
                if choice.type == "tool"
                else {"auto": "auto", "any": "required", "none": "none"}[choice.type]
            )
            if choice.disable_parallel_tool_use:
                body["parallel_tool_calls"] = False
    if isinstance(conv, MessagesRequest):
        body["max_tokens"] = conv.max_tokens
    return body


def _user(blocks: list[tuple[int, Any]], text: Any) -> list[dict[str, Any]]:
    """A user turn: each ``tool_result`` a ``tool`` message, runs of text a user message."""
    out: list[dict[str, Any]] = []
    pending: list[str] = []
    for k, block in blocks:
        if isinstance(block, ToolResultBlock):
            if pending:
                out.append({"role": "user", "content": "\n".join(pending)})
                pending = []
            content = block.text()
            if block.is_error:
                content = f"Error: {content}"
            out.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": text(k, content)})
        elif isinstance(block, TextBlock):
            pending.append(text(k, block.text))
        else:
            raise InvalidRequest(
                f"messages: a '{block.type}' block belongs in an assistant message.", param="messages"
            )
    if pending or not out:
        out.append({"role": "user", "content": "\n".join(pending)})
    return out


def _assistant(blocks: list[tuple[int, Any]], text: Any, name: Any) -> dict[str, Any]:
    content: list[str] = []
    reasoning: list[str] = []
    calls: list[dict[str, Any]] = []
    for k, block in blocks:
        if isinstance(block, TextBlock):
            content.append(text(k, block.text))
        elif isinstance(block, ThinkingBlock):
            reasoning.append(text(k, block.thinking))
        elif isinstance(block, ToolUseBlock):
            args = block.input
            if text(k, ""):  # altered: the call's name and arguments change too
                args = {_MARK: 0, **args}
            arguments = json.dumps(args, ensure_ascii=False)
            calls.append(
                {
                    "id": block.id,
                    "type": "function",
                    "function": {"name": name(k, block.name), "arguments": arguments},
                }
            )
        elif isinstance(block, RedactedThinkingBlock):
            continue  # opaque: no template can render it
        else:
            raise InvalidRequest(
                f"messages: a '{block.type}' block belongs in a user message.", param="messages"
            )
    item: dict[str, Any] = {"role": "assistant", "content": "\n".join(content) if content else None}
    if reasoning:
        item["reasoning_content"] = "\n".join(reasoning)
    if calls:
        item["tool_calls"] = calls
    if item["content"] is None and not calls and not reasoning:
        item["content"] = ""
    return item


def shared_prefix(a: Sequence[Any], b: Sequence[Any]) -> int:
    """How many leading items (tokens, characters) ``a`` and ``b`` share: a binary search over
    slice comparisons, which run in C (a Python loop over a 400k-character prompt takes ~30 ms)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
