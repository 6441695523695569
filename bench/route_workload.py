"""Pure helpers of the router bench (no model, no HTTP, no timing): the multi-tenant chat
workload, its Poisson schedule, and the figures computed from block hashes and answers.
Seeded, so a figure can be traced back to the exact prompts; ``tests/bench/test_route_bench.py``
checks them.

The workload: ``tenants`` tenants, each with its own long system prompt, and ``users``
conversations per tenant. A conversation sends ``turns`` requests; each sends the system prompt,
the whole history so far (earlier questions and scripted answers: not what the model said, so
every arm gets exactly the same prompts) and a new question. Requests arrive as a Poisson process
of ``rate`` per second; each arrival is the next turn of one of the ``open_conversations``
conversations in progress (a new one opens when one ends), never one of the ``spacing`` picked
just before (a user reads the answer before writing again).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bench.batching_workload import percentile
from bench.workloads import Message, Words


@dataclass(frozen=True)
class RouteParams:
    seed: int = 41
    tenants: int = 7
    system_words: tuple[int, int] = (450, 900)
    """About 1-2k tokens with the bench tokenizer (2.2 tokens a word; the bench prints the count)."""
    users: int = 3
    """Conversations per tenant."""
    turns: int = 4
    user_words: tuple[int, int] = (10, 30)
    answer_words: tuple[int, int] = (30, 70)
    """Scripted assistant turns of the history."""
    open_conversations: int = 6
    spacing: int = 3
    """A conversation is not picked again within this many arrivals (while others can be)."""
    rate: float = 2.0
    """Poisson arrivals per second."""


@dataclass(frozen=True)
class Turn:
    """One scheduled request: turn ``turn`` of conversation ``(tenant, user)`` at ``at_s``."""

    at_s: float
    tenant: int
    user: int
    turn: int

    @property
    def conversation(self) -> tuple[int, int]:
        return (self.tenant, self.user)


@dataclass(frozen=True)
class RouteScript:
    systems: tuple[str, ...]
    """``systems[t]``: tenant ``t``'s system prompt."""
    exchanges: tuple[tuple[tuple[tuple[str, str], ...], ...], ...]
    """``exchanges[t][u][r]``: (question, scripted answer) of user ``u`` of tenant ``t``, turn ``r``."""
    warm_questions: tuple[str, ...]
    """One question per tenant, sent (unmeasured) before the measured phase."""

    def messages(self, tenant: int, user: int, turn: int) -> list[Message]:
        """What the user sends at ``turn``: the system prompt, the history, the new question."""
        out: list[Message] = [("system", self.systems[tenant])]
        for question, answer in self.exchanges[tenant][user][:turn]:
            out += [("user", question), ("assistant", answer)]
        out.append(("user", self.exchanges[tenant][user][turn][0]))
        return out

    def warm_messages(self, tenant: int) -> list[Message]:
        return [("system", self.systems[tenant]), ("user", self.warm_questions[tenant])]


def route_script(p: RouteParams) -> RouteScript:
    """Every tenant's system prompt (distinct from its first block on: they open with the tenant's
    name) and every conversation's exchanges."""
    words = Words(p.seed)
    systems = tuple(
        f"You are the assistant of tenant {t}, {words.text(2)}. Its rules and catalogue follow. "
        + words.text(words.between(p.system_words))
        for t in range(p.tenants)
    )
    exchanges = tuple(
        tuple(
            tuple(
                (
                    f"Question {t}.{u}.{r}: " + words.text(words.between(p.user_words)) + "?",
                    words.text(words.between(p.answer_words)) + ".",
                )
                for r in range(p.turns)
            )
            for u in range(p.users)
        )
        for t in range(p.tenants)
    )
    warm = tuple(f"Warm-up {t}: " + words.text(12) + "?" for t in range(p.tenants))
    return RouteScript(systems, exchanges, warm)


def schedule(p: RouteParams) -> list[Turn]:
    """Every turn of every conversation, in arrival order (times from 0, Poisson at ``rate``)."""
    rng = random.Random(p.seed + 1)
    waiting = deque([(t, u) for t in range(p.tenants) for u in range(p.users)])
    rng.shuffle(waiting)
    open_: list[tuple[int, int]] = []
    next_turn: dict[tuple[int, int], int] = {}
    picked_at: dict[tuple[int, int], int] = {}
    out: list[Turn] = []
    now = 0.0
    while waiting or open_:
        while len(open_) < p.open_conversations and waiting:
            conv = waiting.popleft()
            open_.append(conv)
            next_turn[conv] = 0
        i = len(out)
        ready = [c for c in open_ if i - picked_at.get(c, -(1 << 30)) > p.spacing]
        # Near the end fewer conversations are open than the spacing needs: the least recent goes.
        conv = rng.choice(ready) if ready else min(open_, key=lambda c: picked_at[c])
        now += rng.expovariate(p.rate)
        out.append(Turn(now, conv[0], conv[1], next_turn[conv]))
        picked_at[conv] = i
        next_turn[conv] += 1
        if next_turn[conv] == p.turns:
            open_.remove(conv)
    return out


