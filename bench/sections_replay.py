"""Replayed workloads: long-document QA, shared-prefix fan-out, a cold restart, multi-round chat.

Every request goes through every arm (rotated order) before the next one starts; each server arm
keeps its cache across the replay, the recipe keeps one prefilled cache per group (its first use
paying the prefill), the baseline prefills everything every time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bench.arms import Arm, Prepared, ServerArm, run_rotated
from bench.context import BenchContext
from bench.server_proc import Sample
from bench.stats import ceiling, hit_rate, paired_ratios, summary, tier_tokens
from bench.workloads import ChatScript, Request, common_prefix, reusable_tokens


def prepare(ctx: BenchContext, requests: Sequence[Request]) -> list[Prepared]:
    """Token ids per request, and per group the exact prefix all its requests share (what the
    recipe would prefill once; at most one token short of the group's shortest prompt)."""
    ids = [ctx.tokens.of(r.prompt, r.messages) for r in requests]
    shared: dict[str, int] = {}
    first: dict[str, tuple[int, ...]] = {}
    for r, i in zip(requests, ids, strict=True):
        if r.group not in first:
            first[r.group], shared[r.group] = i, len(i) - 1
        shared[r.group] = min(shared[r.group], common_prefix(first[r.group], i), len(i) - 1)
    return [
        Prepared(i, r.group, shared[r.group], prompt=r.prompt, messages=r.messages)
        for r, i in zip(requests, ids, strict=True)
    ]


def replay(arms: Sequence[Arm], requests: Sequence[Prepared], max_tokens: int = 1) -> dict[str, list[Sample]]:
    out: dict[str, list[Sample]] = {a.name: [] for a in arms}
    for turn, request in enumerate(requests):
        for name, sample in run_rotated(arms, request, turn, max_tokens).items():
            out[name].append(sample)
    return out


def first_in_group(requests: Sequence[Prepared]) -> list[bool]:
    seen: set[str] = set()
    flags = []
    for r in requests:
        flags.append(r.group not in seen)
        seen.add(r.group)
    return flags


def summarize(samples: dict[str, list[Sample]], requests: Sequence[Prepared], block: int) -> dict[str, Any]:
    """Per arm: TTFT of the group's first request and of the rest, hit rate, the whole replay's
    TTFT sum and its speedup over the baseline next to the ceiling the cached tokens allow."""
    firsts = first_in_group(requests)
    base = samples["baseline"]
    base_sum = sum(s.ttft_s for s in base)
    allowed = [
        reusable_tokens(r.ids, [q.ids for q in requests[:i]], block)[1] for i, r in enumerate(requests)
    ]
    out: dict[str, Any] = {
        "requests": len(requests),
        "groups": sum(firsts),
        "prompt_tokens": summary([len(r.ids) for r in requests]),
        "block_allowed_hit_rate": sum(allowed) / sum(len(r.ids) for r in requests),
    }
    for name, ss in samples.items():
        out[name] = {
            "ttft_first": summary([s.ttft_s for s, f in zip(ss, firsts, strict=True) if f]),
            "ttft_repeat": summary([s.ttft_s for s, f in zip(ss, firsts, strict=True) if not f]),
            "server_ttft_repeat": summary(
                [s.server_ttft_s for s, f in zip(ss, firsts, strict=True) if not f]
            ),
            "ttft_sum_s": sum(s.ttft_s for s in ss),
            "speedup": base_sum / sum(s.ttft_s for s in ss),
            "ceiling": ceiling(ss),
            "hit_rate": hit_rate(ss),
            "tier_tokens": tier_tokens(ss),
            "repeat_vs_baseline": paired_ratios(
                [s.ttft_s for s, f in zip(ss, firsts, strict=True) if not f],
                [s.ttft_s for s, f in zip(base, firsts, strict=True) if not f],
            ),
        }
    return out


def run_replay(
    ctx: BenchContext, requests: Sequence[Prepared], arms: Sequence[Arm], label: str
) -> dict[str, Any]:
    samples = replay(arms, requests)
    print(f"  {label}: {len(requests)} requests done", flush=True)
    return summarize(samples, requests, ctx.block)


# -- multi-round chat ------------------------------------------------------------------------------


def run_chat(
    ctx: BenchContext, script: ChatScript, server_arms: Sequence[ServerArm], answer_tokens: int
) -> dict[str, Any]:
    """Users take turns, round by round; each prompt holds the shared system prompt and the user's
    whole history, including the assistant's own answers (from the first server arm; the others
    must answer the same, greedy decoding on the same model). The recipe caches the system
    prompt part that every conversation shares."""
    users, rounds = len(script.user_turns), len(script.user_turns[0])
    openers = [ctx.tokens.chat([("system", script.system), ("user", t[0])]) for t in script.user_turns]
    recipe_prefix = (
        min(common_prefix(openers[0], o) for o in openers[1:]) if users > 1 else len(openers[0]) - 1
    )
    arms: list[Arm] = [ctx.baseline, ctx.recipe, *server_arms]
    history: list[list[tuple[str, str]]] = [[] for _ in range(users)]
    earlier: list[tuple[int, ...]] = []
    per_round: list[dict[str, list[Sample]]] = [{a.name: [] for a in arms} for _ in range(rounds)]
    allowed: list[tuple[int, int, int]] = []  # (round, true common prefix, block-reusable part)
    mismatches = 0
    turn = 0
    for r in range(rounds):
        for u in range(users):
            messages = (("system", script.system), *history[u], ("user", script.user_turns[u][r]))
            ids = ctx.tokens.chat(messages)
            common, reusable = reusable_tokens(ids, earlier, ctx.block)
            allowed.append((r, common, reusable))
            earlier.append(ids)
            request = Prepared(ids, "system", recipe_prefix, messages=tuple(messages))
            got = run_rotated(arms, request, turn, answer_tokens)
            turn += 1
            for name, sample in got.items():
                per_round[r][name].append(sample)
            answer = got[server_arms[0].name].text
            mismatches += sum(got[a.name].text != answer for a in server_arms[1:])
            history[u] += [("user", script.user_turns[u][r]), ("assistant", answer)]
        print(f"  chat round {r + 1}/{rounds} done", flush=True)
    out: dict[str, Any] = {
        "answer_mismatches": mismatches,
        "rounds": [],
        "recipe_prefix_tokens": recipe_prefix,
    }
    for r in range(rounds):
        row: dict[str, Any] = {
            "prompt_tokens": summary([s.prompt_tokens for s in per_round[r]["baseline"]]),
            "allowed": sum(a[2] for a in allowed if a[0] == r),
            "common": sum(a[1] for a in allowed if a[0] == r),
        }
        for name, ss in per_round[r].items():
            row[name] = {"ttft": summary([s.ttft_s for s in ss]), "cached": sum(s.cached_tokens for s in ss)}
        out["rounds"].append(row)
    total_allowed = sum(a[2] for a in allowed)
    total_common = sum(a[1] for a in allowed)
    all_samples = {name: [s for rr in per_round for s in rr[name]] for name in per_round[0]}
    base_sum = sum(s.ttft_s for s in all_samples["baseline"])
    for name, ss in all_samples.items():
        cached = sum(s.cached_tokens for s in ss)
        out[name] = {
            "hit_rate": hit_rate(ss),
            "cached_vs_block_allowed": cached / total_allowed if total_allowed else float("nan"),
            "cached_vs_common_prefix": cached / total_common if total_common else float("nan"),
            "speedup": base_sum / sum(s.ttft_s for s in ss),
            "ceiling": ceiling(ss),
        }
    out["block_allowed_hit_rate"] = total_allowed / sum(s.prompt_tokens for s in all_samples["baseline"])
    return out
