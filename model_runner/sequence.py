"""One request inside the engine: where it is on its way, its K/V, and its token stream.

A ``Sequence`` is created when a request is submitted and lives on the engine's step loop until
it finishes. Phases: ``lookup`` (its prefix lookup runs on a lookup thread), ``waiting`` (ready,
not admitted: the batch, the token budget or the K/V budget is full, or the blocks it needs are
being computed by a running request), ``prefill`` (admitted; the suffix goes through the model
in chunks), ``decode`` (one token per step), ``done``.

Its token stream (sampling, detokenizing, stop strings, the events handed to its sink) is here
too, so that an exception in one request's sampling or detokenizing fails that request alone.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from cache_store.pins import PinOutcome
from cache_store.prefix_cache import PrefixHit
from model_runner.detokenize import IncrementalDetokenizer, StopMatcher
from model_runner.kv import CacheKV, RequestKV
from model_runner.records import Failed, Finished, FinishReason, GenerationRequest, TextDelta, WarmupResult
from model_runner.sampling import (
    TokenLogprob,
    apply_logit_bias,
    apply_penalties,
    make_generator,
    sample_next,
    token_logprob,
)

Phase = Literal["lookup", "waiting", "prefill", "decode", "done"]
Event = TextDelta | Finished | Failed | WarmupResult
Sink = Callable[[Event], None]


@dataclass
class Timeline:
    """``perf_counter`` marks of one request (see ``UsageReport`` for what they add up to)."""

    submitted: float = field(default_factory=time.perf_counter)
    lookup_s: float = 0.0
    admitted: float | None = None
    restored: float | None = None
    first_token: float | None = None


@dataclass(eq=False)
class Sequence:
    """The engine's state of one request (only the step loop mutates it, but for ``lookup``,
    which a lookup thread fills in before the loop sees the future done)."""

    id: int
    request: GenerationRequest
    sink: Sink
    cancel: threading.Event
    prefill_only: bool = False
    """A warmup: prefill and store the full blocks, sample nothing."""
    warmup_tokens: int = 0
    """For a warmup: the tokens of its full blocks."""
    phase: Phase = "lookup"
    namespace: bytes = b""
    hit: PrefixHit | None = None
    lookup: Future[PrefixHit | None] | None = None
    cached: int = 0
    """Prompt tokens restored from the cache."""
    kv: RequestKV | CacheKV | None = None
    reserve_bytes: int = 0
    stored_blocks: int = 0
    """Leading full blocks known to be in the cache (matched or stored by this request)."""
    written_blocks: list[int] = field(default_factory=list)
    """Prompt blocks this request wrote itself (the others it matched or found stored)."""
    pin_outcomes: list[PinOutcome] = field(default_factory=list)
    """What its ``PinRequest``s did (pins made or refreshed, or why not)."""
    waiting_on: Sequence | None = None
    """The running request whose prefill computes the blocks this one needs next."""
    followers: list[Sequence] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    prefill_steps: int = 0
    """Steps its prefill took part in (more than one: chunked)."""
    relookups: int = 0
    """Lookups redone because blocks it missed were cached meanwhile."""
    timeline: Timeline = field(default_factory=Timeline)
    choice: int = 0
    """Which of the request's ``n`` choices this sequence generates."""
    parent: Sequence | None = None
    """For choices 1.. of an ``n`` > 1 request: the sequence that prefilled the prompt (it holds
    the prefix pins and reports the prompt side)."""
    forked: bool = False
    """The prompt's K/V has been forked into the other choices (or there are none)."""
    _stream: TokenStream | None = None

    @property
    def slots(self) -> int:
        """Batch places this sequence will take: all its choices until they are forked."""
        return 1 if self.forked or self.parent is not None else self.request.n

    @property
    def prompt(self) -> tuple[int, ...]:
        return self.request.prompt_ids  # type: ignore[return-value]

    @property
    def target(self) -> int:
        """Prompt tokens to put through the model: all of them, or the full blocks for a warmup."""
        return self.warmup_tokens if self.prefill_only else len(self.prompt)

    @property
    def fed(self) -> int:
        """Tokens whose K/V are complete (restored or computed)."""
        return self.kv.length if self.kv is not None else 0

    @property
    def prefill_left(self) -> int:
        return max(self.target - self.fed, 0)

    def next_input(self, budget: int) -> list[int]:
        """The tokens of this step: a prefill chunk of at most ``budget`` tokens, or the last
        sampled token."""
        if self.phase == "prefill":
            n = min(budget, self.prefill_left)
            if isinstance(self.kv, CacheKV):
                n = min(n, self.kv.chunk_limit(self.target))  # a recurrent state is taken there
            return list(self.prompt[self.fed : self.fed + n])
        return [self.generated[-1]]

    # -- the token stream ------------------------------------------------------------------------

    def stream(self, tokenizer: Any, eos: frozenset[int], device: torch.device) -> TokenStream:
        if self._stream is None:
            self._stream = TokenStream(self, tokenizer, eos, device)
        return self._stream

    def emit(self, event: Event) -> None:
        self.sink(event)


