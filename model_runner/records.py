"""What goes into and comes out of the engine: requests, stream events, usage."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from cache_store.pins import PinOutcome
from model_runner.sampling import SamplingParams, TokenLogprob

FinishReason = Literal["stop", "length", "cancelled"]


class ContextLengthExceeded(ValueError):
    """The prompt plus ``max_tokens`` does not fit the served context."""


class InvalidTokens(ValueError):
    """A prompt token id outside the model's vocabulary."""


class TokenConstraint(Protocol):
    """One choice's grammar state (constrained decoding): which tokens may come next."""

    def mask_logits(self, logits: torch.Tensor) -> None:
        """Set the logits (``[vocab]`` float32, in place) of every forbidden token to -inf."""

    def accept(self, token_id: int) -> None:
        """Advance past a sampled token (raises when it was forbidden)."""

    @property
    def done(self) -> bool:
        """The output is complete: nothing but the end may follow."""


class Constraint(Protocol):
    """A compiled grammar; each choice of a request gets its own ``matcher()``."""

    def matcher(self) -> TokenConstraint: ...


MAX_CHOICES = 16


@dataclass(frozen=True)
class PinRequest:
    """Keep the whole blocks of the first ``tokens`` prompt tokens in memory for ``ttl_s``
    seconds (a cache breakpoint), refreshed whenever a lookup reads them. ``source`` says who
    asked (``cache_control``, ``prompt_cache_retention``, ``admin``)."""

    tokens: int
    ttl_s: float
    source: str = "cache_control"

    def __post_init__(self) -> None:
        if self.tokens < 0:
            raise ValueError("a pin cannot cover a negative number of tokens")
        if self.ttl_s <= 0:
            raise ValueError("a pin's TTL must be positive")


@dataclass(frozen=True)
class GenerationRequest:
    """One completion: token ids of the rendered prompt, how to sample, and the cache partition
    (``tenant`` and the request's optional ``cache_salt``, both part of the namespace).

    ``n`` choices share one lookup, restore and prefill; the K/V is then forked per choice, and
    choice i samples with ``sampling.choice_seed(i)``. ``constraint`` (a compiled grammar) masks
    every sampled token of every choice; without one, sampling pays nothing for it."""

    prompt_ids: Sequence[int]
    sampling: SamplingParams
    tenant: str = "default"
    cache_salt: str = ""
    n: int = 1
    constraint: Constraint | None = None
    pins: tuple[PinRequest, ...] = ()
    """Prefixes to pin once the prompt is prefilled and stored (cache breakpoints)."""

    def __post_init__(self) -> None:
        ids = tuple(int(t) for t in self.prompt_ids)
        if not ids:
            raise ValueError("the prompt must hold at least one token")
        if min(ids) < 0:
            raise ValueError("token ids must not be negative")
        if not 1 <= self.n <= MAX_CHOICES:
            raise ValueError(f"n must be in [1, {MAX_CHOICES}], got {self.n}")
        object.__setattr__(self, "prompt_ids", ids)


@dataclass(frozen=True)
class TextDelta:
    """New text of a stream and the token ids generated since the previous delta (text held
    back for a split character or a possible stop string comes out with a later delta)."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()
    """One per token of ``token_ids`` when the request asked for logprobs."""
    index: int = 0
    """The choice (``n`` > 1) this text belongs to."""


@dataclass(frozen=True)
class UsageReport:
    """Token counts and timings of one request.

    ``cached_tokens``: prompt tokens restored from the prefix cache (``cached_by_tier`` splits
    them by tier); ``prefilled_tokens``: prompt tokens computed; ``ttft_s``: from the submission
    to the first sampled token, the sum of ``lookup_s`` (hashing, tier reads, record checks, on
    a lookup thread), ``queue_s`` (waiting to join the batch), ``restore_s`` (the K/V into
    the request's buffers) and ``prefill_s`` (the uncached suffix through
    the model in ``prefill_steps`` steps, the first token sampled); ``decode_s``: after that;
    ``miss_reason``/``miss_block``: why and where the cached prefix stopped (see
    ``cache_store.prefix_cache.MISS_REASONS``).
    """

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cached_by_tier: dict[str, int] = field(default_factory=dict)
    prefilled_tokens: int = 0
    ttft_s: float = 0.0
    lookup_s: float = 0.0
    restore_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    queue_s: float = 0.0
    prefill_steps: int = 0
    miss_reason: str = "cache_disabled"
    miss_block: int | None = None
    written_blocks: tuple[int, ...] = ()
    """Prompt blocks (by index) this request wrote to the cache (blocks another request or an
    earlier one stored are not among them)."""


@dataclass(frozen=True)
class Finished:
    """The last event of every choice's stream (a request with ``n`` choices ends after ``n`` of
    them; each reports the prompt side and its own completion tokens)."""

    finish_reason: FinishReason
    usage: UsageReport
    index: int = 0
    stop_sequence: str | None = None
    """The stop string that ended the choice (``finish_reason`` "stop"), if one did."""


@dataclass(frozen=True)
class WarmupResult:
    """What ``Engine.warmup`` did for one prompt."""

    prompt_tokens: int
    cached_tokens: int
    prefilled_tokens: int
    stored_blocks: int
    miss_reason: str
    pins: tuple[PinOutcome, ...] = ()
    """What its ``PinRequest``s did: the pins made or refreshed, or why not."""


@dataclass(frozen=True)
class Failed:
    """The last event of a stream that failed inside the engine (its sampling, detokenizing or
    the step it ran in); the other requests of the batch go on."""

    error: Exception
