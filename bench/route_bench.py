"""Cache-aware routing against plain load balancing: ``python -m bench.route_bench [--quick]``.

Three (``--replicas``; ``--quick``: two) ``kvproxy serve`` replicas of the ``bench-llama-8x512``
model (``bench.model_runner_bench``: random weights, 8 layers, hidden 512, 2 KV heads; blocks of 32
tokens; one torch thread each), each with its own memory tier, sized below the workload's working
set (so one replica cannot hold it all, together they can), and its own disk directory; in the
second configuration also one shared Redis (a prefix of this run only, deleted at the end) that
holds all of it. In front of them, a router process per arm (``bench.route_proc``):

- ``round-robin`` and ``least-loaded``: the router app with the plain pickers;
- ``route``: ``kvproxy route`` itself (the cache-aware ``CachePicker``; with Redis, its block
  event feed and the shared-tier lookups).

The workload (``bench.route_workload``): tenants with 1-2k-token system prompts and users whose
conversations grow turn by turn, Poisson arrivals below saturation. Every arm of a configuration
runs on the same replicas, cleared before it, with a ``cache_salt`` of its own (no arm ever hits
another's blocks): first one unmeasured request per tenant (the tenant's system prompt is known
somewhere, as in a long-running deployment), then the measured schedule. A user's next turn is
never sent before the answer to the previous one came back.

Figures per arm: TTFT p50 / p90 on the client (request sent -> first streamed content chunk,
through the router), the shares of all prompt tokens restored from memory / disk / Redis and
recomputed (``usage.kvproxy.cached_by_tier``), requests per replica (``x-kvproxy-replica``), the
router's decisions by reason (its ``/metrics``), and two reuse ceilings from the prompts' block
hashes: the **oracle** (each request on the replica that served its conversation's previous turn,
nothing ever evicted) and the **placement** (where the arm actually sent each request, nothing
evicted). Ratios are within one run (arms in a rotated order per configuration and repetition,
``--reps``). Prints a markdown table and writes ``bench/results/route.json`` (``--quick``:
``route.quick.json``). About 6 minutes on 2 cores (``--quick``: under 2). ``--config`` runs one
configuration only; ``--route-flags`` passes weights to the route arm's ``kvproxy route`` (e.g.
``--route-flags "--restore-weight 0.3"``); ``--render JSON`` prints the tables of a saved run again.
Redis: ``REDIS_URL`` (default redis://127.0.0.1:6379/0).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import redis

from bench.batching_workload import percentile
from bench.model_runner_bench import BENCH_MODEL, build_bench_model, redis_url
from bench.route_proc import Router
from bench.route_report import ARMS, CONFIGS, render, summarize
from bench.route_workload import (
    Prompt,
    RouteParams,
    RouteScript,
    Turn,
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
from bench.server_proc import Server
from bench.workloads import Message

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 32
STORE_TIMEOUT_MS = 2000
"""Generous: on this shared 2-core machine a 200 ms bound can turn a slow Redis read into a miss."""
PICKER = {"round-robin": "round_robin", "least-loaded": "least_loaded", "route": "cache"}
RECORD_OVERHEAD = 512
"""Bytes of a block record beyond its K/V (header, token ids, alignment: 448 at 32 tokens)."""


@dataclass(frozen=True)
class Plan:
    workload: RouteParams
    replicas: int
    memory_fraction: float
    """Each replica's memory tier over the working set (below 1: one cannot hold it all)."""
    reps: int
    max_tokens: int


def plan(quick: bool) -> Plan:
    if quick:
        return Plan(
            workload=RouteParams(
                tenants=6,
                system_words=(130, 220),
                users=2,
                turns=3,
                user_words=(8, 20),
                answer_words=(20, 45),
                open_conversations=5,
                spacing=2,
                rate=4.0,
            ),
            replicas=2,
            memory_fraction=0.75,
            reps=1,
            max_tokens=4,
        )
    return Plan(workload=RouteParams(), replicas=3, memory_fraction=0.75, reps=1, max_tokens=8)


# -- prompts as the replicas see them ----------------------------------------------------------


