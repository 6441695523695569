"""The router bench's pure helpers: the multi-tenant workload, its Poisson schedule and the
reuse figures (oracle, placement) computed from block hashes. No model, no timing."""

from __future__ import annotations

import itertools
import math
import statistics
from collections import Counter

import pytest

from bench.route_workload import (
    Prompt,
    RouteParams,
    Turn,
    leading_run,
    load_balance,
    moved_turns,
    oracle_tokens,
    reusable_tokens,
    route_script,
    schedule,
    tier_shares,
    ttft_figures,
    working_set_blocks,
)
from cache_store.hashing import block_hashes, namespace_hash

SMALL = RouteParams(
    tenants=3, system_words=(20, 30), users=2, turns=3, answer_words=(5, 9), open_conversations=3
)
BLOCK = 4
NS = namespace_hash(model_fingerprint="test", block_size=BLOCK, tenant="default")


def prompt(ids: list[int], place: object = 0) -> Prompt:
    return Prompt(place, tuple(block_hashes(ids, BLOCK, NS)), len(ids))


def test_same_seed_same_workload_other_seed_other() -> None:
    assert route_script(SMALL) == route_script(SMALL)
    assert schedule(SMALL) == schedule(SMALL)
    other = RouteParams(**{**SMALL.__dict__, "seed": SMALL.seed + 1})
    assert route_script(other) != route_script(SMALL)
    assert [t.at_s for t in schedule(other)] != [t.at_s for t in schedule(SMALL)]


def test_tenants_have_their_own_system_prompt_and_conversations_grow() -> None:
    script = route_script(SMALL)
    assert len(set(script.systems)) == SMALL.tenants
    # Distinct from the first sentence on (the tenant's name): no two share a first block.
    assert len({s.split(".")[0] for s in script.systems}) == SMALL.tenants
    for t in range(SMALL.tenants):
        for u in range(SMALL.users):
            previous = script.messages(t, u, 0)
            assert previous == [("system", script.systems[t]), ("user", script.exchanges[t][u][0][0])]
            for r in range(1, SMALL.turns):
                now = script.messages(t, u, r)
                assert now[: len(previous)] == previous  # every turn extends the one before
                assert now[len(previous)] == ("assistant", script.exchanges[t][u][r - 1][1])
                assert len(now) == len(previous) + 2
                previous = now
        assert script.warm_messages(t)[0] == ("system", script.systems[t])


