"""The agent-loop bench: its script and token arithmetic, and one quick real run (the qwen family
against a live server) whose figures are checked, never its timings."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import pytest

from bench.agent_bench import QUICK_ROUNDS, REPORT_DIR, run_bench
from bench.agent_bench import config_from_args as parse
from bench.agent_measure import Lineage, totals
from bench.agent_report import BenchConfig, write_report
from bench.agent_script import FAMILIES, schedule, tool_result


@pytest.mark.parametrize(
    ("rounds", "kinds"),
    [
        (1, ["call"]),
        (3, ["call", "call", "answer", "call"]),
        (6, ["call", "call", "answer", "call", "call", "call", "answer", "call"]),
    ],
)
def test_schedule_puts_an_answer_and_a_user_message_before_every_third_round(
    rounds: int, kinds: list[str]
) -> None:
    steps = schedule(rounds)
    assert [s.kind for s in steps] == kinds
    calls = [s for s in steps if s.kind == "call"]
    assert [s.round for s in calls] == list(range(rounds))
    assert [s.tool for s in calls] == [("get_weather", "search")[r % 2] for r in range(rounds)]
    answers = [s for s in steps if s.kind == "answer"]
    assert all(s.user for s in answers) and all(s.user is None for s in calls)


def test_schedule_refuses_no_rounds() -> None:
    with pytest.raises(ValueError):
        schedule(0)


def test_tool_results_are_deterministic_json_of_the_arguments() -> None:
    weather = tool_result("get_weather", '{"city": "Lima", "days": 2}', 4)
    assert weather == tool_result("get_weather", '{"city": "Lima", "days": 2}', 4)
    assert json.loads(weather) == {"city": "Lima", "sky": "cloudy", "high_c": 19}
    assert json.loads(tool_result("search", '{"query": "museum"}', 1))["query"] == "museum"


def test_lineage_counts_whole_blocks_of_the_longest_earlier_prefix() -> None:
    lineage = Lineage(block=4)
    assert lineage.measure([1, 2, 3]) == (0, 0, 0)
    # prompt 0..9; its rendered history goes on with 10, 11; the engine was fed 0..9, 99, 98.
    lineage.add(list(range(10)), list(range(12)), [*range(10), 99, 98])
    longest, reusable, alone = lineage.measure([*range(12), 50, 51])
    assert (longest, reusable, alone) == (12, 12, 8)
    # A prompt re-rendered from token 5 on: only the first whole block is reusable.
    assert lineage.measure([0, 1, 2, 3, 4, 77, 78, 79, 80]) == (5, 4, 4)


def test_the_command_line() -> None:
    quick = parse(["--quick"])
    assert quick.rounds == QUICK_ROUNDS and quick.out is None and len(quick.families) == len(FAMILIES)
    full = parse([])
    assert full.rounds == 8 and full.out == REPORT_DIR
    assert [f.name for f in parse(["--families", "qwen,mistral"]).families] == ["qwen", "mistral"]
    with pytest.raises(SystemExit):
        parse(["--families", "nope"])


def test_a_quick_run_of_the_qwen_loop_reuses_its_history(tmp_path: Path) -> None:
    qwen = next(f for f in FAMILIES if f.name == "qwen")
    result = run_bench(BenchConfig(rounds=QUICK_ROUNDS, families=(qwen,), out=tmp_path, quick=True))
    write_report(result)
    figures = result.figures["qwen"]
    assert [f.step.kind for f in figures] == [s.kind for s in schedule(QUICK_ROUNDS)]

    # The prompts grow, and every request after the first finds a prefix of earlier ones.
    assert all(b.prompt_tokens > a.prompt_tokens for a, b in pairwise(figures))
    assert figures[0].cached_tokens == 0 and figures[0].reusable == 0
    for f in figures[1:]:
        assert f.cached_tokens > 0, f
        assert f.reusable % 16 == 0 and 0 < f.reusable < f.prompt_tokens, f
        assert f.engine_alone <= f.longest_match and f.divergence is None, f  # qwen keeps history
        assert f.miss_reason == "diverged" and f.miss_block == f.cached_tokens // 16, f

    # After a tool call the server warmed the next round: all that is reusable is cached, which
    # is more than the engine alone keeps (the prompt + the ids it generated).
    after_calls = [b for a, b in pairwise(figures) if a.step.kind == "call"]
    assert after_calls and all(f.cached_tokens == f.reusable for f in after_calls), after_calls
    assert any(f.cached_tokens > f.engine_alone for f in after_calls), after_calls

    t = totals(figures)
    assert t.reuse >= 0.95, t
    # The report carries exactly these figures.
    report = (tmp_path / "agent.md").read_text()
    row = f"| qwen | {t.requests} | {t.prompt} | {t.reusable} | {t.cached} | {t.reuse:.3f} | {t.hit:.3f} |"
    assert row in report
    assert "`python -m bench.agent_bench --quick`" in report and "Machine:" in report
    for i, f in enumerate(figures):
        assert f"| {i} | " in report and f"| {f.prompt_tokens} | {f.reusable} | {f.cached_tokens} |" in report
