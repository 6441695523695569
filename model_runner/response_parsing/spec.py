"""Choosing a parser: a ``ParserSpec`` per served model, from its tokenizer or chat template."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from transformers.utils.chat_parsing.response_templates import load_response_template

from model_runner.response_parsing.collector import Collector
from model_runner.response_parsing.hermes import TaggedCalls
from model_runner.response_parsing.llama3 import WholeReplyCalls
from model_runner.response_parsing.mistral import MarkedCalls
from model_runner.response_parsing.reasoning import ThinkSplit
from model_runner.response_parsing.records import OutputParser
from model_runner.response_parsing.stage import PlainStage, Stage
from model_runner.response_parsing.text_parser import TextParser
from model_runner.response_parsing.transformers_adapter import REASONING_FIELDS, TemplateParser

TOOL_FORMATS = ("hermes", "llama3", "mistral", "transformers")

_STAGES: Mapping[str, Callable[[Collector], Stage]] = MappingProxyType(
    {"hermes": TaggedCalls, "llama3": WholeReplyCalls, "mistral": MarkedCalls}
)


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
        out = Collector(rng if rng is not None else random.Random())
        if self.response_template is not None:
            return TemplateParser(
                self.response_template, out, prompt_text=prompt_text, tools=tools, parse_tools=parse_tools
            )
        stage_type = _STAGES.get(self.tool_format) if parse_tools else None
        stage = stage_type(out) if stage_type is not None else PlainStage(out)
        split = ThinkSplit(out, stage, prompt_text) if self.reasoning else None
        return TextParser(out, stage, split)


def parser_spec_for(tokenizer: Any) -> ParserSpec:
    """The spec for a tokenizer: its ``response_template`` (validated here, so a broken one fails at
    startup) when it has one, else what its chat template's source text shows."""
    template = getattr(tokenizer, "response_template", None)
    if template is not None:
        spec = load_response_template(template)
        return ParserSpec("transformers", bool(REASONING_FIELDS & set(spec.fields)), template)
    source = getattr(tokenizer, "chat_template", None)
    if isinstance(source, Mapping):  # named templates ("default", "tool_use"): any may hold the syntax
        source = "\n".join(str(s) for s in source.values())
    return spec_from_chat_template(source or "")


def spec_from_chat_template(source: str) -> ParserSpec:
    """The spec a chat template's Jinja source implies (see the package docstring)."""
    reasoning = "<think>" in source or "</think>" in source
    if "<tool_call>" in source:
        return ParserSpec("hermes", reasoning)
    if "[TOOL_CALLS]" in source:
        return ParserSpec("mistral", reasoning)
    if '"parameters"' in source and ("ipython" in source or "<|start_header_id|>" in source):
        return ParserSpec("llama3", reasoning)
    return ParserSpec(None, reasoning)
