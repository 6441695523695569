"""Who runs in the next step: admission, the token budget, the K/V budget, and waiting for
blocks that a running request is computing.

Each step holds one decode token of every decoding request, then prefill chunks of the admitted
requests still prefilling (oldest first), then new admissions, until ``max_batch_tokens`` tokens
or ``max_batch`` requests. Admission is FIFO over the requests whose lookup is done: the oldest
one that does not fit (batch or K/V budget full) holds the rest back, so a large request is never
starved by smaller ones that keep arriving. A request whose next block is being prefilled by a
running request waits for that request's prefill instead of computing the block again, and lets
the requests behind it pass meanwhile.

K/V is reserved at admission for prompt + max_tokens (``Sequence.reserve_bytes``), so a running
request can always grow to its end: no preemption, and never an out-of-memory crash. (The one
alternative, preempting and later restoring a request's own stored blocks, would trade that
guarantee for a fuller batch when many requests stop early.)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from model_runner.sequence import Sequence

MAX_RELOOKUPS = 2
"""Lookups redone for a stale miss, at most, per request (a lookup is never redone forever)."""


@dataclass(frozen=True)
class SchedulerConfig:
    """``max_batch``: requests running at once (1: one at a time); ``max_batch_tokens``: tokens
    of one step (a longer prefill is split across steps; ``None``: no chunking, the whole
    suffix in one step); ``kv_budget_bytes``: K/V reserved by running requests."""

    max_batch: int
    max_batch_tokens: int | None
    kv_budget_bytes: int

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {self.max_batch}")
        if self.max_batch_tokens is not None and self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be at least 1, got {self.max_batch_tokens}")
        if self.kv_budget_bytes < 0:
            raise ValueError("kv_budget_bytes must not be negative")
        if self.max_batch_tokens is None and self.max_batch != 1:
            raise ValueError("a step without a token budget (whole prompts) holds one request")


@dataclass(frozen=True)
class Planned:
    """A sequence's share of a step: ``n_tokens`` tokens (1 for a decode)."""

    seq: Sequence
    n_tokens: int


@dataclass(frozen=True)
class StepPlan:
    admitted: tuple[Sequence, ...]
    """Newly admitted: their K/V must be allocated and restored before the step runs."""
    runs: tuple[Planned, ...]
    stale: tuple[Sequence, ...] = ()
    """Ready requests whose lookup missed blocks that are cached now: look them up again."""


@dataclass(frozen=True)
class SchedulerStats:
    running: int
    waiting: int
    waiting_for_kv: bool
    """The oldest waiting request does not fit the K/V budget (admission is waiting on it)."""
    waiting_on_blocks: int
    """Requests waiting for blocks a running request is prefilling."""
    kv_used_bytes: int
    kv_budget_bytes: int


