"""Reading a generated reply back as an assistant message: content, reasoning and tool calls.

A ``ParserSpec`` is chosen once per served model (``parser_spec_for``): transformers' own
``ResponseParser`` when the tokenizer ships a ``response_template``, else one of our parsers for
the common formats, recognised from the chat template's source text (Hermes/Qwen ``<tool_call>``
tags, Llama 3 whole-reply JSON, Mistral ``[TOOL_CALLS]``; ``<think>`` reasoning on top of any).

Each choice of a request gets a fresh ``OutputParser`` that takes the detokenized text deltas and
emits ``ParseEvent``s. A tool call is emitted whole (its ``ToolCallStart`` and one
``ToolCallArguments``) once its text is complete and valid, so a stream never announces a call
that the final message then lacks; text that fails to be a call is content, markers included.
Whitespace next to a recognised marker (``<think>``, a call) is dropped; text with no markup is
content exactly as generated. The events are the same whatever way the text is split into feeds.
"""

from __future__ import annotations

from model_runner.response_parsing.records import (
    ContentDelta,
    OutputParser,
    ParsedMessage,
    ParsedToolCall,
    ParseEvent,
    ReasoningDelta,
    ToolCallArguments,
    ToolCallStart,
)
from model_runner.response_parsing.spec import (
    TOOL_FORMATS,
    ParserSpec,
    parser_spec_for,
    spec_from_chat_template,
)

__all__ = [
    "TOOL_FORMATS",
    "ContentDelta",
    "OutputParser",
    "ParseEvent",
    "ParsedMessage",
    "ParsedToolCall",
    "ParserSpec",
    "ReasoningDelta",
    "ToolCallArguments",
    "ToolCallStart",
    "parser_spec_for",
    "spec_from_chat_template",
]
