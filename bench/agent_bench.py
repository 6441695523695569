"""The agent loop: how much of a tool-calling conversation the prefix cache serves, per template.

``python -m bench.agent_bench [--quick] [--out DIR] [--families qwen,llama3]``

For each template family (``tests/support/chat_templates.py``) a tiny random model (4096
positions) is served by its own ``kvproxy serve``. A scripted agent sends the whole conversation
every time: a named ``tool_choice`` (alternating between two tools) makes the random model write a
real call; the client appends the assistant message exactly as returned and a deterministic JSON
result, and sends again. Every third round the agent first asks for a plain answer and the user
says something new. Everything is counted in tokens (no timings), from ``usage``:
``prompt_tokens``, ``cached_tokens`` and ``usage.kvproxy.miss_reason`` / ``miss_block``.

The client re-renders every prompt locally (the served tokenizer, ``ChatTemplate`` and the
server's own message conversion; checked against ``prompt_tokens``) and computes, per request:

- *reusable*: the longest prefix equal to something an earlier request determined, in whole
  blocks: an earlier prompt, or an earlier prompt followed by its reply as the template renders
  it in history (with the template's text up to the next message's content, unless that next
  message re-renders the history: then just the prompt followed by the generated text);
- *engine alone*: the longest prefix equal to an earlier prompt followed by the token ids it
  generated (from ``logprobs``), in whole blocks: what the cache holds without the server's
  warming of the next round (which cannot be switched off; this is the stand-in);
- where the prompt stops extending the previous one (the template re-rendered history).

``qwen3-thinking``: the client echoes a ``reasoning_content`` of its own on every assistant
message (the random model cannot think under the call grammar), as vLLM/DeepSeek clients send
thinking back; the template drops it from turns before a new user message.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from bench.grammar_bench import cpu_name
from bench.server_proc import Server
from bench.workloads import common_prefix, reusable_tokens
from model_runner.chat_template import ChatTemplate
from model_runner.detokenize import TokenPieces
from proxy.chat_plan import template_messages
from proxy.schemas import ChatMessage
from tests.support.chat_templates import (
    LLAMA3_TOOLS,
    MISTRAL_TOOLS,
    QWEN3_THINKING,
    QWEN_TOOLS,
    save_tiny_model_with_template,
)

REPORT_DIR = Path(__file__).resolve().parent.parent / "docs" / "bench"
COMMAND = "python -m bench.agent_bench"
MODEL = "tiny"
BLOCK = 16
CONTEXT = 4096
FULL_ROUNDS = 8
QUICK_ROUNDS = 3
USER_EVERY = 3
CALL_MAX_TOKENS = 200
ANSWER_MAX_TOKENS = 12
SENTINEL = "@@agent-bench-next-message@@"
"""Content of the message after a reply when rendering what the reply leaves in history."""


@dataclass(frozen=True)
class Family:
    name: str
    template: str
    model_kind: str
    """A ``tests.support.tiny_models.TINY_MODELS`` key."""
    echoes_reasoning: bool = False


FAMILIES = (
    Family("qwen", QWEN_TOOLS, "qwen2"),
    Family("llama3", LLAMA3_TOOLS, "llama"),
    Family("mistral", MISTRAL_TOOLS, "mistral"),
    Family("qwen3-thinking", QWEN3_THINKING, "qwen2", echoes_reasoning=True),
)

SYSTEM = "You are a travel agent. Use one tool at a time, then answer in one sentence."
USERS = (
    "Plan three days in Paris for me.",
    "Now compare it with Lima next week.",
    "Which one should I pick, and what do I pack?",
    "Book nothing yet; summarize the plan.",
)
TOOLS: tuple[dict[str, Any], ...] = (
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Forecast for a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "enum": ["Paris", "Lima", "Tokyo"]},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                },
                "required": ["city", "days"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search travel notes.",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string", "pattern": "^[a-z]{1,10}$"}},
                "required": ["query"],
                "additionalProperties": False,
            },
        },
    },
)


# -- the script (pure) ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One request: ``call`` forces ``tool``; ``answer`` asks for text (``tool_choice: none``) and
    is followed by the user message ``user``."""

    kind: Literal["call", "answer"]
    round: int
    tool: str | None = None
    user: str | None = None