class Scheduler:
    """``cached(key)`` says whether the memory tier holds a block now (``None``: no cache)."""

    def __init__(self, config: SchedulerConfig, cached: Callable[[bytes], bool] | None = None) -> None:
        self.config = config
        self._cached = cached
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.kv_used = 0
        self._inflight: dict[bytes, Sequence] = {}
        self._waiting_for_kv = False

    # -- membership ----------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def adopt(self, seq: Sequence) -> None:
        """A choice forked from a running request joins the batch, decoding; its K/V share was
        reserved when that request was admitted."""
        self.running.append(seq)

    def remove(self, seq: Sequence) -> list[Sequence]:
        """Take ``seq`` out (finished, cancelled or failed); returns the requests that waited on
        its blocks and must look their prefix up again."""
        if seq in self.running:
            self.running.remove(seq)
            self.kv_used -= seq.reserve_bytes
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.waiting_on is not None and seq in seq.waiting_on.followers:
            seq.waiting_on.followers.remove(seq)
        seq.waiting_on = None
        return self.prefill_done(seq)

    def prefill_done(self, seq: Sequence) -> list[Sequence]:
        """``seq``'s prompt blocks are all stored (or never will be): release its followers."""
        for key in [k for k, owner in self._inflight.items() if owner is seq]:
            del self._inflight[key]
        followers, seq.followers = seq.followers, []
        for follower in followers:
            follower.waiting_on = None
        return followers

    def sequences(self) -> Iterator[Sequence]:
        yield from self.running
        yield from self.waiting

    # -- planning a step -----------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        cfg = self.config
        budget = cfg.max_batch_tokens if cfg.max_batch_tokens is not None else 1 << 62
        runs: list[Planned] = []
        # 1. one token for every decoding request: a stream never stalls behind a prefill. (More
        # running than max_batch only when one request's n choices exceed it: they take turns.)
        for seq in self.running:
            if seq.phase == "decode" and budget > 0 and len(runs) < cfg.max_batch:
                runs.append(Planned(seq, 1))
                budget -= 1
        # 2. chunks for the admitted requests still prefilling, oldest first.
        for seq in self.running:
            if seq.phase == "prefill" and budget > 0 and len(runs) < cfg.max_batch:
                n = min(seq.prefill_left, budget)
                runs.append(Planned(seq, n))
                budget -= n
        # 3. admissions, FIFO. First every ready request whose next block is being prefilled
        # waits for it (even while the batch is full, so none is admitted later on a stale miss).
        stale: list[Sequence] = []
        for seq in self.waiting:
            self._wait_for_producer(seq)
        admitted: list[Sequence] = []
        self._waiting_for_kv = False
        occupied = sum(s.slots for s in self.running)
        for seq in list(self.waiting):
            if self.running and occupied + seq.slots > cfg.max_batch:
                break
            # Again here: a request admitted earlier in this loop may be computing its blocks.
            if seq.phase != "waiting" or self._wait_for_producer(seq):
                continue  # lookup still running, or waiting for a running request's blocks
            if seq.relookups < MAX_RELOOKUPS and self._stale(seq):
                seq.relookups += 1
                stale.append(seq)  # blocks it missed were stored since: look up again
                continue
            if self.kv_used + seq.reserve_bytes > cfg.kv_budget_bytes and self.running:
                self._waiting_for_kv = True
                break
            self.waiting.remove(seq)
            self.running.append(seq)
            occupied += seq.slots
            self.kv_used += seq.reserve_bytes
            self._register_inflight(seq)
            admitted.append(seq)
            if budget > 0 and seq.prefill_left > 0:
                n = min(seq.prefill_left, budget)
                runs.append(Planned(seq, n))
                budget -= n
        return StepPlan(tuple(admitted), tuple(runs), tuple(stale))

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            running=len(self.running),
            waiting=len(self.waiting),
            waiting_for_kv=self._waiting_for_kv,
            waiting_on_blocks=sum(1 for s in self.waiting if s.waiting_on is not None),
            kv_used_bytes=self.kv_used,
            kv_budget_bytes=self.config.kv_budget_bytes,
        )

    # -- in-flight blocks ----------------------------------------------------------------------

    def _wait_for_producer(self, seq: Sequence) -> bool:
        """Whether ``seq`` waits for a running request's blocks (registering it when it starts to)."""
        if seq.waiting_on is not None:
            return True
        if seq.phase != "waiting":
            return False
        producer = self._producer_of(seq)
        if producer is None:
            return False
        seq.waiting_on = producer
        producer.followers.append(seq)
        return True

    def _producer_of(self, seq: Sequence) -> Sequence | None:
        """The running request that is prefilling the first block ``seq`` did not find."""
        hit = seq.hit
        if hit is None or (seq.prefill_only and seq.cached >= seq.target):
            return None
        matched = len(hit.blocks)
        if matched >= len(hit.hashes):
            return None
        return self._inflight.get(hit.hashes[matched])

    def _stale(self, seq: Sequence) -> bool:
        hit = seq.hit
        if hit is None or self._cached is None or len(hit.blocks) >= len(hit.hashes):
            return False
        return self._cached(hit.hashes[len(hit.blocks)])

    def _register_inflight(self, seq: Sequence) -> None:
        """The prompt blocks ``seq`` will compute (its unmatched full blocks). They stay
        registered until its whole prefill is done (``prefill_done``), also once a chunk stored
        some: a request that looked its prefix up before that store must still wait and look up
        again, not compute the stored blocks a second time."""
        hit = seq.hit
        if hit is None:
            return
        for key in hit.hashes[len(hit.blocks) :]:
            self._inflight.setdefault(key, seq)
