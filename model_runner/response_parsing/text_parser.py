"""Our ``OutputParser``: an optional reasoning split in front of a tool stage."""

from __future__ import annotations

from model_runner.response_parsing.collector import Collector
from model_runner.response_parsing.reasoning import ThinkSplit
from model_runner.response_parsing.records import ParsedMessage, ParseEvent
from model_runner.response_parsing.stage import Stage


class TextParser:
    """Our parsers: an optional reasoning split in front of a tool stage."""

    def __init__(self, out: Collector, stage: Stage, split: ThinkSplit | None) -> None:
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
