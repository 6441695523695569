"""The whole server on realistic workloads: ``python -m bench.server_bench [--quick] [--out DIR]``.

The ``bench-llama-8x512`` model (``bench.model_runner_bench``) is saved to a temp dir and served
by ``kvproxy serve`` processes on loopback; plain transformers (``baseline``) and its prefix-reuse
recipe (``recipe``) run in this process on the very same token ids. Sections, in order:

1. TTFT by prompt length for every arm (memory, memory+disk, memory+Redis, and disk or Redis
   after a restart with cold memory), with the HTTP/tokenization overhead row;
2. misses: unique prompts only (the cost of caching when nothing hits);
3. Redis restore throughput against a raw redis-py MGET of the same bytes;
4. long-document QA; 5. shared-prefix fan-out; 6. multi-round chat;
7. cold restart (replay of the document QA on servers restarted on the same disk dir / Redis);
8. prompts diverging at random offsets, block sizes 16/64/256 (and the default it argues for);
9. capacity: Zipf access over more prefixes than the memory tier holds.

Every figure is a median over repetitions with its min-max spread; every comparison a ratio
within this run, arms interleaved request by request. Every arm uses the same number of torch
threads (``--threads``, default 1, so a busy core elsewhere stalls no arm's parallel prefill).
Writes ``server.json``, ``server.md`` and ``server_ttft.png`` to ``--out``; a full (non-quick)
run also copies the table and the plot to ``docs/bench/`` for the README. Redis: ``REDIS_URL``
(default redis://127.0.0.1:6379/0), under prefixes of this run only, deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.arms import Arm, ServerArm, Tokens
from bench.context import BenchContext
from bench.model_runner_bench import BENCH_MODEL, build_bench_model, redis_url
from bench.report import write_outputs
from bench.sections_cache import capacity_servers, recommend_block, run_capacity, run_divergence
from bench.sections_replay import prepare, run_chat, run_replay
from bench.sections_ttft import run_misses, run_redis_restore, run_sweep, sweep_cases
from bench.workloads import (
    CapacityParams,
    ChatParams,
    DivergenceParams,
    DocQAParams,
    FanoutParams,
    SweepParams,
    chat_script,
    doc_qa,
    fanout,
)
from model_runner import host_memory
from model_runner.loading import load_model

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 64
SERVER_MEMORY_BYTES = 1 << 30
"""The memory tier budget of the servers (their default)."""
STORE_TIMEOUT_MS = 2000
"""Generous: on this shared 2-core machine a 200 ms bound can turn a slow Redis read into a miss,
and the tiers' own tests cover timeouts; here we measure speed, not the breaker."""


@dataclass(frozen=True)
class Plan:
    """Every workload's parameters (printed with the results)."""

    sweep: SweepParams
    miss_reps: int
    miss_words: int
    restore_tokens: int
    restore_reps: int
    docqa: DocQAParams
    fanout: FanoutParams
    chat: ChatParams
    divergence: DivergenceParams
    aligned_tokens: int
    aligned_reps: int
    capacity: CapacityParams
    notes: dict[str, str] = field(default_factory=dict)


def plan(quick: bool) -> Plan:
    if quick:
        return Plan(
            sweep=SweepParams(lengths=(256, 512), reps=3),
            miss_reps=3,
            miss_words=100,
            restore_tokens=1024,
            restore_reps=5,
            docqa=DocQAParams(docs=2, doc_words=(100, 160), questions=3),
            fanout=FanoutParams(prefixes=2, prefix_words=120, suffixes=3),
            chat=ChatParams(users=2, rounds=3, system_words=60, answer_tokens=8),
            divergence=DivergenceParams(base_words=150, variants=3),
            aligned_tokens=256,
            aligned_reps=3,
            capacity=CapacityParams(prefixes=6, prefix_words=60, requests=15, memory_prefixes=2),
        )
    return Plan(
        sweep=SweepParams(lengths=(512, 1024, 2048), reps=15),
        miss_reps=9,
        miss_words=450,
        restore_tokens=2048,
        restore_reps=11,
        docqa=DocQAParams(),
        fanout=FanoutParams(prefixes=3, prefix_words=700, suffixes=6),
        chat=ChatParams(users=5, rounds=5),
        divergence=DivergenceParams(),
        aligned_tokens=1024,
        aligned_reps=7,
        capacity=CapacityParams(),
    )


