"""What placing cache breakpoints costs a Messages request, against the same request without them.

``python -m bench.breakpoint_bench [--quick]``

A breakpoint's prefix is found by rendering the conversation again with everything after it
altered. Tokenizing each altered prompt (the *tokenize* arm) costs a full tokenization per
breakpoint (~80 ms for 90k tokens on this CPU); the server renders only and maps the shared
characters to tokens through the prompt's own offsets (the *offsets* arm). Both arms place 4
breakpoints (a 1h system prompt, two 5m turns, the automatic last block) on a Claude-Code-like
conversation; the baseline plans the same request with none. Figures are medians of ``--repeat``
runs, reported as ratios to the baseline measured in the same run; the offsets arm must stay
within 1.5x, and its positions within ``BOUNDARY_MARGIN`` tokens below the exact ones, never
above.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from model_runner.chat_template import ChatTemplate
from model_runner.demo import ensure_demo_model
from model_runner.grammar import GrammarCompiler
from model_runner.response_parsing import parser_spec_for
from proxy.anthropic.conversation import breakpoints, chat_body, shared_prefix
from proxy.anthropic.plan import BOUNDARY_MARGIN, MessagesPlanner
from proxy.anthropic.schemas import MessagesRequest
from proxy.chat_plan import ChatPlanner
from proxy.schemas import ChatCompletionRequest

TARGET_RATIO = 1.5


def conversation(turns: int, breakpoints: bool) -> MessagesRequest:
    """A system prompt, ``turns`` user/assistant rounds of tool-loop-sized text, a last question."""

    def control(ttl: str = "5m") -> dict[str, Any]:
        return {"cache_control": {"type": "ephemeral", "ttl": ttl}} if breakpoints else {}

    system = "You are an agent that edits code carefully. " * 300
    messages: list[dict[str, Any]] = []
    for t in range(turns):
        user = {"type": "text", "text": f"Round {t}: " + " ".join(f"file{t}_{i}.py" for i in range(400))}
        if t in (turns // 2, turns - 1):
            user.update(control())
        messages.append({"role": "user", "content": [user]})
        messages.append({"role": "assistant", "content": f"Done with round {t}. " * 60})
    messages.append({"role": "user", "content": "What next?"})
    body: dict[str, Any] = {
        "model": "demo",
        "max_tokens": 16,
        "system": [{"type": "text", "text": system, **control("1h")}],
        "messages": messages,
    }
    if breakpoints:
        body["cache_control"] = {"type": "ephemeral"}
    return MessagesRequest.model_validate(body)


def exact_positions(planner: MessagesPlanner, chat: ChatPlanner, req: MessagesRequest) -> list[int]:
    """The tokenize arm: every altered prompt tokenized and compared token by token."""
    plan_ids = chat.prompt_ids(planner.chat_request(req))
    out = []
    for bp in breakpoints(req):
        raw = chat_body(req, alter_after=bp.at)
        raw.pop("tool_choice", None)
        out.append(shared_prefix(plan_ids, chat.prompt_ids(ChatCompletionRequest.model_validate(raw))))
    return out


def timed(fn: Any, repeat: int) -> float:
    fn()
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def run(turns_list: list[int], repeat: int) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = AutoTokenizer.from_pretrained(ensure_demo_model(Path(tmp)))
    eos = frozenset({int(tokenizer.eos_token_id)})
    chat = ChatPlanner(
        ChatTemplate(tokenizer), GrammarCompiler(tokenizer, len(tokenizer), eos), parser_spec_for(tokenizer)
    )
    planner = MessagesPlanner(chat, keep_billing_header=False, sampling_defaults=(0.0, 1.0, 0))
    rows = []
    for turns in turns_list:
        plain, marked = conversation(turns, False), conversation(turns, True)
        plan = planner.plan(marked)
        fast = [p.tokens for p in plan.breakpoints]
        exact = exact_positions(planner, chat, marked)
        if len(fast) != len(exact) or any(
            not 0 <= e - f <= BOUNDARY_MARGIN for f, e in zip(fast, exact, strict=False)
        ):
            raise AssertionError(
                f"offsets positions {fast} are not within the margin below the exact {exact}"
            )
        base = timed(lambda plain=plain: planner.plan(plain), repeat)
        offsets = timed(lambda marked=marked: planner.plan(marked), repeat)
        tokenize = timed(
            lambda marked=marked: (planner.plan(marked), exact_positions(planner, chat, marked)), repeat
        )
        rows.append(
            {
                "prompt_tokens": plan.prompt_tokens,
                "breakpoints": len(fast),
                "base_ms": base * 1000,
                "offsets_ratio": offsets / base,
                "tokenize_ratio": tokenize / base,
                "exact_minus_offsets": [e - f for f, e in zip(fast, exact, strict=True)],
            }
        )
    return rows


def report(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| prompt tokens | breakpoints | plan without (ms) | offsets / without "
        "| tokenize each / without | exact - offsets (tokens) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        met = "met" if r["offsets_ratio"] <= TARGET_RATIO else "MISSED"
        lines.append(
            f"| {r['prompt_tokens']} | {r['breakpoints']} | {r['base_ms']:.1f} "
            f"| {r['offsets_ratio']:.2f} ({met}) "
            f"| {r['tokenize_ratio']:.2f} | {r['exact_minus_offsets']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small conversation, 3 repetitions")
    parser.add_argument("--repeat", type=int, default=None)
    args = parser.parse_args(argv)
    turns = [4] if args.quick else [4, 16, 48]
    repeat = args.repeat or (3 if args.quick else 7)
    print(report(run(turns, repeat)))


if __name__ == "__main__":
    main()
