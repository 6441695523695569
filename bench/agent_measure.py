"""The agent bench's figures: prompts re-rendered here as the server renders them, what earlier
requests left for a prompt to reuse, and the totals (see ``bench.agent_bench``)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from bench.agent_script import BLOCK, TOOLS, Step
from bench.workloads import common_prefix, reusable_tokens
from model_runner.chat_template import ChatTemplate
from model_runner.detokenize import TokenPieces
from proxy.chat_plan import template_messages
from proxy.schemas import ChatMessage

SENTINEL = "@@agent-bench-next-message@@"
"""Content of the message after a reply when rendering what the reply leaves in history."""


class LocalRender:
    """The served model's prompts rendered here, the way the server does (``template_messages``,
    ``normalize_messages``, ``render`` with the tools), and generated token ids read back from
    logprobs (each entry's bytes name its token)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.template = ChatTemplate(tokenizer)
        self._tokenizer = tokenizer
        pieces = TokenPieces(tokenizer)
        self._by_bytes: dict[bytes, int] = {}
        for token_id in range(len(tokenizer)):
            self._by_bytes.setdefault(pieces.piece(token_id)[1], token_id)

    def text(self, messages: Sequence[dict[str, Any]]) -> str:
        parsed = [ChatMessage.model_validate(m) for m in messages]
        normalized = self.template.normalize_messages(template_messages(parsed, self.template))
        return self.template.render(normalized, tools=list(TOOLS))

    def ids(self, text: str) -> list[int]:
        return self.template.tokenize(text)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=False))

    def generated(self, entries: Sequence[dict[str, Any]]) -> tuple[list[int], str]:
        """Token ids and text of a choice's ``logprobs.content``."""
        raw = [bytes(e["bytes"]) for e in entries]
        return [self._by_bytes[b] for b in raw], b"".join(raw).decode("utf-8", errors="replace")

    def history_after(
        self, messages: list[dict[str, Any]], reply: dict[str, Any], prompt_text: str, generated_text: str
    ) -> list[int]:
        """The prompt followed by ``reply`` as later prompts render it, up to where the next
        message's content goes (a tool result after calls, else a user message). When that next
        message re-renders earlier history (the prompt is no longer its start), only the prompt
        followed by the generated text."""
        calls = reply.get("tool_calls") or []
        following = [{"role": "tool", "tool_call_id": c["id"], "content": SENTINEL} for c in calls] or [
            {"role": "user", "content": SENTINEL}
        ]
        text = self.text([*messages, reply, *following])
        if text.startswith(prompt_text) and SENTINEL in text:
            return self.ids(text[: text.index(SENTINEL)])
        return self.ids(prompt_text + generated_text)


# -- figures ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Divergence:
    """Where a prompt stops extending the previous prompt: ``token`` (in block ``token //
    BLOCK``), a few tokens before it (``context``) and a few of each prompt from there."""

    token: int
    context: str
    before: str
    now: str

    @property
    def block(self) -> int:
        return self.token // BLOCK


@dataclass(frozen=True)
class RequestFigures:
    step: Step
    prompt_tokens: int
    cached_tokens: int
    reusable: int
    """Whole blocks equal to a prefix an earlier request determined (``bench.agent_bench``)."""
    engine_alone: int
    """Whole blocks equal to an earlier prompt + its generated token ids."""
    longest_match: int
    """Tokens (not rounded) equal to a prefix an earlier request determined."""
    miss_reason: str | None
    miss_block: int | None
    divergence: Divergence | None


class Lineage:
    """What the earlier requests of one conversation left: the token sequences a later prompt may
    start with (``seen``: prompts and their rendered replies) and what the engine alone caches
    (``fed``: prompts + generated ids the model was fed)."""

    def __init__(self, block: int) -> None:
        self.block = block
        self.seen: list[list[int]] = []
        self.fed: list[list[int]] = []

    def measure(self, ids: list[int]) -> tuple[int, int, int]:
        """``(longest match with seen, reusable, engine alone)`` of a new prompt."""
        longest, reusable = reusable_tokens(ids, self.seen, self.block)
        _, alone = reusable_tokens(ids, self.fed, self.block)
        return longest, reusable, alone

    def add(self, prompt: list[int], history: list[int], fed: list[int]) -> None:
        self.seen += [prompt, history]
        self.fed.append(fed)


def divergence(render: LocalRender, previous: list[int] | None, ids: list[int]) -> Divergence | None:
    """Where ``ids`` stops extending ``previous`` (None when it extends it all)."""
    if previous is None:
        return None
    at = common_prefix(previous, ids)
    if at >= len(previous):
        return None
    return Divergence(
        at,
        render.decode(ids[max(at - 4, 0) : at]),
        render.decode(previous[at : at + 6]),
        render.decode(ids[at : at + 6]),
    )


@dataclass(frozen=True)
class Totals:
    requests: int
    prompt: int
    reusable: int
    cached: int
    engine_alone: int
    miss_reasons: dict[str, int]

    @property
    def reuse(self) -> float:
        """sum(cached) / sum(reusable): the target is >= 0.95."""
        return self.cached / self.reusable if self.reusable else 0.0

    @property
    def hit(self) -> float:
        return self.cached / self.prompt if self.prompt else 0.0

    @property
    def alone_reuse(self) -> float:
        return self.engine_alone / self.reusable if self.reusable else 0.0


def totals(figures: Sequence[RequestFigures]) -> Totals:
    return Totals(
        requests=len(figures),
        prompt=sum(f.prompt_tokens for f in figures),
        reusable=sum(f.reusable for f in figures),
        cached=sum(f.cached_tokens for f in figures),
        engine_alone=sum(f.engine_alone for f in figures),
        miss_reasons=dict(Counter(str(f.miss_reason) for f in figures)),
    )