def section(name: str, results: dict[str, Any], started: float) -> None:
    print(f"[{time.perf_counter() - started:6.0f}s] {name}", flush=True)


def run(ctx: BenchContext, p: Plan, results: dict[str, Any]) -> None:
    t0 = time.perf_counter()
    has_redis = ctx.redis_url is not None
    # -- 1. the length sweep: a stopped writer fills the stores the restarted servers read ----------
    section("sweep: preparing prompts and servers", results, t0)
    cases = sweep_cases(ctx, p.sweep)
    writer = ctx.server("writer", disk="cold", redis_name="cold" if has_redis else None)
    warm = {"memory": ctx.server("memory"), "memory+disk": ctx.server("memory+disk", disk="warm")}
    if has_redis:
        warm["memory+redis"] = ctx.server("memory+redis", redis_name="warm")
    writer.wait_ready()
    writer.warmup([c.prefix for cs in cases.values() for c in cs])
    writer.stop()  # SIGTERM drains the writer: disk and Redis hold every block
    cold = {"disk (restart)": ctx.server("disk-restart", disk="cold")}
    if has_redis:
        cold["redis (restart)"] = ctx.server("redis-restart", redis_name="cold")
    miss_server = ctx.server("miss")
    servers = ctx.start(**warm, **cold)
    miss_server.wait_ready()
    results["startup_s"] = {name: s.startup_s for name, s in servers.items()}
    section("sweep", results, t0)
    results["sweep"] = run_sweep(ctx, p.sweep, cases, servers, miss_server)
    for server in [*(servers[name] for name in cold), miss_server]:
        server.stop()
    # -- 2. misses, 3. Redis restore -----------------------------------------------------------------
    section("misses", results, t0)
    results["misses"] = run_misses(ctx, warm, p.miss_reps, p.miss_words, seed=21)
    section("redis restore", results, t0)
    results["redis_restore"] = run_redis_restore(ctx, p.restore_tokens, p.restore_reps, seed=22)
    # -- 4-6. replayed workloads on the warm servers (a salt per workload keeps them apart) --------

    def server_arms(salt: str, suffix: str = "") -> list[ServerArm]:
        return [ServerArm(name + suffix, s, salt=salt) for name, s in warm.items()]

    docqa = prepare(ctx, doc_qa(p.docqa))
    section("document QA", results, t0)
    arms: list[Arm] = [ctx.baseline, ctx.recipe, *server_arms("docqa")]
    results["docqa"] = run_replay(ctx, docqa, arms, "document QA")
    section("fan-out", results, t0)
    arms = [ctx.baseline, ctx.recipe, *server_arms("fanout")]
    results["fanout"] = run_replay(ctx, prepare(ctx, fanout(p.fanout)), arms, "fan-out")
    section("chat", results, t0)
    results["chat"] = run_chat(ctx, chat_script(p.chat), server_arms("chat"), p.chat.answer_tokens)
    # -- 7. cold restart: the same stores under new processes; the recipe starts from nothing ------
    section("cold restart", results, t0)
    for name in ("memory+disk", "memory+redis"):
        if name in warm:
            warm[name].stop()
    restarted = {"memory+disk (restarted)": ctx.server("md-restart", disk="warm")}
    if has_redis:
        restarted["memory+redis (restarted)"] = ctx.server("mr-restart", redis_name="warm")
    ctx.start(**restarted)
    ctx.recipe.forget()
    arms = [ctx.baseline, ctx.recipe, ServerArm("memory (never stopped)", warm["memory"], salt="docqa")]
    arms += [ServerArm(name, s, salt="docqa") for name, s in restarted.items()]
    results["restart"] = run_replay(ctx, docqa, arms, "cold restart")
    results["restart"]["startup_s"] = {name: s.startup_s for name, s in restarted.items()}
    for server in [warm["memory"], *restarted.values()]:
        server.stop()
    # -- 8. divergence and block sizes ---------------------------------------------------------
    section("divergence", results, t0)
    by_block = {b: ctx.server(f"block-{b}", block=b) for b in p.divergence.block_sizes}
    for server in by_block.values():
        server.wait_ready()
    results["divergence"] = run_divergence(ctx, p.divergence, by_block, p.aligned_tokens, p.aligned_reps)
    for server in by_block.values():
        server.stop()
    # -- 9. capacity ---------------------------------------------------------------------------------
    section("capacity", results, t0)
    cap_servers, budget = capacity_servers(ctx, p.capacity)
    ctx.start(**cap_servers)
    results["capacity"] = run_capacity(ctx, p.capacity, cap_servers, budget)
    section("done", results, t0)
    results["seconds"] = time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small workloads, 3 repetitions (< 5 min)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="results directory")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of every arm, in-process and servers alike (default 1: on a shared "
        "machine a multi-threaded prefill waits on whichever core another process holds; 0: "
        "torch's own default, all cores)",
    )
    parser.add_argument(
        "--render",
        type=Path,
        default=None,
        metavar="JSON",
        help="only write the report, table and plot again from a saved server.json (no run)",
    )
    args = parser.parse_args(argv)
    if args.render is not None:
        saved = json.loads(args.render.read_text())
        saved["divergence"]["recommendation"] = recommend_block(saved["divergence"])
        print(write_outputs(saved, args.out, None if saved["quick"] else ROOT / "docs" / "bench"))
        return
    # The in-process arms (baseline, recipe, the Redis restore section) run under the host memory
    # settings of a `kvproxy serve` process, so both sides of every ratio allocate alike.
    tuning = host_memory.tune_allocator(host_memory.reservation_bytes(SERVER_MEMORY_BYTES))
    if args.threads:
        # Servers inherit it (torch reads OMP_NUM_THREADS at start), so all arms use the same count.
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    p = plan(args.quick)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "model": BENCH_MODEL,
        "block_size": BLOCK,
        "quick": args.quick,
        "store_timeout_ms": STORE_TIMEOUT_MS,
        "plan": asdict(p),
        "machine": {
            "platform": platform.platform(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }
    with tempfile.TemporaryDirectory(prefix="kvproxy-server-bench-") as tmp:
        workdir = Path(tmp)
        model_dir = build_bench_model(workdir / BENCH_MODEL)
        loaded = load_model(str(model_dir), "auto", "auto", cache_dir=workdir / "cache")
        host_memory.settle(tuning.reserve_bytes)
        url = redis_url()
        print(f"{BENCH_MODEL} on {loaded.device} ({loaded.dtype}); Redis: {url or 'none'}", flush=True)
        print(json.dumps(asdict(p), default=str), flush=True)
        ctx = BenchContext(
            loaded=loaded,
            tokens=Tokens(loaded, BLOCK),
            model_dir=model_dir,
            workdir=workdir,
            redis_url=url,
            block=BLOCK,
            store_timeout_ms=STORE_TIMEOUT_MS,
            quick=args.quick,
        )
        try:
            run(ctx, p, results)
        finally:
            ctx.close()
            partial = args.out / "server.partial.json"
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps(results, indent=1, default=str))
    results["wall_s"] = time.perf_counter() - started
    docs = None if args.quick else ROOT / "docs" / "bench"
    table = write_outputs(results, args.out, docs)
    print(table)


if __name__ == "__main__":
    main()
