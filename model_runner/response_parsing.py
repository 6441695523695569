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

import copy
import dataclasses
import json
import random
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol

import regex
from transformers.utils.chat_parsing import ResponseParser
from transformers.utils.chat_parsing.response_templates import load_response_template

# -- public records ------------------------------------------------------------------------------


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


# -- choosing a parser ---------------------------------------------------------------------------

TOOL_FORMATS = ("hermes", "llama3", "mistral", "transformers")
_REASONING_FIELDS = frozenset({"reasoning_content", "reasoning", "thinking"})
_TOOL_FIELDS = frozenset({"tool_calls"})
_CONTENT_FIELD = "content"


@dataclass(frozen=True)
class ParserSpec:
    """How the served model writes tool calls and reasoning; ``new`` builds a parser per choice."""

    tool_format: str | None = None
    """"hermes" | "llama3" | "mistral" | "transformers" | None (no tool parsing)."""
    reasoning: bool = False
    response_template: Mapping[str, Any] | None = dataclasses.field(default=None, hash=False)
    """transformers' ``response_template`` spec; required by (and only for) "transformers"."""

    def __post_init__(self) -> None:
        if self.tool_format is not None and self.tool_format not in TOOL_FORMATS:
            raise ValueError(f"unknown tool_format {self.tool_format!r}; expected one of {TOOL_FORMATS}")
        if (self.tool_format == "transformers") != (self.response_template is not None):
            raise ValueError('a response_template goes with tool_format "transformers", and only with it')

    def new(
        self,
        *,
        prompt_text: str,
        tools: list[dict] | None,
        parse_tools: bool,
        rng: random.Random | None = None,
    ) -> OutputParser:
        """A parser for one reply to ``prompt_text`` (whose tail may open ``<think>``). With
        ``parse_tools`` False, tool-call markup stays content. ``rng`` makes call ids reproducible."""
        out = _Collector(rng if rng is not None else random.Random())
        if self.response_template is not None:
            return _TemplateParser(
                self.response_template, out, prompt_text=prompt_text, tools=tools, parse_tools=parse_tools
            )
        stage_type = _STAGES.get(self.tool_format) if parse_tools else None
        stage = stage_type(out) if stage_type is not None else _PlainStage(out)
        split = _ThinkSplit(out, stage, prompt_text) if self.reasoning else None
        return _TextParser(out, stage, split)


def parser_spec_for(tokenizer: Any) -> ParserSpec:
    """The spec for a tokenizer: its ``response_template`` (validated here, so a broken one fails at
    startup) when it has one, else what its chat template's source text shows."""
    template = getattr(tokenizer, "response_template", None)
    if template is not None:
        spec = load_response_template(template)
        return ParserSpec("transformers", bool(_REASONING_FIELDS & set(spec.fields)), template)
    source = getattr(tokenizer, "chat_template", None)
    if isinstance(source, Mapping):  # named templates ("default", "tool_use"): any may hold the syntax
        source = "\n".join(str(s) for s in source.values())
    return spec_from_chat_template(source or "")


def spec_from_chat_template(source: str) -> ParserSpec:
    """The spec a chat template's Jinja source implies (see the module docstring)."""
    reasoning = "<think>" in source or "</think>" in source
    if "<tool_call>" in source:
        return ParserSpec("hermes", reasoning)
    if "[TOOL_CALLS]" in source:
        return ParserSpec("mistral", reasoning)
    if '"parameters"' in source and ("ipython" in source or "<|start_header_id|>" in source):
        return ParserSpec("llama3", reasoning)
    return ParserSpec(None, reasoning)


# -- assembling the message ----------------------------------------------------------------------

_ALNUM = string.ascii_letters + string.digits


class _Channel:
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


