"""What a request must fit in before it is queued: the context, the vocabulary, the K/V budget."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from model_runner.records import ContextLengthExceeded, InvalidTokens


@dataclass(frozen=True)
class PromptLimits:
    """The limits of one engine; ``check_*`` raise ``ContextLengthExceeded`` / ``InvalidTokens``."""

    max_context: int
    vocab_size: int
    """Rows of the model's logits: token ids must be below it."""
    bytes_per_token: int
    """K/V bytes one token holds."""
    kv_budget_bytes: int

    def check_prompt(self, prompt_ids: Sequence[int], max_tokens: int, *, choices: int = 1) -> None:
        """``prompt_ids`` plus ``max_tokens`` for each of ``choices`` fit the context and the budget."""
        if len(prompt_ids) + max_tokens > self.max_context:
            raise ContextLengthExceeded(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) "
                f"exceeds the context of {self.max_context} tokens"
            )
        if prompt_ids and (min(prompt_ids) < 0 or max(prompt_ids) >= self.vocab_size):
            raise InvalidTokens(f"prompt token ids must be in [0, {self.vocab_size})")
        need = (len(prompt_ids) + max_tokens) * self.bytes_per_token * choices
        if need > self.kv_budget_bytes:
            each = f" for each of {choices} choices" if choices > 1 else ""
            raise ContextLengthExceeded(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}){each} needs {need} bytes "
                f"of K/V, more than the whole --kv-budget-bytes ({self.kv_budget_bytes})"
            )

    def check_logit_bias(self, logit_bias: Iterable[tuple[int, float]]) -> None:
        """Every biased token id is a row of the logits."""
        if any(token >= self.vocab_size for token, _ in logit_bias):
            raise InvalidTokens(f"logit_bias token ids must be in [0, {self.vocab_size})")
