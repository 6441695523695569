"""Seeded, text-only workload generators for ``bench.server_bench`` (no model, no timing).

Every generator takes a frozen parameter record and returns plain data, so the same parameters
always give the same prompts (the bench prints the parameters next to its results, and
``tests/bench`` checks the determinism). Text is made of pseudo words built from the same
syllables the bench tokenizer was trained on, so a word costs a few tokens, like real text.
Token-level facts (lengths, common prefixes) are measured by the bench with the real tokenizer.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

_SYLLABLES = [c + v for c in "bcdfghklmnprstvz" for v in "aeiou"] + ["th", "ch", "sh", "qu"]

Message = tuple[str, str]
"""(role, content)."""


class Words:
    """An endless seeded stream of pseudo words over a fixed lexicon."""

    def __init__(self, seed: int, lexicon_size: int = 4000) -> None:
        self._rng = random.Random(seed)
        self.lexicon = [
            "".join(self._rng.choice(_SYLLABLES) for _ in range(self._rng.randint(1, 4)))
            for _ in range(lexicon_size)
        ]

    def take(self, n: int) -> list[str]:
        return [self._rng.choice(self.lexicon) for _ in range(n)]

    def text(self, n: int) -> str:
        return " ".join(self.take(n))

    def between(self, bounds: tuple[int, int]) -> int:
        return self._rng.randint(*bounds)


@dataclass(frozen=True)
class Request:
    """One request of a replayed workload. ``group`` names the prefix it shares with others (the
    key of the reuse recipe's prefilled cache); exactly one of ``prompt``/``messages`` is set."""

    group: str
    prompt: str | None = None
    messages: tuple[Message, ...] | None = None


# -- 1. long-document QA -------------------------------------------------------------------------


@dataclass(frozen=True)
class DocQAParams:
    seed: int = 11
    docs: int = 4
    doc_words: tuple[int, int] = (450, 900)
    """About 1-2k tokens per document."""
    questions: int = 5
    question_words: tuple[int, int] = (6, 14)


DOC_SYSTEM = "You answer questions about the document the user gives. Quote it where you can."


def doc_qa(p: DocQAParams) -> list[Request]:
    """Each document asked ``questions`` short questions; all questions in one random order."""
    words = Words(p.seed)
    rng = random.Random(p.seed + 1)
    requests: list[Request] = []
    for d in range(p.docs):
        doc = words.text(words.between(p.doc_words))
        for _ in range(p.questions):
            question = words.text(words.between(p.question_words)) + "?"
            user = f"Document:\n{doc}\n\nQuestion: {question}"
            requests.append(Request(f"doc{d}", messages=(("system", DOC_SYSTEM), ("user", user))))
    rng.shuffle(requests)
    return requests


# -- 2. multi-round chat -------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatParams:
    seed: int = 12
    users: int = 3
    rounds: int = 5
    system_words: int = 220
    user_words: tuple[int, int] = (8, 24)
    answer_tokens: int = 24
    """max_tokens of every assistant answer (greedy: the answers are deterministic)."""


@dataclass(frozen=True)
class ChatScript:
    system: str
    user_turns: tuple[tuple[str, ...], ...]
    """``user_turns[u][r]``: what user ``u`` says in round ``r``."""


def chat_script(p: ChatParams) -> ChatScript:
    words = Words(p.seed)
    system = "You are a patient assistant for a shipping company. " + words.text(p.system_words)
    turns = tuple(
        tuple(words.text(words.between(p.user_words)) + "?" for _ in range(p.rounds)) for _ in range(p.users)
    )
    return ChatScript(system, turns)


# -- 3. shared-prefix fan-out --------------------------------------------------------------------


@dataclass(frozen=True)
class FanoutParams:
    seed: int = 13
    prefixes: int = 3
    prefix_words: int = 700
    suffixes: int = 8
    suffix_words: tuple[int, int] = (5, 15)


def fanout(p: FanoutParams) -> list[Request]:
    """A few long completion prefixes, each continued by many short distinct suffixes."""
    words = Words(p.seed)
    rng = random.Random(p.seed + 1)
    requests = []
    for i in range(p.prefixes):
        prefix = words.text(p.prefix_words)
        for _ in range(p.suffixes):
            requests.append(
                Request(f"prefix{i}", prompt=f"{prefix}\n{words.text(words.between(p.suffix_words))}")
            )
    rng.shuffle(requests)
    return requests


# -- TTFT by prompt length (block-aligned prefix + short suffix) --------------------------------


@dataclass(frozen=True)
class SweepParams:
    seed: int = 14
    lengths: tuple[int, ...] = (512, 1024, 2048)
    """Prefix tokens (block-aligned); the suffix comes on top."""
    reps: int = 5
    suffix_words: int = 16


def sweep_words(p: SweepParams) -> Words:
    return Words(p.seed)


# -- 5. misses: divergence at random offsets ----------------------------------------------------


@dataclass(frozen=True)
class DivergenceParams:
    seed: int = 15
    base_words: int = 900
    variants: int = 8
    block_sizes: tuple[int, ...] = (16, 64, 256)


def divergence(p: DivergenceParams) -> tuple[str, list[tuple[int, str]]]:
    """A base prompt and ``variants`` prompts of the same word count that keep its first ``k``
    words (``k`` uniform over the prompt) and continue with fresh words: ``[(k, text)]``."""
    words = Words(p.seed)
    rng = random.Random(p.seed + 1)
    base = words.take(p.base_words)
    variants = []
    for _ in range(p.variants):
        k = rng.randrange(1, p.base_words)
        variants.append((k, " ".join(base[:k] + words.take(p.base_words - k))))
    return " ".join(base), variants


# -- 6. capacity: Zipf access over more prefixes than memory holds ------------------------------


@dataclass(frozen=True)
class CapacityParams:
    seed: int = 16
    prefixes: int = 16
    prefix_words: int = 220
    requests: int = 60
    zipf_s: float = 1.0
    memory_prefixes: int = 4
    """The memory tier's budget, in prefixes' worth of blocks."""
    suffix_words: tuple[int, int] = (5, 12)


def zipf_trace(p: CapacityParams) -> tuple[list[str], list[tuple[int, str]]]:
    """The prefixes and ``requests`` draws ``(prefix index, full prompt)``: prefix ``i`` is drawn
    with weight ``1 / (i + 1) ** s`` (index 0 the most popular), each with a fresh suffix."""
    words = Words(p.seed)
    rng = random.Random(p.seed + 1)
    prefixes = [words.text(p.prefix_words) for _ in range(p.prefixes)]
    weights = [1.0 / (i + 1) ** p.zipf_s for i in range(p.prefixes)]
    trace = []
    for i in rng.choices(range(p.prefixes), weights=weights, k=p.requests):
        trace.append((i, f"{prefixes[i]}\n{words.text(words.between(p.suffix_words))}"))
    return prefixes, trace


# -- token-level helpers (pure) ------------------------------------------------------------------


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def reusable_tokens(ids: Sequence[int], earlier: Sequence[Sequence[int]], block: int) -> tuple[int, int]:
    """``(true common prefix with any earlier prompt, what blocks of `block` tokens can reuse of
    it)``; the second is capped at ``len(ids) - 1`` because one prompt token is always prefilled."""
    common = max((common_prefix(ids, e) for e in earlier), default=0)
    return common, min(common // block * block, len(ids) - 1)