class TokenStream:
    """Sampling, detokenizing and stop strings of one sequence; emits its ``TextDelta``s."""

    def __init__(self, seq: Sequence, tokenizer: Any, eos: frozenset[int], device: torch.device) -> None:
        request = seq.request
        params = request.sampling
        self._seq = seq
        self._params = params
        self._eos = eos
        self._generator = make_generator(params.choice_seed(seq.choice), device)
        self._detok = IncrementalDetokenizer(
            tokenizer, seq.prompt, skip_special_tokens=params.skip_special_tokens
        )
        self._stopper = StopMatcher(params.stop)
        self._matcher = request.constraint.matcher() if request.constraint is not None else None
        self._counts: torch.Tensor | None = None
        """Occurrences of each token in the completion (only when a penalty is set)."""
        self._unsent: list[int] = []
        self._unsent_logprobs: list[TokenLogprob] = []
        self._tail = ""
        self.finish: FinishReason | None = None

    def accept(self, logits: torch.Tensor) -> bool:
        """Sample from ``logits`` ([vocab], the model's row; never modified: choices of one prompt
        share it) and emit the new text; True when the sequence is done (``finish`` says why)."""
        params = self._params
        seq = self._seq
        shaped = self._shape(logits)
        token = sample_next(shaped, params, self._generator)
        if self._matcher is not None:
            self._matcher.accept(token)
        if seq.timeline.first_token is None:
            seq.timeline.first_token = time.perf_counter()
        seq.generated.append(token)
        if self._counts is not None:
            self._counts[token] += 1
        if token in self._eos:
            self.finish = "stop"
            return True
        self._unsent.append(token)
        if params.logprobs:
            self._unsent_logprobs.append(token_logprob(logits, token, params.top_logprobs))
        text = self._stopper.push(self._detok.push(token))
        if self._stopper.stopped:
            self._tail = text  # what came before the stop string
            self.finish = "stop"
            return True
        if text:
            self._send(text)
        if self._matcher is not None and self._matcher.done:
            self.finish = "stop"  # the grammar is complete: only the end could follow
            return True
        if len(seq.generated) >= params.max_tokens:
            self.finish = "length"
            return True
        return False

    def _shape(self, logits: torch.Tensor) -> torch.Tensor:
        """The row to sample from: bias, penalties and the grammar mask applied to a copy."""
        params = self._params
        if not (params.logit_bias or params.penalized or self._matcher is not None):
            return logits
        shaped = logits.float().clone()
        if params.logit_bias:
            apply_logit_bias(shaped, params.logit_bias)
        if params.penalized:
            if self._counts is None:
                self._counts = torch.zeros(shaped.shape[-1], dtype=torch.float32, device=shaped.device)
            apply_penalties(shaped, self._counts, params.frequency_penalty, params.presence_penalty)
        if self._matcher is not None:
            self._matcher.mask_logits(shaped)
        return shaped

    def _send(self, text: str) -> None:
        self._seq.emit(
            TextDelta(text, tuple(self._unsent), tuple(self._unsent_logprobs), index=self._seq.choice)
        )
        self._unsent = []
        self._unsent_logprobs = []

    @property
    def stop_sequence(self) -> str | None:
        """The stop string that ended the stream, if one did."""
        return self._stopper.matched

    def close(self) -> None:
        """Emit what was held back (a split character, a possible stop string that never came)."""
        if self._stopper.stopped:
            tail = self._tail
        else:
            tail = self._stopper.push(self._detok.flush()) + self._stopper.flush()
        if tail or self._unsent:
            self._send(tail)
