"""transformers' ``ResponseParser`` (a tokenizer's ``response_template``) mapped onto our events."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

from transformers.utils.chat_parsing import ResponseParser
from transformers.utils.chat_parsing.response_templates import load_response_template

from model_runner.response_parsing.collector import Collector
from model_runner.response_parsing.json_calls import Call, arguments_text
from model_runner.response_parsing.records import ParsedMessage, ParseEvent

REASONING_FIELDS = frozenset({"reasoning_content", "reasoning", "thinking"})
_TOOL_FIELDS = frozenset({"tool_calls"})
_CONTENT_FIELD = "content"

_TEMPLATE_ERRORS = (ValueError, KeyError, TypeError)
"""What transformers' parser raises when a region's text does not parse (bad JSON in a call)."""


def _calls_from_value(value: Any) -> list[Call] | None:
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
            text = arguments_text(arguments, "")
            if text is None:
                return None
        call_id = item.get("id")
        calls.append(Call(fn["name"], text, call_id if isinstance(call_id, str) and call_id else None))
    return calls or None


class TemplateParser:
    """transformers' ``ResponseParser`` mapped onto our events. It is fed one character at a time,
    so its behaviour (and where a bad region fails) does not depend on how the text is split. We
    mirror its buffer to know each region's raw text: a region that fails to parse, or a call that
    is no call, becomes that text as content, and parsing goes on with a fresh parser."""

    def __init__(
        self,
        template: Mapping[str, Any],
        out: Collector,
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
                elif field in REASONING_FIELDS and self._live:
                    self._out.reasoning.push(event["text"])
            else:
                raw_start, delimited = self._close(field, end)
                if field in _TOOL_FIELDS:
                    if self._live:
                        self._tool_region(event["value"], self._text[max(raw_start, self._reply_start) : end])
                elif delimited:
                    self._marker(field)

    def _marker(self, field: str) -> None:
        """A delimiter was cut out of the text: whitespace next to it goes (see ``Channel``)."""
        self._out.content.marker()
        if field in REASONING_FIELDS:
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