def schedule(rounds: int, user_every: int = USER_EVERY) -> tuple[Step, ...]:
    """``rounds`` forced calls alternating between the tools; before every ``user_every``-th round
    (the 3rd, 6th...) an answer and a new user message."""
    if rounds < 1 or user_every < 1:
        raise ValueError(f"rounds and user_every must be positive, got {rounds}, {user_every}")
    steps: list[Step] = []
    for r in range(rounds):
        if r % user_every == user_every - 1:
            user = USERS[(r // user_every + 1) % len(USERS)]
            steps.append(Step("answer", r, user=user))
        steps.append(Step("call", r, tool=TOOLS[r % len(TOOLS)]["function"]["name"]))
    return tuple(steps)


def tool_result(name: str, arguments: str, round_index: int) -> str:
    """The tool's deterministic short JSON answer."""
    args = json.loads(arguments)
    if name == "get_weather":
        sky = ("sunny", "cloudy", "rain")[round_index % 3]
        return json.dumps({"city": args.get("city"), "sky": sky, "high_c": 15 + round_index})
    return json.dumps({"query": args.get("query"), "hits": [f"note{round_index}a", f"note{round_index}b"]})


def reasoning_for(step: Step) -> str:
    """What the qwen3-thinking client echoes as the turn's thinking."""
    if step.kind == "call":
        return f"Round {step.round}: I still need facts, so I call {step.tool}."
    return "I have enough to answer briefly."


def request_body(messages: list[dict[str, Any]], step: Step) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": messages,
        "tools": list(TOOLS),
        "temperature": 1.0,
        "seed": 1000 + step.round,
        "logprobs": True,
    }
    if step.kind == "call":
        body["tool_choice"] = {"type": "function", "function": {"name": step.tool}}
        body["max_tokens"] = CALL_MAX_TOKENS
    else:
        body["tool_choice"] = "none"
        body["max_tokens"] = ANSWER_MAX_TOKENS
    return body


# -- prompts as the server renders them ------------------------------------------------------------


class LocalRender:
    """The served model's prompts rendered here, the way the server does (``template_messages``,
    ``normalize_messages``, ``render`` with the tools), and generated token ids read back from
    logprobs (each entry's bytes name its token)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.template = ChatTemplate(tokenizer)
        self._tokenizer = tokenizer
        pieces = TokenPieces(tokenizer)
        self._by_bytes: dict[bytes, int] = {}
        for token_id in range(len(tokenizer)):
            self._by_bytes.setdefault(pieces.piece(token_id)[1], token_id)

    def text(self, messages: Sequence[dict[str, Any]]) -> str:
        parsed = [ChatMessage.model_validate(m) for m in messages]
        normalized = self.template.normalize_messages(template_messages(parsed, self.template))
        return self.template.render(normalized, tools=list(TOOLS))

    def ids(self, text: str) -> list[int]:
        return self.template.tokenize(text)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=False))

    def generated(self, entries: Sequence[dict[str, Any]]) -> tuple[list[int], str]:
        """Token ids and text of a choice's ``logprobs.content``."""
        raw = [bytes(e["bytes"]) for e in entries]
        return [self._by_bytes[b] for b in raw], b"".join(raw).decode("utf-8", errors="replace")

    def history_after(
        self, messages: list[dict[str, Any]], reply: dict[str, Any], prompt_text: str, generated_text: str
    ) -> list[int]:
        """The prompt followed by ``reply`` as later prompts render it, up to where the next
        message's content goes (a tool result after calls, else a user message). When that next
        message re-renders earlier history (the prompt is no longer its start), only the prompt
        followed by the generated text."""
        calls = reply.get("tool_calls") or []
        following = [{"role": "tool", "tool_call_id": c["id"], "content": SENTINEL} for c in calls] or [
            {"role": "user", "content": SENTINEL}
        ]
        text = self.text([*messages, reply, *following])
        if text.startswith(prompt_text) and SENTINEL in text:
            return self.ids(text[: text.index(SENTINEL)])
        return self.ids(prompt_text + generated_text)


# -- figures ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Divergence:
    """Where a prompt stops extending the previous prompt: ``token`` (in block ``token //
    BLOCK``), a few tokens before it (``context``) and a few of each prompt from there."""

    token: int
    context: str
    before: str
    now: str

    @property
    def block(self) -> int:
        return self.token // BLOCK


@dataclass(frozen=True)
class RequestFigures:
    step: Step
    prompt_tokens: int
    cached_tokens: int
    reusable: int
    """Whole blocks equal to a prefix an earlier request determined (module docstring)."""
    engine_alone: int
    """Whole blocks equal to an earlier prompt + its generated token ids."""
    longest_match: int
    """Tokens (not rounded) equal to a prefix an earlier request determined."""
    miss_reason: str | None
    miss_block: int | None
    divergence: Divergence | None


class Lineage:
    """What the earlier requests of one conversation left: the token sequences a later prompt may
    start with (``seen``: prompts and their rendered replies) and what the engine alone caches
    (``fed``: prompts + generated ids the model was fed)."""

    def __init__(self, block: int) -> None:
        self.block = block
        self.seen: list[list[int]] = []
        self.fed: list[list[int]] = []

    def measure(self, ids: list[int]) -> tuple[int, int, int]:
        """``(longest match with seen, reusable, engine alone)`` of a new prompt."""
        longest, reusable = reusable_tokens(ids, self.seen, self.block)
        _, alone = reusable_tokens(ids, self.fed, self.block)
        return longest, reusable, alone

    def add(self, prompt: list[int], history: list[int], fed: list[int]) -> None:
        self.seen += [prompt, history]
        self.fed.append(fed)


def divergence(render: LocalRender, previous: list[int] | None, ids: list[int]) -> Divergence | None:
    """Where ``ids`` stops extending ``previous`` (None when it extends it all)."""
    if previous is None:
        return None
    at = common_prefix(previous, ids)
    if at >= len(previous):
        return None
    return Divergence(
        at,
        render.decode(ids[max(at - 4, 0) : at]),
        render.decode(previous[at : at + 6]),
        render.decode(ids[at : at + 6]),
    )


def client_reply(reply: dict[str, Any], step: Step, family: Family) -> dict[str, Any]:
    """The assistant message the client sends back: as returned (plus its own thinking)."""
    message = dict(reply)
    if family.echoes_reasoning:
        message["reasoning_content"] = reasoning_for(step)
    return message


def post_step(server: Server, family: Family, messages: list[dict[str, Any]], step: Step) -> dict[str, Any]:
    """The first choice of ``step``'s request, with the response's ``usage``; raises RuntimeError
    on an HTTP error or a forced call that did not come back."""
    response = server.client.post("/v1/chat/completions", json=request_body(messages, step))
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
    data = response.json()
    choice = data["choices"][0]
    names = [c["function"]["name"] for c in choice["message"].get("tool_calls") or []]
    if step.kind == "call" and (choice["finish_reason"] != "tool_calls" or names != [step.tool]):
        raise RuntimeError(
            f"{family.name}: round {step.round} did not return a call of {step.tool}: {choice}"
        )
    return {**choice, "usage": data["usage"]}


def run_family(
    server: Server, family: Family, render: LocalRender, steps: Sequence[Step]
) -> list[RequestFigures]:
    """Drive one conversation through ``server``; raises RuntimeError when the server's prompt is
    not the one rendered here or a request failed."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": USERS[0]},
    ]
    lineage = Lineage(BLOCK)
    previous: list[int] | None = None
    figures = []
    for step in steps:
        choice = post_step(server, family, messages, step)
        usage, reply = choice["usage"], choice["message"]
        prompt_text = render.text(messages)
        ids = render.ids(prompt_text)
        if len(ids) != usage["prompt_tokens"]:
            raise RuntimeError(f"rendered {len(ids)} prompt tokens here, the server {usage['prompt_tokens']}")
        longest, reusable, alone = lineage.measure(ids)
        extra = usage.get("kvproxy") or {}
        figures.append(
            RequestFigures(
                step=step,
                prompt_tokens=len(ids),
                cached_tokens=int(usage["prompt_tokens_details"]["cached_tokens"]),
                reusable=reusable,
                engine_alone=alone,
                longest_match=longest,
                miss_reason=extra.get("miss_reason"),
                miss_block=extra.get("miss_block"),
                divergence=divergence(render, previous, ids),
            )
        )
        generated, generated_text = render.generated((choice.get("logprobs") or {}).get("content") or [])
        # The engine fed the model every generated token but the last.
        fed = ids + generated[: max(int(usage["completion_tokens"]) - 1, 0)]
        lineage.add(ids, render.history_after(messages, reply, prompt_text, generated_text), fed)
        previous = ids
        messages.append(client_reply(reply, step, family))
        for call in reply.get("tool_calls") or []:
            content = tool_result(call["function"]["name"], call["function"]["arguments"], step.round)
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": content})
        if step.user is not None:
            messages.append({"role": "user", "content": step.user})
    return figures


@dataclass(frozen=True)
class Totals:
    requests: int
    prompt: int
    reusable: int
    cached: int
    engine_alone: int
    miss_reasons: dict[str, int]

    @property
    def reuse(self) -> float:
        """sum(cached) / sum(reusable): the target is >= 0.95."""
        return self.cached / self.reusable if self.reusable else 0.0

    @property
    def hit(self) -> float:
        return self.cached / self.prompt if self.prompt else 0.0

    @property
    def alone_reuse(self) -> float:
        return self.engine_alone / self.reusable if self.reusable else 0.0


def totals(figures: Sequence[RequestFigures]) -> Totals:
    return Totals(
        requests=len(figures),
        prompt=sum(f.prompt_tokens for f in figures),
        reusable=sum(f.reusable for f in figures),
        cached=sum(f.cached_tokens for f in figures),
        engine_alone=sum(f.engine_alone for f in figures),
        miss_reasons=dict(Counter(str(f.miss_reason) for f in figures)),
    )


# -- the run and its report -----------------------------------------------------------------------


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


def run_bench(config: BenchConfig) -> BenchResult:
    """Build every family's model and serve each; the conversations run side by side (one thread
    per family: the figures are token counts, which sharing the CPU does not change)."""
    start = time.perf_counter()
    steps = schedule(config.rounds)
    with tempfile.TemporaryDirectory(prefix="agent-bench-") as tmp:
        work = Path(tmp)
        servers: list[tuple[Family, Server, Path]] = []
        try:
            for family in config.families:
                path = save_tiny_model_with_template(
                    family.model_kind, family.template, work / family.name, max_positions=CONTEXT
                )
                args = ["--model", str(path), "--served-model-name", MODEL, "--no-disk"]
                args += ["--max-context", str(CONTEXT), "--block-size", str(BLOCK)]
                # One request at a time: sampling is then bitwise reproducible (a next round would
                # otherwise share steps with the warmup of its history, and sample other arguments).
                args += ["--memory-bytes", "64MiB", "--no-memory-reserve", "--max-batch", "1"]
                server = Server(
                    family.name, args, log_path=work / f"{family.name}.log", cache_dir=work / "cache"
                )
                # One torch thread each: the servers share a small machine and run side by side.
                server.env["OMP_NUM_THREADS"] = "1"
                servers.append((family, server.launch(), path))
            with ThreadPoolExecutor(max_workers=len(servers)) as pool:
                futures = {entry[0].name: pool.submit(_serve_family, *entry, steps) for entry in servers}
                figures = {name: future.result() for name, future in futures.items()}
        finally:
            for _, server, _ in servers:
                server.stop()
    return BenchResult(config, figures, time.perf_counter() - start)


def _serve_family(family: Family, server: Server, path: Path, steps: Sequence[Step]) -> list[RequestFigures]:
    server.wait_ready()
    render = LocalRender(AutoTokenizer.from_pretrained(path))
    try:
        return run_family(server, family, render, steps)
    except (RuntimeError, KeyError) as exc:
        raise RuntimeError(f"{family.name}: {exc}\nserver log:\n{server.log_tail()}") from exc
    finally:
        server.stop()


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


def config_from_args(argv: Sequence[str] | None = None) -> BenchConfig:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_ROUNDS} rounds instead of {FULL_ROUNDS}"
    )
    parser.add_argument("--out", type=Path, default=None, help="report dir (full run default: docs/bench)")
    parser.add_argument("--families", default=",".join(f.name for f in FAMILIES), help="comma-separated")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args(argv)
    known = {f.name: f for f in FAMILIES}
    names = [n.strip() for n in args.families.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        parser.error(f"unknown families {unknown}; choose from {sorted(known)}")
    rounds = args.rounds if args.rounds is not None else (QUICK_ROUNDS if args.quick else FULL_ROUNDS)
    if rounds < 1:
        parser.error("--rounds must be positive")
    out = args.out if args.out is not None or args.quick else REPORT_DIR
    return BenchConfig(rounds=rounds, families=tuple(known[n] for n in names), out=out, quick=args.quick)


def write_report(result: BenchResult) -> str:
    """The report; written to ``out/agent.md`` when the run has an ``out`` directory."""
    report = render_report(result)
    if result.config.out is not None:
        result.config.out.mkdir(parents=True, exist_ok=True)
        (result.config.out / "agent.md").write_text(report)
    return report


def main(argv: Sequence[str] | None = None) -> None:
    config = config_from_args(argv)
    result = run_bench(config)
    print(write_report(result))
    where = config.out / "agent.md" if config.out is not None else "nowhere (quick run without --out)"
    print(f"({result.seconds:.0f} s; written to {where})")


if __name__ == "__main__":
    main()