class _Collector:
    """Where stages put text and calls: it records the events and the message they add up to."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._events: list[ParseEvent] = []
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self._calls: list[ParsedToolCall] = []
        self.content = _Channel(self._emit_content)
        self.reasoning = _Channel(self._emit_reasoning)

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


# -- JSON helpers --------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_JSON = json.JSONDecoder(parse_constant=_reject_constant)
_WS = " \t\n\r"


@dataclass(frozen=True)
class _Call:
    name: str
    arguments: str
    id: str | None


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _items(text: str, kind: str) -> list[tuple[str | None, Any, str]] | None:
    """The top-level items of ``text`` when it is exactly one JSON object (``kind`` "{") or array
    ("[") with optional whitespace around: (key or None, value, the value's raw text) each; else None."""
    close = "}" if kind == "{" else "]"
    i = _skip_ws(text, 0)
    if not text.startswith(kind, i):
        return None
    i = _skip_ws(text, i + 1)
    items: list[tuple[str | None, Any, str]] = []
    try:
        if text.startswith(close, i):
            i += 1
        else:
            while True:
                key = None
                if kind == "{":
                    key, i = _JSON.raw_decode(text, i)
                    i = _skip_ws(text, i)
                    if not isinstance(key, str) or not text.startswith(":", i):
                        return None
                    i = _skip_ws(text, i + 1)
                start = i
                value, i = _JSON.raw_decode(text, i)
                items.append((key, value, text[start:i]))
                i = _skip_ws(text, i)
                if text.startswith(close, i):
                    i += 1
                    break
                if not text.startswith(",", i):
                    return None
                i = _skip_ws(text, i + 1)
    except ValueError:
        return None
    return items if _skip_ws(text, i) == len(text) else None


def _arguments_text(value: Any, raw: str) -> str | None:
    """A call's arguments as JSON object text: the raw text of an object, or a string holding one."""
    if isinstance(value, dict):
        return raw
    if isinstance(value, str):
        try:
            return value if isinstance(_JSON.decode(value), dict) else None
        except ValueError:
            return None
    return None


def _call_from_object(text: str, *, arguments_required: bool) -> _Call | None:
    """``{"name": ..., "arguments" | "parameters": {...}, "id"?: ...}`` as a call, else None."""
    items = _items(text, "{")
    if items is None:
        return None
    members = {key: (value, raw) for key, value, raw in items}
    name = members.get("name", (None, ""))[0]
    if not isinstance(name, str) or not name:
        return None
    found = members.get("arguments", members.get("parameters"))
    if found is None and arguments_required:
        return None
    arguments = "{}" if found is None else _arguments_text(*found)
    if arguments is None:
        return None
    call_id = members.get("id", (None, ""))[0]
    return _Call(name, arguments, call_id if isinstance(call_id, str) and call_id else None)


def _call_list(text: str) -> list[_Call] | None:
    """One call object, or a non-empty array of them (all valid), as calls; else None."""
    if text.lstrip().startswith("{"):
        call = _call_from_object(text, arguments_required=False)
        return None if call is None else [call]
    calls = []
    for _, _, raw in _items(text, "[") or ():
        call = _call_from_object(raw, arguments_required=False)
        if call is None:
            return None
        calls.append(call)
    return calls or None


class _JsonExtent:
    """Finds, incrementally, where the JSON object or array that starts at ``start`` ends."""

    def __init__(self, start: int) -> None:
        self.start = start
        self._scanned = start
        self._depth = 0
        self._in_string = False
        self._escaped = False

    def end(self, text: str) -> int | None:
        """The index just past the value's closing bracket, or None while it is still open."""
        for i in range(self._scanned, len(text)):
            c = text[i]
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif c == "\\":
                    self._escaped = True
                elif c == '"':
                    self._in_string = False
            elif c == '"':
                self._in_string = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self._scanned = i + 1
                    return i + 1
        self._scanned = len(text)
        return None


def _partial_marker_len(text: str, marker: str) -> int:
    """The length of the longest end of ``text`` that is a proper beginning of ``marker``."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


# -- tool-call stages: text after any reasoning --------------------------------------------------


class _Stage(Protocol):
    def feed(self, text: str) -> None: ...

    def finish(self) -> None: ...


class _PlainStage:
    """No tool parsing: everything is content."""

    def __init__(self, out: _Collector) -> None:
        self._out = out

    def feed(self, text: str) -> None:
        self._out.content.push(text)

    def finish(self) -> None:
        pass


class _TaggedCalls:
    """Hermes / Qwen: zero or more ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
    text around them is content. A body that is not such an object stays content, tags included."""

    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self, out: _Collector) -> None:
        self._out = out
        self._buf = ""
        self._in_call = False

    def feed(self, text: str) -> None:
        self._buf += text
        while True:
            if not self._in_call:
                i = self._buf.find(self.OPEN)
                if i < 0:
                    keep = _partial_marker_len(self._buf, self.OPEN)
                    self._out.content.push(self._buf[: len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep :]
                    return
                self._out.content.push(self._buf[:i])
                self._buf, self._in_call = self._buf[i + len(self.OPEN) :], True
            else:
                j = self._buf.find(self.CLOSE)
                if j < 0:
                    return
                self._close(self._buf[:j], self.CLOSE)
                self._buf, self._in_call = self._buf[j + len(self.CLOSE) :], False

    def _close(self, body: str, close: str) -> None:
        calls = _call_list(body)
        if calls is None:
            self._out.content.push(self.OPEN + body + close)
        for call in calls or ():
            self._out.call(call.name, call.arguments, call.id)

    def finish(self) -> None:
        if self._in_call:  # no closing tag: a complete object is still a call, a cut-off one is not
            self._close(self._buf, "")
        else:
            self._out.content.push(self._buf)
        self._buf, self._in_call = "", False


_MISTRAL_HEAD = regex.compile(r"\s*([A-Za-z0-9_.\-]+)(?:\[CALL_ID\]([A-Za-z0-9]+))?\[ARGS\]")


class _MarkedCalls:
    """Mistral: content, then ``[TOOL_CALLS]`` and a JSON array of calls (or one call object), or,
    in newer tokenizers, ``[TOOL_CALLS]name[CALL_ID]id[ARGS]{...}`` per call."""

    MARK = "[TOOL_CALLS]"

    def __init__(self, out: _Collector) -> None:
        self._out = out
        self._buf = ""
        self._in_calls = False
        self._extent: _JsonExtent | None = None
        self._head: tuple[str, str | None] | None = None

    def feed(self, text: str) -> None:
        self._buf += text
        while self._step():
            pass

    def _step(self) -> bool:
        """Consume what can be decided; True when there may be more to decide."""
        if not self._in_calls:
            i = self._buf.find(self.MARK)
            if i < 0:
                keep = _partial_marker_len(self._buf, self.MARK)
                self._out.content.push(self._buf[: len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep :]
                return False
            self._out.content.push(self._buf[:i])
            self._buf, self._in_calls = self._buf[i + len(self.MARK) :], True
            return True
        if self._extent is None:
            start = _skip_ws(self._buf, 0)
            if start == len(self._buf):
                return False
            if self._buf[start] not in "[{":
                head = _MISTRAL_HEAD.match(self._buf, partial=True)
                if head is not None and head.partial:
                    return False
                if head is None:
                    return self._reject(0)
                start = _skip_ws(self._buf, head.end())
                if start == len(self._buf):
                    return False
                if self._buf[start] != "{":
                    return self._reject(0)
                self._head = (head[1], head[2])
            self._extent = _JsonExtent(start)
        end = self._extent.end(self._buf)
        if end is None:
            return False
        calls = self._calls(self._buf[self._extent.start : end])
        if calls is None:
            return self._reject(end)
        for call in calls:
            self._out.call(call.name, call.arguments, call.id)
        self._buf = self._buf[end:]
        self._in_calls, self._extent, self._head = False, None, None
        return True

    def _calls(self, text: str) -> list[_Call] | None:
        if self._head is not None:
            items = _items(text, "{")
            return None if items is None else [_Call(self._head[0], text, self._head[1])]
        return _call_list(text)

    def _reject(self, end: int) -> bool:
        """The text after the mark up to ``end`` is no call: it and the mark are content."""
        self._out.content.push(self.MARK + self._buf[:end])
        self._buf = self._buf[end:]
        self._in_calls, self._extent, self._head = False, None, None
        return True

    def finish(self) -> None:
        if self._in_calls:
            self._out.content.push(self.MARK)
        self._out.content.push(self._buf)
        self._buf, self._in_calls, self._extent, self._head = "", False, None, None


class _WholeReplyCalls:
    """Llama 3: the whole reply is ``{"name": ..., "parameters": {...}}`` objects (optionally after
    ``<|python_tag|>``), separated by ";" or whitespace. Such a reply is held and committed at the
    end; as soon as it cannot be one, it is content exactly as generated."""

    TAG = "<|python_tag|>"

    def __init__(self, out: _Collector) -> None:
        self._out = out
        self._buf = ""
        self._state = "start"  # "start" | "calls" | "content"
        self._pos = 0
        self._extent: _JsonExtent | None = None
        self._calls: list[_Call] = []

    def feed(self, text: str) -> None:
        if self._state == "content":
            self._out.content.push(text)
            return
        self._buf += text
        if self._state == "start":
            i = _skip_ws(self._buf, 0)
            if self._buf.startswith(self.TAG, i):
                i = _skip_ws(self._buf, i + len(self.TAG))
            elif self.TAG.startswith(self._buf[i:]):
                return  # nothing but whitespace and perhaps the tag's beginning yet
            if i == len(self._buf):
                return
            if self._buf[i] != "{":
                return self._to_content()
            self._state, self._pos = "calls", i
        while self._pos < len(self._buf):
            if self._extent is None:
                c = self._buf[self._pos]
                if c == "{":
                    self._extent = _JsonExtent(self._pos)
                elif c in _WS or c == ";":
                    self._pos += 1
                    continue
                else:
                    return self._to_content()
            end = self._extent.end(self._buf)
            if end is None:
                return
            call = _call_from_object(self._buf[self._extent.start : end], arguments_required=True)
            if call is None:
                return self._to_content()
            self._calls.append(call)
            self._extent, self._pos = None, end

    def _to_content(self) -> None:
        self._state = "content"
        self._out.content.push(self._buf)
        self._buf, self._calls, self._extent = "", [], None

    def finish(self) -> None:
        if self._state != "calls" or self._extent is not None or not self._calls:
            self._out.content.push(self._buf)
        else:
            for call in self._calls:
                self._out.call(call.name, call.arguments, call.id)
        self._buf, self._calls, self._extent, self._state = "", [], None, "content"


_STAGES: Mapping[str, Callable[[_Collector], _Stage]] = MappingProxyType(
    {"hermes": _TaggedCalls, "llama3": _WholeReplyCalls, "mistral": _MarkedCalls}
)


# -- reasoning -----------------------------------------------------------------------------------


class _ThinkSplit:
    """``<think>...</think>`` at the start of the reply (after whitespace) is reasoning; the rest
    goes to the tool stage. A prompt ending in an open ``<think>`` starts the reply inside it; one
    ending in ``</think>`` (thinking switched off) starts it after."""

    OPEN, CLOSE = "<think>", "</think>"

    def __init__(self, out: _Collector, stage: _Stage, prompt_text: str) -> None:
        self._out = out
        self._stage = stage
        self._buf = ""
        tail = prompt_text.rstrip()
        self._state = "start"  # "start" | "think" | "body"
        if tail.endswith(self.OPEN):
            self._state = "think"
            out.reasoning.marker()
        elif tail.endswith(self.CLOSE):
            self._state = "body"
            out.content.marker()

    def feed(self, text: str) -> None:
        if self._state == "body":
            self._stage.feed(text)
            return
        self._buf += text
        if self._state == "start":
            rest = self._buf.lstrip()
            if not rest or (self.OPEN.startswith(rest) and rest != self.OPEN):
                return
            if not rest.startswith(self.OPEN):
                self._state, text, self._buf = "body", self._buf, ""
                self._stage.feed(text)
                return
            self._state, self._buf = "think", rest[len(self.OPEN) :]
            self._out.reasoning.marker()
        j = self._buf.find(self.CLOSE)
        if j < 0:
            keep = _partial_marker_len(self._buf, self.CLOSE)
            self._out.reasoning.push(self._buf[: len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep :]
            return
        self._out.reasoning.push(self._buf[:j])
        self._out.reasoning.marker()
        self._out.content.marker()
        self._state, text, self._buf = "body", self._buf[j + len(self.CLOSE) :], ""
        self._stage.feed(text)

    def finish(self) -> None:
        if self._state == "think":
            self._out.reasoning.push(self._buf)
        elif self._state == "start":
            self._stage.feed(self._buf)
        self._buf, self._state = "", "body"


class _TextParser:
    """Our parsers: an optional reasoning split in front of a tool stage."""

    def __init__(self, out: _Collector, stage: _Stage, split: _ThinkSplit | None) -> None:
        self._out = out
        self._stage = stage
        self._split = split
        self._finished = False

    def feed(self, text: str) -> list[ParseEvent]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        (self._split or self._stage).feed(text)
        return self._out.drain()

    def finish(self) -> tuple[ParsedMessage, list[ParseEvent]]:
        if self._finished:
            raise RuntimeError("finish() called twice")
        self._finished = True
        if self._split is not None:
            self._split.finish()
        self._stage.finish()
        self._out.flush()
        return self._out.message(), self._out.drain()


# -- transformers' response_template -------------------------------------------------------------

_TEMPLATE_ERRORS = (ValueError, KeyError, TypeError)
"""What transformers' parser raises when a region's text does not parse (bad JSON in a call)."""


def _calls_from_value(value: Any) -> list[_Call] | None:
    """A tool_calls region's parsed value (one call or a list; OpenAI-shaped or bare) as calls."""
    calls = []
    for item in value if isinstance(value, list) else [value]:
        if not isinstance(item, dict):
            return None
        fn = item.get("function", item)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            return None
        arguments = fn.get("arguments", fn.get("parameters", {}))
        if isinstance(arguments, dict):
            text = json.dumps(arguments, ensure_ascii=False)
        else:
            text = _arguments_text(arguments, "")
            if text is None:
                return None
        call_id = item.get("id")
        calls.append(_Call(fn["name"], text, call_id if isinstance(call_id, str) and call_id else None))
    return calls or None


class _TemplateParser:
    """transformers' ``ResponseParser`` mapped onto our events. It is fed one character at a time,
    so its behaviour (and where a bad region fails) does not depend on how the text is split. We
    mirror its buffer to know each region's raw text: a region that fails to parse, or a call that
    is no call, becomes that text as content, and parsing goes on with a fresh parser."""

    def __init__(
        self,
        template: Mapping[str, Any],
        out: _Collector,
        *,
        prompt_text: str,
        tools: list[dict] | None,
        parse_tools: bool,
    ) -> None:
        relaxed = copy.deepcopy(dict(template))
        for field in relaxed.get("fields", {}).values():
            field["optional"] = True  # we build the message from events; a missing field is fine
        self._template = relaxed
        self._spec = load_response_template(relaxed)
        self._tools = tools
        self._parse_tools = parse_tools
        self._out = out
        self._finished = False
        self._restart(prompt_text)

    def _restart(self, prefix: str) -> None:
        self._parser = ResponseParser(self._template, prefix=prefix, tools=self._tools)
        self._text = self._spec.truncate_past_last_anchor(prefix) if prefix else ""
        self._reply_start = len(self._text)  # the mirror holds the prompt's tail, then the reply
        self._consumed = 0
        self._region: tuple[str, int, int] | None = None  # field, raw start, body start
        self._live = False  # the prompt's own regions set state but emit nothing
        self._handle(self._parser.initial_events, len(self._text))
        self._live = True

    def feed(self, text: str) -> list[ParseEvent]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        base = len(self._text)
        self._text += text  # the mirror runs ahead; searches stop at the character being fed
        for i, ch in enumerate(text):
            end = base + i + 1
            try:
                events = self._parser.feed(ch)
            except _TEMPLATE_ERRORS:
                self._fail(end)
                self._text, base = text[i + 1 :], -(i + 1)
                continue
            self._handle(events, end)
        return self._out.drain()

    def finish(self) -> tuple[ParsedMessage, list[ParseEvent]]:
        if self._finished:
            raise RuntimeError("finish() called twice")
        self._finished = True
        try:
            _, events = self._parser.finalize()
        except _TEMPLATE_ERRORS:
            self._fail(len(self._text))
        else:
            self._handle(events, len(self._text))
        self._out.flush()
        return self._out.message(), self._out.drain()

    def _fail(self, end: int) -> None:
        """The region being closed at ``end`` did not parse: its raw text is content, and a fresh
        parser (in the state a closed region leaves) takes the text after it."""
        start = self._region[1] if self._region is not None else self._consumed
        self._out.content.push(self._text[max(start, self._reply_start) : end])
        self._restart("")

    def _handle(self, events: list[dict], end: int) -> None:
        for event in events:
            field = event["field"]
            if event["type"] == "region_open":
                if self._open(field, end) and field not in _TOOL_FIELDS:
                    self._marker(field)
            elif event["type"] == "region_chunk":
                if field == _CONTENT_FIELD and self._live:
                    self._out.content.push(event["text"])
                elif field in _REASONING_FIELDS and self._live:
                    self._out.reasoning.push(event["text"])
            else:
                raw_start, delimited = self._close(field, end)
                if field in _TOOL_FIELDS:
                    if self._live:
                        self._tool_region(event["value"], self._text[max(raw_start, self._reply_start) : end])
                elif delimited:
                    self._marker(field)

    def _marker(self, field: str) -> None:
        """A delimiter was cut out of the text: whitespace next to it goes (see ``_Channel``)."""
        self._out.content.marker()
        if field in _REASONING_FIELDS:
            self._out.reasoning.marker()

    def _open(self, field: str, end: int) -> bool:
        """Track the opening region; True when an open delimiter was matched (not the implicit region)."""
        spec = self._spec.fields[field]
        found = spec.open_re.search(self._text, self._consumed, end) if spec.open_re is not None else None
        if found is None:  # the implicit region: it opens with its first character
            self._region = (field, self._consumed, self._consumed)
            return False
        self._region = (field, found.start(), found.end())
        return True

    def _close(self, field: str, end: int) -> tuple[int, bool]:
        """Advance past the closing region: where its raw text starts, and whether a close delimiter
        ended it (else the end of the text did, or, for the implicit region, another region's open)."""
        spec = self._spec.fields[field]
        start, body = (self._region[1], self._region[2]) if self._region else (self._consumed,) * 2
        self._region = None
        found = spec.close_re.search(self._text, body, end) if spec.close_re is not None else None
        if found is not None:
            self._consumed = found.end()
        elif spec.open_re is not None:
            self._consumed = end
        return start, found is not None

    def _tool_region(self, value: Any, raw: str) -> None:
        calls = _calls_from_value(value) if self._parse_tools else None
        if calls is None:
            self._out.content.push(raw)
            return
        for call in calls:
            self._out.call(call.name, call.arguments, call.id)
