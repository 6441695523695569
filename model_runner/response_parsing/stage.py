"""The tool-call stage interface (text after any reasoning), the plain stage, and marker helpers."""

from __future__ import annotations

from typing import Protocol

from model_runner.response_parsing.collector import Collector


def partial_marker_len(text: str, marker: str) -> int:
    """The length of the longest end of ``text`` that is a proper beginning of ``marker``."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class Stage(Protocol):
    def feed(self, text: str) -> None: ...

    def finish(self) -> None: ...


class PlainStage:
    """No tool parsing: everything is content."""

    def __init__(self, out: Collector) -> None:
        self._out = out

    def feed(self, text: str) -> None:
        self._out.content.push(text)

    def finish(self) -> None:
        pass
