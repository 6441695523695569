"""Reasoning: a leading ``<think>...</think>`` block split off before the tool stage."""

from __future__ import annotations

from model_runner.response_parsing.collector import Collector
from model_runner.response_parsing.stage import Stage, partial_marker_len


class ThinkSplit:
    """``<think>...</think>`` at the start of the reply (after whitespace) is reasoning; the rest
    goes to the tool stage. A prompt ending in an open ``<think>`` starts the reply inside it; one
    ending in ``</think>`` (thinking switched off) starts it after."""

    OPEN, CLOSE = "<think>", "</think>"

    def __init__(self, out: Collector, stage: Stage, prompt_text: str) -> None:
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
            keep = partial_marker_len(self._buf, self.CLOSE)
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
