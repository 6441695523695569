"""Mistral tool calls: ``[TOOL_CALLS]`` followed by JSON calls or ``name[CALL_ID]id[ARGS]{...}``."""

from __future__ import annotations

import regex

from model_runner.response_parsing.collector import Collector
from model_runner.response_parsing.json_calls import Call, JsonExtent, call_list, json_items, skip_ws
from model_runner.response_parsing.stage import partial_marker_len

_MISTRAL_HEAD = regex.compile(r"\s*([A-Za-z0-9_.\-]+)(?:\[CALL_ID\]([A-Za-z0-9]+))?\[ARGS\]")


class MarkedCalls:
    """Mistral: content, then ``[TOOL_CALLS]`` and a JSON array of calls (or one call object), or,
    in newer tokenizers, ``[TOOL_CALLS]name[CALL_ID]id[ARGS]{...}`` per call."""

    MARK = "[TOOL_CALLS]"

    def __init__(self, out: Collector) -> None:
        self._out = out
        self._buf = ""
        self._in_calls = False
        self._extent: JsonExtent | None = None
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
                keep = partial_marker_len(self._buf, self.MARK)
                self._out.content.push(self._buf[: len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep :]
                return False
            self._out.content.push(self._buf[:i])
            self._buf, self._in_calls = self._buf[i + len(self.MARK) :], True
            return True
        if self._extent is None:
            start = skip_ws(self._buf, 0)
            if start == len(self._buf):
                return False
            if self._buf[start] not in "[{":
                head = _MISTRAL_HEAD.match(self._buf, partial=True)
                if head is not None and head.partial:
                    return False
                if head is None:
                    return self._reject(0)
                start = skip_ws(self._buf, head.end())
                if start == len(self._buf):
                    return False
                if self._buf[start] != "{":
                    return self._reject(0)
                self._head = (head[1], head[2])
            self._extent = JsonExtent(start)
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

    def _calls(self, text: str) -> list[Call] | None:
        if self._head is not None:
            items = json_items(text, "{")
            return None if items is None else [Call(self._head[0], text, self._head[1])]
        return call_list(text)

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
