"""Strict JSON reading for tool calls: top-level items with their raw text, call objects, and
where an object or array ends in a growing text."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_JSON = json.JSONDecoder(parse_constant=_reject_constant)
JSON_WS = " \t\n\r"


@dataclass(frozen=True)
class Call:
    name: str
    arguments: str
    id: str | None


def skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in JSON_WS:
        i += 1
    return i


def json_items(text: str, kind: str) -> list[tuple[str | None, Any, str]] | None:
    """The top-level items of ``text`` when it is exactly one JSON object (``kind`` "{") or array
    ("[") with optional whitespace around: (key or None, value, the value's raw text) each; else None."""
    close = "}" if kind == "{" else "]"
    i = skip_ws(text, 0)
    if not text.startswith(kind, i):
        return None
    i = skip_ws(text, i + 1)
    items: list[tuple[str | None, Any, str]] = []
    try:
        if text.startswith(close, i):
            i += 1
        else:
            while True:
                key = None
                if kind == "{":
                    key, i = _JSON.raw_decode(text, i)
                    i = skip_ws(text, i)
                    if not isinstance(key, str) or not text.startswith(":", i):
                        return None
                    i = skip_ws(text, i + 1)
                start = i
                value, i = _JSON.raw_decode(text, i)
                items.append((key, value, text[start:i]))
                i = skip_ws(text, i)
                if text.startswith(close, i):
                    i += 1
                    break
                if not text.startswith(",", i):
                    return None
                i = skip_ws(text, i + 1)
    except ValueError:
        return None
    return items if skip_ws(text, i) == len(text) else None


def arguments_text(value: Any, raw: str) -> str | None:
    """A call's arguments as JSON object text: the raw text of an object, or a string holding one."""
    if isinstance(value, dict):
        return raw
    if isinstance(value, str):
        try:
            return value if isinstance(_JSON.decode(value), dict) else None
        except ValueError:
            return None
    return None


def call_from_object(text: str, *, arguments_required: bool) -> Call | None:
    """``{"name": ..., "arguments" | "parameters": {...}, "id"?: ...}`` as a call, else None."""
    items = json_items(text, "{")
    if items is None:
        return None
    members = {key: (value, raw) for key, value, raw in items}
    name = members.get("name", (None, ""))[0]
    if not isinstance(name, str) or not name:
        return None
    found = members.get("arguments", members.get("parameters"))
    if found is None and arguments_required:
        return None
    arguments = "{}" if found is None else arguments_text(*found)
    if arguments is None:
        return None
    call_id = members.get("id", (None, ""))[0]
    return Call(name, arguments, call_id if isinstance(call_id, str) and call_id else None)


def call_list(text: str) -> list[Call] | None:
    """One call object, or a non-empty array of them (all valid), as calls; else None."""
    if text.lstrip().startswith("{"):
        call = call_from_object(text, arguments_required=False)
        return None if call is None else [call]
    calls = []
    for _, _, raw in json_items(text, "[") or ():
        call = call_from_object(raw, arguments_required=False)
        if call is None:
            return None
        calls.append(call)
    return calls or None


class JsonExtent:
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