class LocalPrompts:
    """Token counts and block hashes of chat prompts, computed here with the router's own
    ``PromptHasher`` over the model dir's tokenizer (a local fingerprint: the hashes differ from
    the replicas' but share with each other exactly what theirs do)."""

    def __init__(self, model_dir: Path, workdir: Path) -> None:
        from cache_store.hashing import FORMAT_VERSION
        from proxy.route.prompts import PromptHasher, ReplicaInfo
        from proxy.route.server import local_tokenizer_files

        info = ReplicaInfo(
            model=BENCH_MODEL,
            fingerprint="local",
            block_size=BLOCK,
            max_context=8192,
            format_version=FORMAT_VERSION,
            tokenizer_files=local_tokenizer_files(model_dir),
        )
        self.hasher = PromptHasher(info, workdir)

    def prompt(self, messages: list[Message], place: object = 0) -> Prompt:
        body = {"model": BENCH_MODEL, "messages": chat_messages(messages)}
        rendered = self.hasher.prompt_ids("/v1/chat/completions", body)
        hashes = self.hasher.hashes("/v1/chat/completions", body, None)
        if rendered is None or hashes is None:
            raise RuntimeError("the bench prompt did not render")
        return Prompt(place, tuple(hashes), len(rendered[0]))


def chat_messages(messages: list[Message]) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in messages]


@dataclass(frozen=True)
class Workload:
    script: RouteScript
    turns: list[Turn]
    warm: list[Prompt]
    """One per tenant, in tenant order."""
    prompts: list[Prompt]
    """One per scheduled turn, in schedule order."""
    working_set_blocks: int
    oracle: list[int]


def prepare(p: RouteParams, local: LocalPrompts) -> Workload:
    script = route_script(p)
    turns = schedule(p)
    warm = [local.prompt(script.warm_messages(t)) for t in range(p.tenants)]
    prompts = [local.prompt(script.messages(t.tenant, t.user, t.turn)) for t in turns]
    blocks = working_set_blocks(
        turns, [q.hashes for q in prompts], p.turns, {t: w.hashes for t, w in enumerate(warm)}
    )
    return Workload(script, turns, warm, prompts, blocks, oracle_tokens(prompts, BLOCK, warm))


# -- the client ----------------------------------------------------------------------------------


def stream_chat(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    """One streamed chat completion through the router; what the figures need of it."""
    first: float | None = None
    usage: dict[str, Any] | None = None
    start = time.perf_counter()
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.read()[:300]!r}")
        replica = response.headers.get("x-kvproxy-replica", "")
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(f"in-stream error {event['error']}")
            usage = event.get("usage") or usage
            if first is None:
                for choice in event.get("choices") or []:
                    if (choice.get("delta") or {}).get("content") or choice.get("finish_reason"):
                        first = time.perf_counter()
    end = time.perf_counter()
    if usage is None or first is None:
        raise RuntimeError("the stream ended without content or usage")
    extra = usage.get("kvproxy") or {}
    return {
        "replica": replica,
        "ttft_s": first - start,
        "total_s": end - start,
        "server_ttft_s": float(extra.get("ttft_ms") or 0.0) / 1e3,
        "queue_s": float(extra.get("queue_ms") or 0.0) / 1e3,
        "prompt_tokens": int(usage["prompt_tokens"]),
        "cached_tokens": int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0),
        "cached_by_tier": dict(extra.get("cached_by_tier") or {}),
        "miss_reason": extra.get("miss_reason"),
    }


class Client:
    def __init__(self, url: str, model: str, salt: str, max_tokens: int) -> None:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        self.http = httpx.Client(base_url=url, timeout=600.0, limits=limits)
        self.model, self.salt, self.max_tokens = model, salt, max_tokens

    def chat(self, messages: list[Message], max_tokens: int | None = None) -> dict[str, Any]:
        body = {
            "model": self.model,
            "messages": chat_messages(messages),
            "max_tokens": max_tokens or self.max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "cache_salt": self.salt,
        }
        return stream_chat(self.http, body)

    def close(self) -> None:
        self.http.close()


def warm_phase(client: Client, w: Workload, concurrency: int) -> list[dict[str, Any]]:
    """One request per tenant (its system prompt and a question), ``concurrency`` at a time."""
    tenants = range(len(w.script.systems))
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda t: client.chat(w.script.warm_messages(t), 1), tenants))


