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
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from bench.agent_measure import Lineage, LocalRender, RequestFigures, divergence
from bench.agent_report import BenchConfig, BenchResult, write_report
from bench.agent_script import (
    BLOCK,
    CONTEXT,
    FAMILIES,
    MODEL,
    SYSTEM,
    USERS,
    Family,
    Step,
    client_reply,
    request_body,
    schedule,
    tool_result,
)
from bench.server_proc import Server
from tests.support.chat_templates import save_tiny_model_with_template

REPORT_DIR = Path(__file__).resolve().parent.parent / "docs" / "bench"
FULL_ROUNDS = 8
QUICK_ROUNDS = 3


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


def main(argv: Sequence[str] | None = None) -> None:
    config = config_from_args(argv)
    result = run_bench(config)
    print(write_report(result))
    where = config.out / "agent.md" if config.out is not None else "nowhere (quick run without --out)"
    print(f"({result.seconds:.0f} s; written to {where})")


if __name__ == "__main__":
    main()
