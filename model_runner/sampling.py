"""Next-token choice from logits: logprobs, logit bias, penalties, a grammar mask, then greedy or
temperature / top-k / top-p sampling, reproducible with a seed.

Order, per token (as OpenAI describes the fields and vLLM implements them): ``logprobs`` are the
log-softmax of the model's own logits, before anything below changes them; then ``logit_bias`` is
added, then the frequency and presence penalties are subtracted, then a grammar mask (constrained
decoding) removes forbidden tokens, then the temperature, top-k and top-p shape the draw.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

GREEDY_EPSILON = 1e-5
"""A temperature at or below this is greedy (argmax): dividing by it would only overflow."""

MAX_TOP_LOGPROBS = 20
SEED_SPACE = 2**64
"""torch seeds are 64-bit: a choice's derived seed wraps around in this space."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    ``temperature`` 0 is greedy; ``top_k`` 0 means no top-k cut; ``top_p`` 1.0 means no nucleus
    cut; ``seed`` makes sampling reproducible; ``stop``: strings that end the completion and are
    never emitted. ``frequency_penalty`` / ``presence_penalty`` (-2..2) are subtracted from a
    token's logit per earlier occurrence in the completion / once it occurred; ``logit_bias``:
    (token id, -100..100) pairs added to the logits; ``logprobs``: report each sampled token's
    log-probability, with the ``top_logprobs`` most likely alternatives (0..20).
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    skip_special_tokens: bool = True
    """Leave special tokens out of the text (off when the output parser needs their markers,
    e.g. Mistral's ``[TOOL_CALLS]``)."""

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if any(token < 0 or not -100.0 <= bias <= 100.0 for token, bias in self.logit_bias):
            raise ValueError("logit_bias maps token ids (>= 0) to values in [-100, 100]")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs")

    @property
    def greedy(self) -> bool:
        return self.temperature <= GREEDY_EPSILON or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    def choice_seed(self, index: int) -> int | None:
        """The seed of choice ``index`` of an ``n`` > 1 request: ``seed + index`` (mod 2**64), so
        choice i is the single-choice run with seed + i."""
        if self.seed is None:
            return None
        return (self.seed + index) % SEED_SPACE


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log-probability and the ``top`` (token id, logprob) pairs, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A generator seeded for one request (``None``: torch's global RNG)."""
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def token_logprob(logits: torch.Tensor, token_id: int, top_n: int) -> TokenLogprob:
    """``token_id``'s log-probability under ``logits`` (``[vocab]``, the model's raw row), with the
    ``top_n`` most likely tokens."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top: tuple[tuple[int, float], ...] = ()
    if top_n > 0:
        values, ids = torch.topk(logprobs, min(top_n, logprobs.shape[-1]))
        top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token_id, float(logprobs[token_id]), top)


def apply_logit_bias(logits: torch.Tensor, bias: Mapping[int, float] | tuple[tuple[int, float], ...]) -> None:
    """Add the bias of each listed token to ``logits`` (``[vocab]``, float32) in place."""
    pairs = bias.items() if isinstance(bias, Mapping) else bias
    for token, value in pairs:
        logits[token] += value


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, frequency: float, presence: float) -> None:
    """OpenAI's penalties, in place: ``logit -= count * frequency + (count > 0) * presence``, where
    ``counts`` (``[vocab]``, float32) counts each token in the completion so far."""
    if frequency:
        logits.sub_(counts * frequency)
    if presence:
        logits.sub_((counts > 0).to(logits.dtype) * presence)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) every logit outside the top-k and outside the top-p nucleus.

    ``logits``: ``[vocab]`` float32, already divided by the temperature.
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked before it already reach top_p (the first always stays).
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        # A top_p below float32's smallest value rounds to 0 in the comparison: keep the first anyway.
        drop[0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(0, order, sorted_logits)
    return logits


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token id from ``logits`` (``[vocab]``, any float dtype)."""
    if params.greedy:
        return int(torch.argmax(logits).item())
    scaled = logits.float() / params.temperature
    scaled = filter_logits(scaled, params.top_k, params.top_p)
    probs = torch.softmax(scaled, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())
