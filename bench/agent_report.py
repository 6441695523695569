"""The agent bench's run records and its markdown report (see ``bench.agent_bench``)."""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.agent_measure import RequestFigures, totals
from bench.agent_script import BLOCK, CONTEXT, USER_EVERY, Family
from bench.grammar_bench import cpu_name

COMMAND = "python -m bench.agent_bench"


@dataclass(frozen=True)
class BenchConfig:
    rounds: int
    families: tuple[Family, ...]
    out: Path | None
    quick: bool


@dataclass(frozen=True)
class BenchResult:
    config: BenchConfig
    figures: dict[str, list[RequestFigures]]
    seconds: float


def _ratio(value: float) -> str:
    return f"{value:.3f}"


def _code(text: str) -> str:
    return "`" + text.replace("`", "'").replace("|", "\\|").replace("\n", "\\n") + "`"


def _reasons(counts: dict[str, int]) -> str:
    return ", ".join(f"{reason} ×{n}" for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def _where(f: RequestFigures) -> str:
    if f.divergence is None:
        return "extends it"
    d = f.divergence
    return f"token {d.token} (block {d.block}): after {_code(d.context)}, {_code(d.before)} → {_code(d.now)}"


def findings(figures: Sequence[RequestFigures]) -> list[str]:
    """One line per request that re-rendered history or left reusable tokens uncached."""
    lines = []
    for i, f in enumerate(figures):
        if f.divergence is not None:
            d = f.divergence
            lines.append(
                f"- request {i}: the template re-rendered history: this prompt leaves the previous one at"
                f" token {d.token} (block {d.block}); the server's match ended at block {f.miss_block}"
                f" ({f.miss_reason}); the longest match with anything earlier ends at token"
                f" {f.longest_match} (block {f.longest_match // BLOCK})"
                + (
                    ", past the divergence: an earlier request's history renders the changed turn"
                    " as it is now, up to there."
                    if f.longest_match > d.token
                    else "."
                )
            )
        elif f.cached_tokens < f.reusable:
            after = figures[i - 1].step.kind if i else "nothing"
            why = "a plain answer, which the server does not warm" if after == "answer" else f"a {after}"
            lines.append(
                f"- request {i}: {f.reusable - f.cached_tokens} reusable tokens not cached (after {why})."
            )
    return lines


def render_report(result: BenchResult) -> str:
    cfg = result.config
    command = COMMAND + (" --quick" if cfg.quick else "")
    lines = [
        "# Agent loop: prefix reuse across tool-calling rounds",
        "",
        f"Command: `{command}`  ",
        f"Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}  ",
        f"Machine: {cpu_name()}, nproc {os.cpu_count()} (shared machine); {result.seconds:.0f} s in all  ",
        f"Script: {cfg.rounds} forced tool calls (named, alternating `get_weather` / `search`), an answer "
        f"and a new user message before every {USER_EVERY}rd round; tiny random models, {CONTEXT} "
        f"positions, block {BLOCK}, one `kvproxy serve --max-batch 1` per family.",
        "",
        "| family | requests | prompt tokens | reusable | cached | cached / reusable (target >= 0.95) "
        "| cached / prompt | engine alone | engine alone / reusable | warming adds | miss reasons |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, figures in result.figures.items():
        t = totals(figures)
        lines.append(
            f"| {name} | {t.requests} | {t.prompt} | {t.reusable} | {t.cached} | {_ratio(t.reuse)} "
            f"| {_ratio(t.hit)} | {t.engine_alone} | {_ratio(t.alone_reuse)} | {t.cached - t.engine_alone} "
            f"| {_reasons(t.miss_reasons)} |"
        )
    for name, figures in result.figures.items():
        lines += [
            "",
            f"## {name}",
            "",
            "| # | request | prompt | reusable | cached | engine alone | miss_reason | miss_block "
            "| longest match (block) | vs the previous prompt |",
            "|---:|---|---:|---:|---:|---:|---|---:|---:|---|",
        ]
        for i, f in enumerate(figures):
            what = f"call {f.step.tool}" if f.step.kind == "call" else "answer"
            lines.append(
                f"| {i} | {what} (round {f.step.round}) | {f.prompt_tokens} | {f.reusable} "
                f"| {f.cached_tokens} | {f.engine_alone} | {f.miss_reason} | {f.miss_block} "
                f"| {f.longest_match} ({f.longest_match // BLOCK}) | {_where(f)} |"
            )
        lines += ["", *(findings(figures) or ["- every request cached all it could reuse."])]
    lines += ["", *NOTES, ""]
    return "\n".join(lines)


NOTES = (
    "Notes:",
    "- reusable = per request, the longest prefix equal to an earlier prompt or to an earlier prompt"
    " followed by its reply as the template renders it in history (with the template's text up to"
    " the next message's content), rounded down to whole blocks; computed by re-rendering every"
    " prompt locally with the served tokenizer and template (its length is checked against"
    " `prompt_tokens`). cached = `usage.prompt_tokens_details.cached_tokens`.",
    "- engine alone = the same against earlier prompts followed by the token ids they generated"
    " (read back from `logprobs`): what the cache holds without the server's warming of the next"
    " round, which has no switch (the proxy was not changed for this bench). warming adds = cached -"
    " engine alone (computed, not measured with warming off): the engine alone holds the prompt and"
    " every generated id but the last, which here loses the call's end and the template's text up to"
    " the tool result (the tiny tokenizer spells `<tool_call>` as plain text either way; with such a"
    " marker as one added token the re-rendered reply would differ from the generated ids at once).",
    "- vs the previous prompt: where the prompt stops extending the previous request's prompt, the"
    " template re-rendered history. Mistral moves `[AVAILABLE_TOOLS]` and the system prompt to the"
    " last user message; Qwen3 drops the thinking of turns before the last user message.",
    "- qwen3-thinking: the client echoes thinking (`reasoning_content`) the server never generated"
    " (a random model cannot think under the call grammar), so the server's warmed history lacks it"
    " and every round re-prefills the previous reply; with a model that thinks, the returned"
    " reasoning is in the warmed prefix. The drop after a new user message is the template's own.",
    "- miss_block is the block where the server's match stopped; it is longest match // block when"
    " the cache held everything the earlier requests determined.",
)


def write_report(result: BenchResult) -> str:
    """The report; written to ``out/agent.md`` when the run has an ``out`` directory."""
    report = render_report(result)
    if result.config.out is not None:
        result.config.out.mkdir(parents=True, exist_ok=True)
        (result.config.out / "agent.md").write_text(report)
    return report
