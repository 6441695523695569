"""From a validated Messages request to what the engine runs: the chat plan of the internal chat
request, the breakpoints' prompt positions (the pins to make) and the sampling settings."""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from model_runner.records import PinRequest
from proxy.anthropic.conversation import Breakpoint, Position, breakpoints, chat_body, shared_prefix
from proxy.anthropic.schemas import Conversation, MessagesRequest
from proxy.chat_plan import ChatPlan, ChatPlanner
from proxy.errors import InvalidRequest, from_pydantic
from proxy.schemas import ChatCompletionRequest

log = logging.getLogger("kvproxy")

BOUNDARY_MARGIN = 3
"""Tokens given up before a breakpoint's character boundary (see ``_prefix_tokens``)."""

_THINKING_SWITCHES = ("enable_thinking", "thinking")
"""Template variables that turn a model's reasoning on or off (Qwen3, GLM; DeepSeek V3.1)."""


@dataclass(frozen=True)
class PlacedBreakpoint:
    breakpoint: Breakpoint
    tokens: int
    """Prompt tokens whose values depend only on what comes up to the breakpoint."""


@dataclass(frozen=True)
class MessagesPlan:
    chat: ChatPlan
    body: ChatCompletionRequest
    """The internal chat request (sampling fields included)."""
    breakpoints: list[PlacedBreakpoint]

    @property
    def prompt_tokens(self) -> int:
        return len(self.chat.prompt_ids)

    def pins(self) -> tuple[PinRequest, ...]:
        return tuple(PinRequest(p.tokens, p.breakpoint.ttl_s, "cache_control") for p in self.breakpoints)


class MessagesPlanner:
    def __init__(
        self,
        planner: ChatPlanner,
        *,
        keep_billing_header: bool,
        sampling_defaults: tuple[float, float, int],
    ) -> None:
        self._planner = planner
        self._keep_billing_header = keep_billing_header
        self._defaults = sampling_defaults

    def plan(self, req: MessagesRequest) -> MessagesPlan:
        """Render, tokenize, constrain, place the breakpoints; raises ``InvalidRequest``."""
        marks = breakpoints(req, keep_billing_header=self._keep_billing_header)
        body = self.chat_request(req)
        variables = self._variables(req)
        chat = self._planner.plan(body, variables, offsets=bool(marks))
        placed = []
        for bp in marks:
            tokens = self._prefix_tokens(req, bp.at, chat, variables)
            if tokens is not None:
                placed.append(PlacedBreakpoint(bp, tokens))
        return MessagesPlan(chat=chat, body=body, breakpoints=placed)

    def count(self, conv: Conversation) -> int:
        """``/v1/messages/count_tokens``: the prompt's length as ``plan`` would render it."""
        breakpoints(conv, keep_billing_header=self._keep_billing_header)  # the same 400s
        return len(self.prompt_ids(conv))

    def prompt_ids(self, conv: Conversation) -> list[int]:
        """The prompt's token ids as ``plan`` renders them (no constraint, no breakpoints)."""
        return self._planner.prompt_ids(self.chat_request(conv), self._variables(conv))

    # -- helpers ---------------------------------------------------------------------------------

    def chat_request(self, conv: Conversation) -> ChatCompletionRequest:
        """The internal chat request of ``conv``, sampling settings included."""
        raw = chat_body(conv, keep_billing_header=self._keep_billing_header)
        if not isinstance(conv, MessagesRequest):
            raw["max_tokens"] = 1
        try:
            body = ChatCompletionRequest.model_validate(raw)
        except ValidationError as exc:
            raise from_pydantic(exc) from None
        if not isinstance(conv, MessagesRequest):
            return body
        temperature, top_p, top_k = self._defaults
        given = conv.temperature is not None or conv.top_p is not None or conv.top_k is not None
        if given:
            # A client that sets any of them gets Anthropic's defaults for the others.
            temperature, top_p, top_k = 1.0, 1.0, 0
        # Set after validation: Anthropic allows more stop sequences than OpenAI's four.
        return body.model_copy(
            update={
                "stop": list(conv.stop_sequences or []) or None,
                "temperature": conv.temperature if conv.temperature is not None else temperature,
                "top_p": conv.top_p if conv.top_p is not None else top_p,
                "top_k": conv.top_k if conv.top_k is not None else top_k,
                "cache_salt": conv.cache_salt,
            }
        )

    def _variables(self, conv: Conversation) -> dict[str, Any]:
        if conv.thinking is None:
            return {}
        on = conv.thinking.type != "disabled"
        return dict.fromkeys(_THINKING_SWITCHES, on)

    def _prefix_tokens(
        self, conv: Conversation, at: Position, chat: ChatPlan, variables: dict[str, Any]
    ) -> int | None:
        """The prompt tokens that depend only on what comes up to position ``at``. Rendering is
        cheap and tokenizing is not (~80 ms for 90k tokens): the altered prompt is only rendered,
        and the characters it shares with the prompt are turned into tokens by the prompt's own
        offsets, less ``BOUNDARY_MARGIN`` tokens (the text after the boundary can change how the
        tokenizer splits the last words before it). A slow tokenizer has no offsets: the altered
        prompt is tokenized."""
        raw = chat_body(conv, keep_billing_header=self._keep_billing_header, alter_after=at)
        raw["max_tokens"] = 1
        raw.pop("tool_choice", None)  # it may name a tool whose name is altered; it renders nothing
        raw.pop("parallel_tool_calls", None)
        try:
            body = ChatCompletionRequest.model_validate(raw)
            if chat.token_ends is None:
                return shared_prefix(chat.prompt_ids, self._planner.prompt_ids(body, variables))
            altered = self._planner.prompt_text(body, variables)
        except (InvalidRequest, ValidationError) as exc:
            log.debug("cannot place the breakpoint at %s: %s", at, exc)
            return None
        text = chat.prompt_text
        chars = shared_prefix(text, altered)
        if chars >= len(text):
            return len(chat.prompt_ids)  # nothing after the breakpoint renders differently
        return max(bisect.bisect_right(chat.token_ends, chars) - BOUNDARY_MARGIN, 0)
