"""Logprobs in OpenAI's shapes (chat: ``choices[].logprobs.content``; completions: the legacy
``tokens`` / ``token_logprobs`` / ``top_logprobs`` / ``text_offset`` lists).

The values are the log-softmax of the model's own logits for that step: before temperature,
top-p/top-k, penalties, logit bias and any grammar mask (vLLM's default). A token can hold part
of a character: ``bytes`` is then the exact answer and ``token`` its decoding with U+FFFD.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from model_runner.detokenize import TokenPieces
from model_runner.sampling import TokenLogprob
from proxy.responses import CompletionLogprobs, TokenLogprobOut, TopLogprob

FLOOR = -9999.0
"""What a -inf logprob is reported as (JSON has no infinity; OpenAI uses the same floor)."""


def _finite(value: float) -> float:
    return value if math.isfinite(value) else FLOOR


class LogprobFormatter:
    def __init__(self, pieces: TokenPieces) -> None:
        self._pieces = pieces

    def chat(self, entries: Iterable[TokenLogprob]) -> list[TokenLogprobOut]:
        out = []
        for entry in entries:
            text, raw = self._pieces.piece(entry.token_id)
            top = []
            for token_id, value in entry.top:
                t_text, t_raw = self._pieces.piece(token_id)
                top.append(TopLogprob(token=t_text, logprob=_finite(value), bytes=list(t_raw)))
            out.append(
                TokenLogprobOut(token=text, logprob=_finite(entry.logprob), bytes=list(raw), top_logprobs=top)
            )
        return out

    def completion(self, entries: Iterable[TokenLogprob], offset: int, with_top: bool) -> CompletionLogprobs:
        """``offset``: characters of the completion before these tokens (``text_offset`` counts
        from the start of the completion)."""
        tokens: list[str] = []
        values: list[float] = []
        tops: list[dict[str, float]] = []
        offsets: list[int] = []
        for entry in entries:
            text, _ = self._pieces.piece(entry.token_id)
            tokens.append(text)
            values.append(_finite(entry.logprob))
            offsets.append(offset)
            offset += len(text)
            if with_top:
                top: dict[str, float] = {}
                for token_id, value in entry.top:
                    top.setdefault(self._pieces.piece(token_id)[0], _finite(value))
                tops.append(top)
        return CompletionLogprobs(
            tokens=tokens, token_logprobs=values, top_logprobs=tops if with_top else None, text_offset=offsets
        )
