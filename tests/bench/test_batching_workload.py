"""The batching bench's pure helpers: the multi-user script, percentiles and the figures read off
step timestamps (no model, no timing: benchmarks are never timed tests)."""

from __future__ import annotations

import math

import pytest

from bench.batching_report import recommend
from bench.batching_workload import (
    StepStamp,
    UsersParams,
    gaps_between,
    percentile,
    steady_decode,
    throughput,
    users_script,
)


def test_same_seed_same_script_other_variant_new_questions_same_system() -> None:
    p = UsersParams(users=3, rounds=2, system_words=20)
    assert users_script(p) == users_script(p)
    other = users_script(p, variant=1)
    assert other.system == users_script(p).system
    assert other.turns != users_script(p).turns
    # Another user count asks other questions too (no run hits a cache another one filled).
    assert users_script(UsersParams(users=4, rounds=2, system_words=20)).turns[0] != users_script(p).turns[0]


def test_messages_grow_with_the_history() -> None:
    script = users_script(UsersParams(users=2, rounds=3, system_words=10))
    first, third = script.messages(1, 0), script.messages(1, 2)
    assert first == [("system", script.system), ("user", script.turns[1][0][0])]
    assert [role for role, _ in third] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert third[:2] == first  # every round extends the previous prompt
    assert third[2] == ("assistant", script.turns[1][0][1])


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([3.0], 50, 3.0),
        ([1.0, 2.0, 3.0, 4.0], 50, 2.5),
        ([1.0, 2.0, 3.0, 4.0, 5.0], 95, 4.8),
        ([5.0, 1.0], 0, 1.0),
    ],
)
def test_percentile_interpolates_like_numpy(values: list[float], q: float, expected: float) -> None:
    assert percentile(values, q) == pytest.approx(expected)


def test_percentile_edges() -> None:
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def _steps(*rows: tuple[float, int, int]) -> list[StepStamp]:
    return [StepStamp(t, tokens, requests, min(tokens, requests)) for t, tokens, requests in rows]


def test_steady_decode_counts_only_full_decode_steps() -> None:
    # A prefill step (40 tokens), then full steps of 4 requests every 0.1 s, then a partial tail.
    stamps = _steps((0.0, 40, 4), (0.1, 4, 4), (0.2, 4, 4), (0.3, 4, 4), (0.5, 2, 2))
    tok_s, k = steady_decode(stamps, 4)
    assert k == 3
    assert tok_s == pytest.approx(4 * 2 / 0.2)
    assert math.isnan(steady_decode(stamps[:2], 4)[0])


def test_gaps_between_counts_the_step_that_straddles_the_start() -> None:
    stamps = _steps((1.0, 8, 8), (1.1, 8, 8), (1.4, 136, 9), (1.7, 136, 9), (1.8, 8, 8))
    assert gaps_between(stamps, 1.15, 1.7) == pytest.approx([0.3, 0.3])
    assert gaps_between(stamps, 0.0, 0.5) == []


def test_throughput_spans_first_start_to_last_end() -> None:
    assert throughput(100, [1.0, 2.0], [3.0, 6.0]) == pytest.approx(20.0)
    assert math.isnan(throughput(1, [], []))


def test_recommendation_rules() -> None:
    def decode(tok_s: float) -> dict[str, list[dict[str, float]]]:
        return {"engine": [{"tok_s": tok_s}], "ceiling": [{"tok_s": tok_s}]}

    def budget(ttft: float, worst: float) -> list[dict[str, float]]:
        return [{"long_ttft_ms": ttft, "gap_during_max_ms": worst}]

    results = {
        "decode": {
            "by_batch": {"4": decode(100.0), "16": decode(200.0), "32": decode(290.0), "48": decode(300.0)}
        },
        # 128 -> 256 saves 700 ms for 50 ms more stall; 256 -> 512 saves 150 ms for 200 ms more: stop.
        "budgets": {
            "by_budget": {
                "512": budget(1150.0, 400.0),
                "128": budget(2000.0, 150.0),
                "256": budget(1300.0, 200.0),
            }
        },
    }
    rec = recommend(results)
    assert rec["max_batch"] == 32  # within 5% of the best (48)
    assert rec["max_batch_tokens"] == 256