def test_schedule_sends_every_turn_in_order_spaced_apart() -> None:
    turns = schedule(SMALL)
    assert len(turns) == SMALL.tenants * SMALL.users * SMALL.turns
    assert all(a.at_s < b.at_s for a, b in itertools.pairwise(turns))
    by_conv: dict[tuple[int, int], list[int]] = {}
    for i, t in enumerate(turns):
        by_conv.setdefault(t.conversation, []).append(i)
        assert t.turn == len(by_conv[t.conversation]) - 1  # turns in order
    assert len(by_conv) == SMALL.tenants * SMALL.users
    # While enough conversations are open, a conversation waits `spacing` arrivals between turns.
    big = RouteParams(tenants=6, users=5, turns=4, open_conversations=6, spacing=3)
    seen: dict[tuple[int, int], int] = {}
    turns = schedule(big)
    for i, t in enumerate(turns[: len(turns) // 2]):
        if t.conversation in seen:
            assert i - seen[t.conversation] > big.spacing
        seen[t.conversation] = i
    # At most `open_conversations` conversations in progress at any time.
    started, ended, open_max = set(), set(), 0
    for t in turns:
        started.add(t.conversation)
        if t.turn == big.turns - 1:
            ended.add(t.conversation)
        open_max = max(open_max, len(started - ended) + (t.turn == big.turns - 1))
    assert open_max <= big.open_conversations


def test_arrivals_are_poisson_at_the_rate() -> None:
    p = RouteParams(tenants=20, users=20, turns=5, rate=3.0)
    gaps = [b.at_s - a.at_s for a, b in zip(schedule(p), schedule(p)[1:], strict=False)]
    assert statistics.mean(gaps) == pytest.approx(1 / 3.0, rel=0.1)
    # Exponential: the standard deviation equals the mean.
    assert statistics.stdev(gaps) == pytest.approx(statistics.mean(gaps), rel=0.15)
    # Every tenant gets its share of requests.
    counts = Counter(t.tenant for t in schedule(p))
    assert set(counts.values()) == {p.users * p.turns}


def test_leading_run_stops_at_the_first_unseen_block() -> None:
    assert leading_run([b"a", b"b", b"c"], {b"a", b"c"}) == 1
    assert leading_run([b"a", b"b"], {b"a", b"b"}) == 2
    assert leading_run([b"x"], set()) == 0


def test_oracle_reuses_the_conversation_and_the_tenants_system_prompt() -> None:
    system = list(range(100, 110))  # 2 full blocks + 2 tokens
    warm = prompt([*system, 1, 2, 3])
    turn0 = prompt([*system, 7, 7, 7, 7, 7, 7])  # 16 tokens: 4 blocks, shares 2 with the warm-up
    turn1 = prompt([*system, 7, 7, 7, 7, 7, 7, 8, 8, 8, 8, 8])  # extends turn0 (21 tokens)
    other_tenant = prompt(list(range(200, 216)))
    got = oracle_tokens([turn0, turn1, other_tenant], BLOCK, earlier=[warm])
    assert got == [2 * BLOCK, 4 * BLOCK, 0]
    # Never the whole prompt: one token is always prefilled.
    again = prompt(list(range(200, 216)))
    assert oracle_tokens([other_tenant, again], BLOCK) == [0, 15]


def test_placement_counts_only_what_went_to_the_same_replica() -> None:
    system = list(range(100, 112))
    first = prompt([*system, 1, 2, 3, 4], place="a")
    same = prompt([*system, 1, 2, 3, 4, 5, 6, 7, 8], place="a")
    elsewhere = prompt([*system, 1, 2, 3, 4, 5, 6, 7, 8, 9], place="b")
    assert reusable_tokens([first, same, elsewhere], BLOCK) == [0, 16, 0]
    # The oracle ignores where requests went.
    assert oracle_tokens([first, same, elsewhere], BLOCK) == [0, 16, 20]


def test_working_set_is_the_tenants_prefixes_and_the_open_conversations() -> None:
    system = [b"s1", b"s2"]
    turns = [Turn(0.0, 0, 0, 0), Turn(1.0, 0, 1, 0), Turn(2.0, 0, 0, 1), Turn(3.0, 0, 1, 1)]
    hashes = [[*system, b"a1"], [*system, b"b1"], [*system, b"a1", b"a2"], [*system, b"b1", b"b2"]]
    # After turn 2: s1 s2 a1 a2 b1 (conversation 0 ends there); then s1 s2 b1 b2.
    assert working_set_blocks(turns, hashes, 2, {0: system}) == 5


def test_tier_shares_and_load_balance() -> None:
    answers = [
        {"prompt_tokens": 100, "cached_by_tier": {"memory": 60, "disk": 20}, "replica": "a"},
        {"prompt_tokens": 100, "cached_by_tier": {"redis": 40}, "replica": "a"},
        {"prompt_tokens": 200, "cached_by_tier": {}, "replica": "b"},
    ]
    shares = tier_shares(answers)
    assert shares == pytest.approx({"memory": 0.15, "disk": 0.05, "redis": 0.1, "recomputed": 0.7})
    load = load_balance(answers, ["a", "b", "c"])
    assert load["requests"] == {"a": 2, "b": 1, "c": 0}
    assert load["busiest_over_mean"] == pytest.approx(2.0)
    assert math.isnan(load_balance([], [])["busiest_over_mean"])


def test_moved_turns_follow_each_conversation_in_send_order() -> None:
    def answer(tenant: int, user: int, turn: int, sent: float, replica: str) -> dict[str, object]:
        return {"tenant": tenant, "user": user, "turn": turn, "sent_s": sent, "replica": replica}

    answers = [
        answer(0, 0, 1, 2.0, "b"),  # moved from a
        answer(0, 0, 0, 1.0, "a"),
        answer(0, 1, 0, 1.5, "b"),
        answer(0, 1, 1, 3.0, "b"),
        answer(0, 0, 2, 4.0, "b"),
    ]
    assert moved_turns(answers) == 1


def test_the_report_puts_every_arm_and_target_in_its_tables() -> None:
    from bench.route_bench import plan
    from bench.route_report import ARMS, CONFIGS, render, summarize

    assert plan(True).workload.system_words[1] < plan(False).workload.system_words[0]

    def run(arm: str, ttft: float) -> dict[str, object]:
        answers = [
            {
                "tenant": 0,
                "user": 0,
                "turn": i,
                "sent_s": float(i),
                "replica": "a" if arm != "round-robin" or i % 2 else "b",
                "ttft_s": ttft * (1 + i),
                "server_ttft_s": ttft,
                "prompt_tokens": 100,
                "cached_by_tier": {"memory": 50},
            }
            for i in range(3)
        ]
        per_replica = {"a": {arm: 3.0, "cached_tokens": 150.0}, "b": {}}
        return {
            "answers": answers,
            "ttft": ttft_figures(answers),
            "load": {"requests": {"a": 0, "b": 0}},
            "placement_share": 0.5,
            "moved_turns": 0,
            "decisions": {"by_reason": {arm: 3.0}, "per_replica": per_replica},
        }

    ttft = {"round-robin": 0.2, "least-loaded": 0.15, "route": 0.1}
    results = {
        "replicas": 2,
        "block_size": 32,
        "workload": {
            "tenants": 1,
            "system_tokens_min": 90,
            "system_tokens_max": 90,
            "conversations": 1,
            "turns": 3,
            "requests": 3,
            "prompt_tokens_min": 100,
            "prompt_tokens_max": 100,
            "rate": 1.0,
            "working_set_mib": 1.0,
            "memory_mib": 0.75,
            "oracle_memory_share": 0.6,
        },
        "configs": {c: {"runs": {arm: [run(arm, ttft[arm])] for arm in ARMS}} for c in CONFIGS},
    }
    results["summary"] = summarize(results)
    assert results["summary"]["memory+disk"]["route_ttft_p50_vs_round_robin"] == pytest.approx(0.5)
    assert results["summary"]["memory+disk+redis"]["route_memory_vs_oracle"] == pytest.approx(0.5 / 0.6)
    table = render(results)
    for config in CONFIGS:
        for arm in ARMS:
            assert f"| {config} | {arm} |" in table
    assert "| memory+disk: route TTFT p50 / round-robin <= 0.6 | 0.500 | yes |" in table
    assert "| Redis: route memory share / oracle >= 0.9 | 0.833 | **no** |" in table
