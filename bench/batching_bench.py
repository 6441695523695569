"""Continuous batching: ``python -m bench.batching_bench [--quick] [--device cpu|cuda]``.

The bench model (``bench.batching_model``: random Qwen2-style weights, 8 layers, hidden 512,
8 query / 2 KV heads, built in code and saved to a temp dir, loaded with ``load_model``).
Sections (every comparison a ratio within this run, arms interleaved, medians with spread):

1. decode: tokens/s of B requests with 800 tokens of context decoding together through
   ``Engine`` (in process), against the ceiling, plain transformers decoding B rows in one
   ``DynamicCache``; B = 1, 4, 16, 32 (and 48, for the defaults); plus a profile of where an
   engine decode step goes (``bench.batching_decode``);
2. users: N users at once over HTTP, 2 rounds each on one shared ~800-token system prompt with
   growing histories, 64 new tokens per answer; arms ``kvproxy serve`` (defaults), ``kvproxy
   serve --max-batch 1`` and ``transformers serve --continuous-batching``; output tokens/s,
   client TTFT p50/p95 (``bench.batching_http``);
3. budgets: the inter-token gap of decoding streams while a long prompt prefills, per step
   token budget (``--max-batch-tokens``), for the CPU defaults.

The peer (``transformers serve``) runs in its own venv, so that its dependencies never touch
kvproxy's. Make it once (torch MUST stay the local CPU build, 2.13.0: any other resolution pulls
GBs of CUDA wheels)::

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install torch==2.13.0 'transformers[serving]' accelerate

``--peer-python`` names another interpreter (default ``.venv-bench/bin/python``); without a
usable one the peer arm is skipped with a message, the rest still runs.

Writes ``batching.json``, ``batching.md`` and ``batching.png`` to ``--out`` (default
bench/results); a whole default run (no --quick, every section, no --users/--batches, CPU) also
writes ``batching.md`` and ``batching.png`` to docs/bench (``--docs DIR``: there instead).
``--device cuda`` (bfloat16 by default) runs the same sections on a GPU (``bench/gpu.sh``) and
stops at once, saying so, where torch sees no CUDA device.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import transformers

from bench.batching_decode import DecodePlan, run_budgets, run_decode
from bench.batching_http import (
    Arm,
    PeerServer,
    UsersPlan,
    kvproxy_server,
    peer_problem,
    run_users_section,
)
from bench.batching_model import BATCH_MODEL, build_qwen_model
from bench.batching_report import BATCHED, PEER, SERIAL, markdown, plot, recommend
from bench.batching_workload import UsersParams, users_script
from model_runner import host_memory
from model_runner.cache_factory import StoreOptions, build_prefix_cache
from model_runner.loading import load_model

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("decode", "users", "budgets")
MEMORY_BYTES = 1 << 30


def plans(quick: bool, device: str) -> tuple[DecodePlan, UsersPlan]:
    if device == "cuda":  # bench/gpu.sh: reduced, a few minutes on one GPU (CUDA defaults: 128 / 2048)
        return (
            DecodePlan(
                batches=(1, 16, 64, 128),
                steps=32,
                reps=3,
                budgets=(512, 2048, 4096),
                budget_streams=32,
                long_prompt=4096,
                budget_reps=2,
            ),
            UsersPlan(users=(1, 12, 48), rounds=2, max_tokens=64, reps=1, single_sessions=2),
        )
    if quick:
        return (
            DecodePlan(
                batches=(1, 4, 16, 32),
                steps=16,
                reps=3,
                budgets=(128, 256, 512),
                budget_streams=8,
                long_prompt=1024,
                budget_reps=2,
            ),
            UsersPlan(users=(1, 4, 12), rounds=2, max_tokens=64, reps=1, single_sessions=2),
        )
    return (
        DecodePlan(
            batches=(1, 4, 16, 32, 48),
            steps=24,
            reps=4,
            budgets=(128, 256, 512, 1024),
            budget_streams=16,
            long_prompt=2048,
            budget_reps=3,
        ),
        UsersPlan(users=(1, 4, 12, 32), rounds=2, max_tokens=64, reps=2, single_sessions=3),
    )


def log(message: str) -> None:
    print(message, flush=True)


def check_device(device: str) -> None:
    """``--device cuda`` without a GPU stops here, with the reason, before any work."""
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "batching_bench: --device cuda, but torch sees no CUDA device "
            f"(torch {torch.__version__}, cuda build {torch.version.cuda or 'none'}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}). "
            "Run it on a GPU machine (bench/gpu.sh) or use --device cpu."
        )


def users_arms(
    args: argparse.Namespace, model_dir: Path, workdir: Path, results: dict[str, Any]
) -> list[Arm]:
    arms: list[Arm] = [
        kvproxy_server(BATCHED, model_dir, workdir, [], args.device, args.dtype),
        kvproxy_server(SERIAL, model_dir, workdir, ["--max-batch", "1"], args.device, args.dtype),
    ]
    problem = peer_problem(args.peer_python)
    if problem is None:
        arms.append(
            PeerServer(
                PEER,
                args.peer_python,
                model_dir,
                device=args.device,
                dtype=args.dtype,
                threads=args.threads,
                log_path=workdir / "logs" / "transformers-serve.log",
            )
        )
    else:
        results["peer_skipped"] = (
            f"{problem}. Make the peer venv with `python3 -m venv .venv-bench && .venv-bench/bin/pip "
            "install torch==2.13.0 'transformers[serving]' accelerate` (or pass --peer-python)."
        )
        log(f"SKIPPING the transformers serve arm: {results['peer_skipped']}")
    return arms


def run(args: argparse.Namespace, results: dict[str, Any], workdir: Path) -> None:
    decode_plan, users_plan = plans(args.quick, args.device)
    if args.users:
        users_plan = UsersPlan(**{**asdict(users_plan), "users": tuple(args.users)})
    if args.batches:
        decode_plan = DecodePlan(**{**asdict(decode_plan), "batches": tuple(args.batches)})
    results["decode_plan"] = asdict(decode_plan)
    results["users_plan"] = asdict(users_plan)
    model_dir = build_qwen_model(workdir / BATCH_MODEL)
    loaded = load_model(str(model_dir), args.device, args.dtype, cache_dir=workdir / "cache")
    results["vocab"] = int(loaded.model.get_input_embeddings().num_embeddings)
    host_memory.settle(args.reserve_bytes)
    started = time.perf_counter()
    if "decode" in args.sections or "budgets" in args.sections:
        cache = build_prefix_cache(StoreOptions(memory_bytes=MEMORY_BYTES), 64)
        try:
            if "decode" in args.sections:
                log(f"[{time.perf_counter() - started:5.0f}s] decode: B = {decode_plan.batches}")
                results["decode"] = run_decode(loaded, cache, decode_plan, log=log)
            if "budgets" in args.sections:
                log(f"[{time.perf_counter() - started:5.0f}s] budgets: {decode_plan.budgets}")
                results["budgets"] = run_budgets(loaded, cache, decode_plan, log=log)
        finally:
            cache.store.close(timeout_s=10)
    if "users" in args.sections:
        log(f"[{time.perf_counter() - started:5.0f}s] users: N = {users_plan.users}")
        script = users_script(UsersParams(users=1))
        results["users_system_words"] = UsersParams(users=1).system_words
        system_ids = loaded.tokenizer(script.system, add_special_tokens=False)["input_ids"]
        del loaded
        arms = users_arms(args, model_dir, workdir, results)
        for arm in arms:
            arm.launch()
        try:
            for arm in arms:
                arm.wait_ready()
                log(f"  {arm.name} ready")
            users = run_users_section(arms, users_plan, log=log)
            users["system_tokens"] = len(system_ids)
            results["users"] = users
        finally:
            for arm in arms:
                arm.stop()
    log(f"[{time.perf_counter() - started:5.0f}s] done")


def write(results: dict[str, Any], out: Path, docs: Path | None) -> str:
    out.mkdir(parents=True, exist_ok=True)
    results["recommendation"] = recommend(results)
    (out / "batching.json").write_text(json.dumps(results, indent=1, default=str))
    text = markdown(results)
    targets = [out] if docs is None else [out, docs]
    for where in targets:
        where.mkdir(parents=True, exist_ok=True)
        (where / "batching.md").write_text(text)
        try:
            plot(results, where / "batching.png")
        except ImportError as exc:  # matplotlib is a dev extra: the tables still stand
            log(f"no plot ({exc}); install matplotlib for batching.png")
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer sizes and repetitions (about 6 min on 2 cores)"
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="where every arm runs (default cpu)"
    )
    parser.add_argument("--dtype", default=None, help="default: float32 on cpu, bfloat16 on cuda")
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads of every arm (default 2; 0: torch's own)"
    )
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--users", type=int, nargs="+", default=None, help="user counts (override the plan)")
    parser.add_argument(
        "--batches", type=int, nargs="+", default=None, help="decode batch sizes (override the plan)"
    )
    parser.add_argument(
        "--peer-python",
        type=Path,
        default=ROOT / ".venv-bench" / "bin" / "python",
        help="Python with transformers[serving] for the transformers serve arm (default .venv-bench)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument(
        "--docs", type=Path, default=None, help="also write batching.md/.png here (a full run: docs/bench)"
    )
    parser.add_argument(
        "--render", type=Path, default=None, metavar="JSON", help="only render a saved batching.json"
    )
    args = parser.parse_args(argv)
    if args.render is not None:
        saved = json.loads(args.render.read_text())
        print(write(saved, args.out, args.docs))
        return
    check_device(args.device)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    # Only a whole default run (every section, the full CPU plan) replaces docs/bench's report.
    complete = set(args.sections) == set(SECTIONS) and not (args.users or args.batches)
    default_run = complete and not args.quick and args.device == "cpu"
    docs = args.docs if args.docs is not None else (ROOT / "docs" / "bench" if default_run else None)
    # The in-process sections run under a `kvproxy serve` process's host memory settings, as the
    # servers do; the servers inherit the thread count (torch reads OMP_NUM_THREADS at start).
    tuning = host_memory.tune_allocator(host_memory.reservation_bytes(MEMORY_BYTES))
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    results: dict[str, Any] = {
        "command": " ".join(["python -m bench.batching_bench", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.date.today().isoformat(),
        "model": BATCH_MODEL,
        "quick": args.quick,
        "device": args.device,
        "dtype": args.dtype,
        "sections": list(args.sections),
        "machine": {
            "platform": platform.platform(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
        },
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kvproxy-batching-bench-") as tmp:
        args.reserve_bytes = tuning.reserve_bytes
        try:
            run(args, results, Path(tmp))
        finally:
            results["wall_s"] = time.perf_counter() - started
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "batching.partial.json").write_text(json.dumps(results, indent=1, default=str))
    print(write(results, args.out, docs))


if __name__ == "__main__":
    main()
