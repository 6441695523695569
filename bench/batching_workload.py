"""Pure helpers of the batching bench (no model, no timing): the multi-user chat script, the
figures computed from step timestamps, percentiles. Seeded, so a figure can be traced back to
the exact prompts; ``tests/bench/test_batching_workload.py`` checks them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from bench.workloads import Message, Words


@dataclass(frozen=True)
class UsersParams:
    """``users`` users talk at once, ``rounds`` rounds each, on one shared system prompt.

    Every round sends the system prompt, the user's whole history (their earlier questions and
    scripted answers) and a new question. The answers in the history are scripted text, not
    what the model said, so every arm gets exactly the same prompts."""

    users: int
    rounds: int = 2
    seed: int = 31
    system_words: int = 330
    """About 800 tokens with the bench tokenizer (the bench prints the measured count)."""
    user_words: tuple[int, int] = (10, 30)
    answer_words: tuple[int, int] = (20, 32)
    """Scripted assistant turns of the history (about as long as a 64-token answer)."""


@dataclass(frozen=True)
class UsersScript:
    system: str
    turns: tuple[tuple[tuple[str, str], ...], ...]
    """``turns[u][r]``: (question, scripted answer) of user ``u`` in round ``r``."""

    def messages(self, user: int, round_: int) -> list[Message]:
        """What user ``user`` sends in round ``round_``: system, history, the new question."""
        out: list[Message] = [("system", self.system)]
        for question, answer in self.turns[user][:round_]:
            out += [("user", question), ("assistant", answer)]
        out.append(("user", self.turns[user][round_][0]))
        return out


SYSTEM_OPENER = "You are the support assistant of a shipping company. Rules and the catalogue follow. "


def system_prompt(seed: int, words: int) -> str:
    """The shared system prompt: the same for every user (and every user count) of a run."""
    return SYSTEM_OPENER + Words(seed).text(words)


def users_script(p: UsersParams, variant: int = 0) -> UsersScript:
    """The script of ``p.users`` users. The system prompt depends on ``p.seed`` only; the users'
    questions and answers also on ``variant`` (and the user count), so every measured run asks
    new questions that no earlier run cached, on the same (warm) system prompt."""
    words = Words(p.seed * 1000 + 7 * p.users + 100_003 * variant + 1)
    turns = tuple(
        tuple(
            (
                f"Question {u}.{r}: " + words.text(words.between(p.user_words)) + "?",
                words.text(words.between(p.answer_words)) + ".",
            )
            for r in range(p.rounds)
        )
        for u in range(p.users)
    )
    return UsersScript(system_prompt(p.seed, p.system_words), turns)


# -- figures -------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear between the closest ranks (numpy's default);
    NaN for no values."""
    if not values:
        return float("nan")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q must be in [0, 100], got {q}")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@dataclass(frozen=True)
class StepStamp:
    """One engine step as the bench's observer saw it: when it ended (``perf_counter``), its
    tokens, requests and sampled tokens."""

    t: float
    tokens: int
    requests: int
    sampled: int


def steady_decode(stamps: Sequence[StepStamp], batch: int) -> tuple[float, int]:
    """Tokens/s of the pure decode steps of exactly ``batch`` requests (one token each), from the
    first to the last of them: ``batch * (k - 1) / (t_last - t_first)``, every cost between two
    steps included (sampling, detokenizing, scheduling). Returns ``(tokens/s, k)``; NaN when
    fewer than 2 such steps."""
    times = [s.t for s in stamps if s.requests == batch and s.tokens == batch and s.sampled == batch]
    if len(times) < 2 or times[-1] <= times[0]:
        return float("nan"), len(times)
    return batch * (len(times) - 1) / (times[-1] - times[0]), len(times)


def gaps_between(stamps: Sequence[StepStamp], start: float, end: float) -> list[float]:
    """The time between consecutive steps that ended in ``(start, end]``, the first measured from
    the last step before ``start`` (so a step that began before ``start`` counts whole). Every
    decoding request gets one token per step: these are its inter-token gaps."""
    ordered = sorted(stamps, key=lambda s: s.t)
    out: list[float] = []
    prev: float | None = None
    for s in ordered:
        if s.t <= start:
            prev = s.t
            continue
        if s.t > end:
            break
        if prev is not None:
            out.append(s.t - prev)
        prev = s.t
    return out


def throughput(tokens: int, starts: Sequence[float], ends: Sequence[float]) -> float:
    """Output tokens/s of a workload: its tokens over first start -> last end."""
    if not starts or not ends:
        return float("nan")
    span = max(ends) - min(starts)
    return tokens / span if span > 0 else float("nan")