# -- figures from block hashes ---------------------------------------------------------------------


def leading_run(hashes: Sequence[bytes], held: set[bytes] | frozenset[bytes]) -> int:
    """Leading blocks of ``hashes`` in ``held`` (hashes are chained: a held block means its whole
    prefix was seen, so this is the longest block-aligned prefix shared with what was seen)."""
    n = 0
    for h in hashes:
        if h not in held:
            break
        n += 1
    return n


@dataclass(frozen=True)
class Prompt:
    """One request as the reuse figures see it: where it went, its block hashes and length."""

    place: Hashable
    hashes: tuple[bytes, ...]
    prompt_tokens: int


def reusable_tokens(requests: Sequence[Prompt], block: int, earlier: Iterable[Prompt] = ()) -> list[int]:
    """Per request, the prompt tokens a replica would restore from memory if it had kept every
    block of every earlier request sent to the same ``place`` (``earlier``: requests before the
    measured ones, e.g. warm-ups): whole blocks, at most ``prompt_tokens - 1`` (one prompt token
    is always prefilled, as the engine does)."""
    held: dict[Hashable, set[bytes]] = {}
    for r in earlier:
        held.setdefault(r.place, set()).update(r.hashes)
    out = []
    for r in requests:
        seen = held.setdefault(r.place, set())
        n = leading_run(r.hashes, seen)
        out.append(max(0, min(n * block, r.prompt_tokens - 1)))
        seen.update(r.hashes)
    return out


def oracle_tokens(requests: Sequence[Prompt], block: int, earlier: Iterable[Prompt] = ()) -> list[int]:
    """The oracle's memory tokens: every request on the replica that served its conversation's
    previous turn (its first turn: its tenant's earlier requests), which evicted nothing. Since a
    conversation's previous prompt holds its system prompt, and tenants share no block, that is
    the reuse of one place that saw every earlier request."""
    return reusable_tokens(
        [Prompt(0, r.hashes, r.prompt_tokens) for r in requests],
        block,
        [Prompt(0, r.hashes, r.prompt_tokens) for r in earlier],
    )


def working_set_blocks(
    turns: Sequence[Turn],
    hashes: Sequence[Sequence[bytes]],
    turns_per: int,
    tenant_blocks: Mapping[int, Sequence[bytes]],
) -> int:
    """The most distinct blocks live at once: every tenant's own blocks (``tenant_blocks``: its
    system prompt, live for the whole run) plus the latest prompt of every conversation in
    progress (a finished conversation's history is garbage)."""
    live_tenants: set[bytes] = set()
    for blocks in tenant_blocks.values():
        live_tenants.update(blocks)
    latest: dict[tuple[int, int], Sequence[bytes]] = {}
    best = len(live_tenants)
    for turn, hs in zip(turns, hashes, strict=True):
        latest[turn.conversation] = hs
        live = set(live_tenants)
        for held in latest.values():
            live.update(held)
        best = max(best, len(live))
        if turn.turn == turns_per - 1:
            del latest[turn.conversation]
    return best


# -- figures from the answers ----------------------------------------------------------------------


TIERS = ("memory", "disk", "redis")


def tier_shares(answers: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Shares of all prompt tokens restored from each tier, and ``recomputed`` (the rest)."""
    prompt = sum(int(a["prompt_tokens"]) for a in answers)
    if not prompt:
        return {t: 0.0 for t in (*TIERS, "recomputed")}
    out = {t: sum(int(a["cached_by_tier"].get(t, 0)) for a in answers) / prompt for t in TIERS}
    out["recomputed"] = 1.0 - sum(out.values())
    return out


def load_balance(answers: Sequence[Mapping[str, Any]], replicas: Sequence[str]) -> dict[str, Any]:
    """Requests per replica (every replica listed, idle ones too) and the busiest over the mean."""
    counts = {r: 0 for r in replicas}
    for a in answers:
        counts[a["replica"]] = counts.get(a["replica"], 0) + 1
    mean = sum(counts.values()) / len(counts) if counts else 0.0
    return {"requests": counts, "busiest_over_mean": max(counts.values()) / mean if mean else float("nan")}


def moved_turns(answers: Sequence[Mapping[str, Any]]) -> int:
    """Requests (turn 1 on) answered by another replica than their conversation's previous turn,
    in send order (``sent_s``)."""
    last: dict[tuple[int, int], str] = {}
    moved = 0
    for a in sorted(answers, key=lambda a: (a["sent_s"], a["turn"])):
        conv = (a["tenant"], a["user"])
        if conv in last and last[conv] != a["replica"]:
            moved += 1
        last[conv] = a["replica"]
    return moved


def ttft_figures(answers: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    ttft = [float(a["ttft_s"]) for a in answers]
    overhead = [float(a["ttft_s"]) - float(a["server_ttft_s"]) for a in answers]
    return {
        "p50": percentile(ttft, 50),
        "p90": percentile(ttft, 90),
        "mean": sum(ttft) / len(ttft) if ttft else float("nan"),
        "outside_engine_p50": percentile(overhead, 50),
    }
