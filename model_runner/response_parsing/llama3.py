"""Llama 3 tool calls: the whole reply is JSON call objects, optionally after ``<|python_tag|>``."""

from __future__ import annotations

from model_runner.response_parsing.collector import Collector
from model_runner.response_parsing.json_calls import JSON_WS, Call, JsonExtent, call_from_object, skip_ws


class WholeReplyCalls:
    """Llama 3: the whole reply is ``{"name": ..., "parameters": {...}}`` objects (optionally after
    ``<|python_tag|>``), separated by ";" or whitespace. Such a reply is held and committed at the
    end; as soon as it cannot be one, it is content exactly as generated."""

    TAG = "<|python_tag|>"

    def __init__(self, out: Collector) -> None:
        self._out = out
        self._buf = ""
        self._state = "start"  # "start" | "calls" | "content"
        self._pos = 0
        self._extent: JsonExtent | None = None
        self._calls: list[Call] = []

    def feed(self, text: str) -> None:
        if self._state == "content":
            self._out.content.push(text)
            return
        self._buf += text
        if self._state == "start":
            i = skip_ws(self._buf, 0)
            if self._buf.startswith(self.TAG, i):
                i = skip_ws(self._buf, i + len(self.TAG))
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
                    self._extent = JsonExtent(self._pos)
                elif c in JSON_WS or c == ";":
                    self._pos += 1
                    continue
                else:
                    return self._to_content()
            end = self._extent.end(self._buf)
            if end is None:
                return
            call = call_from_object(self._buf[self._extent.start : end], arguments_required=True)
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
