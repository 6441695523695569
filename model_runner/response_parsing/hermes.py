"""Hermes / Qwen tool calls: ``<tool_call>...</tool_call>`` tags around JSON call objects."""

from __future__ import annotations

from model_runner.response_parsing.collector import Collector
from model_runner.response_parsing.json_calls import call_list
from model_runner.response_parsing.stage import partial_marker_len


class TaggedCalls:
    """Hermes / Qwen: zero or more ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
    text around them is content. A body that is not such an object stays content, tags included."""

    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self, out: Collector) -> None:
        self._out = out
        self._buf = ""
        self._in_call = False

    def feed(self, text: str) -> None:
        self._buf += text
        while True:
            if not self._in_call:
                i = self._buf.find(self.OPEN)
                if i < 0:
                    keep = partial_marker_len(self._buf, self.OPEN)
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
        calls = call_list(body)
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