def measured_phase(client: Client, w: Workload) -> list[dict[str, Any]]:
    """The schedule, each request on its own thread at its arrival time (or once the answer to
    its conversation's previous turn came back, if later)."""
    answers: list[dict[str, Any] | None] = [None] * len(w.turns)
    errors: list[BaseException] = []
    done: dict[tuple[int, int, int], threading.Event] = {
        (t.tenant, t.user, t.turn): threading.Event() for t in w.turns
    }
    start = time.perf_counter()

    def send(i: int, turn: Turn) -> None:
        try:
            if turn.turn:
                done[(turn.tenant, turn.user, turn.turn - 1)].wait()
            sent = time.perf_counter() - start
            answer = client.chat(w.script.messages(turn.tenant, turn.user, turn.turn))
            answers[i] = {
                **answer,
                "index": i,
                "tenant": turn.tenant,
                "user": turn.user,
                "turn": turn.turn,
                "scheduled_s": turn.at_s,
                "sent_s": sent,
            }
        except BaseException as exc:
            errors.append(exc)
        finally:
            done[(turn.tenant, turn.user, turn.turn)].set()

    threads = []
    for i, turn in enumerate(w.turns):
        delay = start + turn.at_s - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        thread = threading.Thread(target=send, args=(i, turn), daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, the first: {errors[0]!r}")
    return [a for a in answers if a is not None]


# -- one configuration ---------------------------------------------------------------------------


def replica_servers(
    config: str, n: int, model_dir: Path, workdir: Path, memory_bytes: int, shared: str | None, prefix: str
) -> list[Server]:
    servers = []
    for i in range(n):
        args = [
            "--model",
            str(model_dir),
            "--block-size",
            str(BLOCK),
            "--memory-bytes",
            str(memory_bytes),
            "--disk-dir",
            str(workdir / "disk" / f"{config}-{i}"),
            "--store-timeout-ms",
            str(STORE_TIMEOUT_MS),
        ]
        if shared is not None:
            args += ["--redis-url", shared, "--redis-prefix", prefix]
        name = f"{config}-{i}".replace("+", "_")
        servers.append(
            Server(
                name, args, log_path=workdir / "logs" / f"{name}.log", cache_dir=workdir / "cache"
            ).launch()
        )
    return servers


def reset(servers: list[Server]) -> None:
    """Every tier of every replica emptied (their background writers drained first)."""
    for s in servers:
        s.quiesce()
    for s in servers:
        s.client.delete("/v1/cache").raise_for_status()


def decision_delta(after: dict[str, dict[str, float]], before: dict[str, dict[str, float]]) -> dict[str, Any]:
    per_replica = {
        replica: {k: v - before.get(replica, {}).get(k, 0.0) for k, v in row.items()}
        for replica, row in after.items()
    }
    extra = {"expected_cached_tokens", "cached_tokens", "retries"}
    reasons: dict[str, float] = {}
    for row in per_replica.values():
        for k, v in row.items():
            if k not in extra and v:
                reasons[k] = reasons.get(k, 0.0) + v
    return {"by_reason": reasons, "per_replica": per_replica}


def run_arm(
    arm: str, router: Router, servers: list[Server], w: Workload, salt: str, max_tokens: int
) -> dict[str, Any]:
    reset(servers)
    before = router.decisions()
    client = Client(router.url, servers[0].model, salt, max_tokens)
    try:
        started = time.perf_counter()
        warm = warm_phase(client, w, len(servers))
        warm_s = time.perf_counter() - started
        answers = measured_phase(client, w)
        wall_s = time.perf_counter() - started - warm_s
    finally:
        client.close()
    decisions = decision_delta(router.decisions(), before)
    urls = [s.url for s in servers]
    placed = [
        Prompt(a["replica"], q.hashes, q.prompt_tokens) for a, q in zip(answers, w.prompts, strict=True)
    ]
    warm_placed = [Prompt(a["replica"], q.hashes, q.prompt_tokens) for a, q in zip(warm, w.warm, strict=True)]
    prompt_total = sum(a["prompt_tokens"] for a in answers)
    mismatched = sum(a["prompt_tokens"] != q.prompt_tokens for a, q in zip(answers, w.prompts, strict=True))
    return {
        "arm": arm,
        "salt": salt,
        "ttft": ttft_figures(answers),
        "shares": tier_shares(answers),
        "placement_share": sum(reusable_tokens(placed, BLOCK, warm_placed)) / prompt_total,
        "load": load_balance(answers, urls),
        "moved_turns": moved_turns(answers),
        "decisions": decisions,
        "warm_s": warm_s,
        "wall_s": wall_s,
        "queue_p50_s": percentile([a["queue_s"] for a in answers], 50),
        "delayed_sends": sum(a["sent_s"] - a["scheduled_s"] > 0.05 for a in answers),
        "prompt_token_mismatches": mismatched,
        "warm_replicas": [a["replica"] for a in warm],
        "answers": answers,
    }


def run_config(
    ci: int,
    config: str,
    p: Plan,
    w: Workload,
    model_dir: Path,
    workdir: Path,
    memory_bytes: int,
    shared: str | None,
    prefix: str,
    log: Any,
    route_flags: list[str],
) -> dict[str, Any]:
    started = time.perf_counter()
    servers = replica_servers(config, p.replicas, model_dir, workdir, memory_bytes, shared, prefix)
    routers: dict[str, Router] = {}
    try:
        for s in servers:
            s.wait_ready()
        urls = [s.url for s in servers]
        for arm in ARMS:
            routers[arm] = Router(
                f"{config} {arm}",
                PICKER[arm],
                urls,
                log_path=workdir / "logs" / f"router-{ci}-{arm}.log",
                redis_url=shared,
                redis_prefix=prefix,
                extra=route_flags if arm == "route" else (),
            ).launch()
        for r in routers.values():
            r.wait_ready()
        log(f"[{config}] replicas and routers up in {time.perf_counter() - started:.0f}s")
        runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
        for rep in range(p.reps):
            k = (ci + rep) % len(ARMS)
            for arm in ARMS[k:] + ARMS[:k]:
                salt = f"{config}-{arm}-{rep}-{uuid.uuid4().hex[:8]}"
                run = run_arm(arm, routers[arm], servers, w, salt, p.max_tokens)
                runs[arm].append(run)
                log(
                    f"[{config}] rep {rep} {arm}: TTFT p50 {run['ttft']['p50'] * 1e3:.0f} "
                    f"p90 {run['ttft']['p90'] * 1e3:.0f} ms, memory {run['shares']['memory']:.2f} "
                    f"disk {run['shares']['disk']:.2f} redis {run['shares']['redis']:.2f} "
                    f"recomputed {run['shares']['recomputed']:.2f}, per replica "
                    f"{list(run['load']['requests'].values())}, decisions {run['decisions']['by_reason']}, "
                    f"{run['wall_s']:.0f}s (+{run['warm_s']:.0f}s warm-up)"
                )
        return {
            "replicas": urls,
            "router_startup_s": {arm: r.startup_s for arm, r in routers.items()},
            "replica_startup_s": [s.startup_s for s in servers],
            "runs": runs,
        }
    finally:
        for r in routers.values():
            r.stop()
        for s in servers:
            s.stop()


def workload_figures(p: Plan, w: Workload, memory_bytes: int, record_bytes: int) -> dict[str, Any]:
    systems = [q.prompt_tokens for q in w.warm]
    prompts = [q.prompt_tokens for q in w.prompts]
    return {
        "tenants": p.workload.tenants,
        "conversations": p.workload.tenants * p.workload.users,
        "turns": p.workload.turns,
        "requests": len(w.turns),
        "rate": p.workload.rate,
        "system_tokens_min": min(systems),
        "system_tokens_max": max(systems),
        "prompt_tokens_min": min(prompts),
        "prompt_tokens_max": max(prompts),
        "prompt_tokens_total": sum(prompts),
        "working_set_blocks": w.working_set_blocks,
        "working_set_mib": w.working_set_blocks * record_bytes / 2**20,
        "memory_bytes": memory_bytes,
        "memory_mib": memory_bytes / 2**20,
        "oracle_memory_share": sum(w.oracle) / sum(prompts),
        "schedule_s": w.turns[-1].at_s,
    }


def record_bytes(model_dir: Path) -> int:
    """One block record's size: K and V of every layer, float32, plus the header."""
    config = json.loads((model_dir / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    per_token = config["num_hidden_layers"] * 2 * config["num_key_value_heads"] * head_dim * 4
    return BLOCK * per_token + RECORD_OVERHEAD


def git_state() -> dict[str, Any]:
    """The commit measured, and the router files changed on top of it (the router moves fast)."""

    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return done.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "route_changes": git("status", "--porcelain", "proxy/route")}


def cleanup_redis(url: str, prefix: str) -> int:
    with redis.Redis.from_url(url, socket_timeout=10) as client:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        for i in range(0, len(keys), 500):
            client.unlink(*keys[i : i + 500])
    return len(keys)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short prompts, fewer requests (< 2 min)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions of every arm (default 1)")
    parser.add_argument(
        "--out", type=Path, default=None, help="results JSON (default bench/results/route.json)"
    )
    parser.add_argument(
        "--config",
        action="append",
        choices=CONFIGS,
        help="run only this configuration (repeatable; default both, Redis when it answers)",
    )
    parser.add_argument(
        "--route-flags",
        default="",
        help="more `kvproxy route` options for the route arm, e.g. '--restore-weight 0.3'",
    )
    parser.add_argument("--keep-logs", type=Path, default=None, help="copy the servers' logs to this dir")
    parser.add_argument(
        "--replicas", type=int, default=0, help="replicas behind each router (default 3; --quick: 2)"
    )
    parser.add_argument(
        "--render", type=Path, default=None, metavar="JSON", help="only print the tables of a saved run again"
    )
    args = parser.parse_args(argv)
    if args.render is not None:
        saved = json.loads(args.render.read_text())
        saved["summary"] = summarize(saved)
        saved["table"] = render(saved)
        args.render.write_text(json.dumps(saved, indent=1, default=str))
        print(saved["table"])
        return
    p = plan(args.quick)
    if args.reps:
        p = Plan(p.workload, p.replicas, p.memory_fraction, args.reps, p.max_tokens)
    if args.replicas:
        p = Plan(p.workload, args.replicas, p.memory_fraction, p.reps, p.max_tokens)
    out = args.out or ROOT / "bench" / "results" / ("route.quick.json" if args.quick else "route.json")
    # Every replica with one torch thread (they inherit it), as in the other server benches.
    os.environ["OMP_NUM_THREADS"] = "1"
    started = time.perf_counter()
    configs = args.config or list(CONFIGS)
    url = redis_url() if "memory+disk+redis" in configs else None
    run_id = uuid.uuid4().hex[:12]
    prefix = f"kvpbench:route:{run_id}:"
    results: dict[str, Any] = {
        "model": BENCH_MODEL,
        "block_size": BLOCK,
        "quick": args.quick,
        "replicas": p.replicas,
        "plan": asdict(p),
        "route_flags": args.route_flags,
        "machine": {"platform": platform.platform(), "cores": os.cpu_count()},
        "git": git_state(),
        "configs": {},
    }

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:5.0f}s] {msg}", flush=True)

    with tempfile.TemporaryDirectory(prefix="kvproxy-route-bench-") as tmp:
        workdir = Path(tmp)
        (workdir / "logs").mkdir()
        model_dir = build_bench_model(workdir / BENCH_MODEL)
        w = prepare(p.workload, LocalPrompts(model_dir, workdir / "hasher"))
        rec = record_bytes(model_dir)
        memory_bytes = int(p.memory_fraction * w.working_set_blocks * rec)
        results["workload"] = workload_figures(p, w, memory_bytes, rec)
        log(f"workload: {json.dumps(results['workload'])}; Redis: {url or 'none'}")
        try:
            for ci, config in enumerate(CONFIGS):
                redis_for = url if config.endswith("redis") else None
                if config not in configs or (config.endswith("redis") and url is None):
                    continue
                results["configs"][config] = run_config(
                    ci,
                    config,
                    p,
                    w,
                    model_dir,
                    workdir,
                    memory_bytes,
                    redis_for,
                    prefix,
                    log,
                    args.route_flags.split(),
                )
        finally:
            if url is not None:
                cleanup_redis(url, prefix)
            if args.keep_logs is not None:
                shutil.copytree(workdir / "logs", args.keep_logs, dirs_exist_ok=True)
            out.parent.mkdir(parents=True, exist_ok=True)
    results["summary"] = summarize(results)
    results["wall_s"] = time.perf_counter() - started
    table = render(results)
    results["table"] = table
    out.write_text(json.dumps(results, indent=1, default=str))
    print(table)
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
