"""TTFT by prompt length for every arm, the HTTP overhead row, the no-hit cost, and Redis restore
throughput against raw MGET.

The length sweep uses a block-aligned prefix plus a short suffix, so the recipe and kvproxy
prefill exactly the same suffix tokens (the mechanisms are compared, not block rounding; the
replayed workloads show rounding as it comes). Every repetition has its own prefix: the cold
arms (a server restarted on stores a stopped server filled) then meet each prefix with cold
memory, so every repetition reads from disk or Redis.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import redis
import torch
from transformers import DynamicCache

from bench.arms import Arm, Prepared, ServerArm, run_rotated
from bench.context import BenchContext
from bench.server_proc import Sample, Server
from bench.stats import paired_ratios, summary
from bench.workloads import SweepParams, Words
from cache_store.codec import decode_block
from cache_store.hashing import block_hashes, namespace_hash
from model_runner import kv
from model_runner.cache_factory import StoreOptions, build_prefix_cache
from model_runner.engine import Engine

TINY_PROMPT = "Hello"
EXPECTED_TIER = {
    "memory": "memory",
    "memory+disk": "memory",
    "memory+redis": "memory",
    "disk (restart)": "disk",
    "redis (restart)": "redis",
}


def aligned_prefix(ctx: BenchContext, words: Words, target: int, block: int | None = None) -> tuple[str, int]:
    """Text of about ``target`` tokens whose token count is a multiple of ``block`` (default: the
    bench's block size)."""
    block = block or ctx.block
    for _ in range(20):  # a word adds 1-4 tokens: a few draws may step over every multiple
        pool = words.take(target)  # every word is at least one token
        cache: dict[int, int] = {}

        def count(k: int, pool: list[str] = pool, cache: dict[int, int] = cache) -> int:
            if k not in cache:
                cache[k] = len(ctx.tokens.prompt(" ".join(pool[:k])))
            return cache[k]

        lo, hi = 1, len(pool)
        while lo < hi:  # the fewest words reaching `target` tokens
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if count(mid) < target else (lo, mid)
        near = sorted(range(max(1, lo - 40), min(len(pool), lo + 40)), key=lambda k: abs(count(k) - target))
        for k in near:
            if count(k) % block == 0:
                return " ".join(pool[:k]), count(k)
    raise RuntimeError(f"no {block}-aligned prefix near {target} tokens")


@dataclass(frozen=True)
class SweepCase:
    prefix: str
    request: Prepared


def sweep_cases(ctx: BenchContext, p: SweepParams) -> dict[int, list[SweepCase]]:
    """Per prefix length, ``reps + 1`` requests (the first warms every path up and is dropped)."""
    words = Words(p.seed)
    cases: dict[int, list[SweepCase]] = {}
    for length in p.lengths:
        cases[length] = []
        for rep in range(p.reps + 1):
            prefix, n = aligned_prefix(ctx, words, length)
            prompt = f"{prefix} {words.text(p.suffix_words)}"
            ids = ctx.tokens.prompt(prompt)
            if ids[:n] != ctx.tokens.prompt(prefix):
                raise RuntimeError("the suffix changed the prefix's tokens")
            cases[length].append(SweepCase(prefix, Prepared(ids, f"L{length}r{rep}", n, prompt=prompt)))
    return cases


def _row(
    samples: list[Sample],
    recipe: list[Sample],
    baseline: list[Sample],
    overhead_s: float,
    arm: str,
    prefixes: list[int],
) -> dict[str, Any]:
    client = [s.ttft_s for s in samples]
    row: dict[str, Any] = {
        "ttft": summary(client),
        "server_ttft": summary([s.server_ttft_s for s in samples]),
        "total": summary([s.total_s for s in samples]),
        "cached_tokens": summary([s.cached_tokens for s in samples]),
        "prompt_tokens": summary([s.prompt_tokens for s in samples]),
        "http_and_tokenize": summary([s.ttft_s - s.server_ttft_s for s in samples]),
        "vs_baseline": paired_ratios(client, [s.ttft_s for s in baseline]),
        "phases": {
            phase: summary([s.phases_s[phase] for s in samples if phase in s.phases_s])
            for phase in ("lookup", "restore", "prefill")
        },
    }
    if arm in EXPECTED_TIER:
        tier = EXPECTED_TIER[arm]
        hits = [s.cached_by_tier.get(tier, 0) == n for s, n in zip(samples, prefixes, strict=True)]
        row["expected_hits"] = sum(hits) / len(samples)
        adjusted = [max(t - overhead_s, 1e-6) for t in client]
        row["adjusted_vs_recipe"] = paired_ratios(adjusted, [s.ttft_s for s in recipe])
        row["server_vs_recipe"] = paired_ratios(
            [s.server_ttft_s for s in samples], [s.ttft_s for s in recipe]
        )
    if arm == "miss":
        adjusted = [max(t - overhead_s, 1e-6) for t in client]
        row["adjusted_vs_baseline"] = paired_ratios(adjusted, [s.ttft_s for s in baseline])
        row["server_vs_baseline"] = paired_ratios(
            [s.server_ttft_s for s in samples], [s.ttft_s for s in baseline]
        )
    return row


def run_sweep(
    ctx: BenchContext,
    p: SweepParams,
    cases: dict[int, list[SweepCase]],
    servers: dict[str, Server],
    miss_server: Server,
) -> dict[str, Any]:
    """``servers``: memory, memory+disk, memory+redis (warmed here) and disk (restart), redis
    (restart) (warmed by a stopped server before they started). The miss arm has a memory-only
    server of its own: the 16 MB of new blocks each 2048-token miss stores would otherwise change
    the memory arm's allocator state (fresh pages to fault in) between its hits."""
    warm = [servers[name] for name in ("memory", "memory+disk", "memory+redis") if name in servers]
    all_prefixes = [c.prefix for cs in cases.values() for c in cs]
    for server in warm:
        server.warmup(all_prefixes)
    for cs in cases.values():
        for c in cs:
            ctx.recipe.prefill(c.request.group, c.request.ids[: c.request.recipe_prefix])
    arms: list[Arm] = [ctx.baseline, ctx.recipe]
    arms += [ServerArm(name, server) for name, server in servers.items()]
    arms.append(ServerArm("miss", miss_server, salt_each=True))
    tiny = servers["memory"]
    results: dict[str, Any] = {}
    overhead: list[Sample] = []
    per_length: dict[int, dict[str, list[Sample]]] = {}
    turn = 0
    for rep in range(p.reps + 1):  # lengths inside repetitions: a slow spell spreads over all
        for length, cs in cases.items():
            got = run_rotated(arms, cs[rep].request, turn)
            turn += 1
            tiny_sample = tiny.complete(prompt=TINY_PROMPT, max_tokens=1)
            if rep == 0:
                continue
            overhead.append(tiny_sample)
            bucket = per_length.setdefault(length, {a.name: [] for a in arms})
            for name, sample in got.items():
                bucket[name].append(sample)
        print(f"  sweep repetition {rep}/{p.reps} done", flush=True)
    http_s = summary([s.ttft_s - s.server_ttft_s for s in overhead])
    results["overhead"] = {
        "prompt": TINY_PROMPT,
        "ttft": summary([s.ttft_s for s in overhead]),
        "server_ttft": summary([s.server_ttft_s for s in overhead]),
        "http_and_tokenize": http_s,
    }
    results["lengths"] = {}
    for length, bucket in per_length.items():
        prefixes = [c.request.recipe_prefix for c in cases[length][1:]]
        results["lengths"][str(length)] = {
            name: _row(samples, bucket["recipe"], bucket["baseline"], http_s["median"], name, prefixes)
            for name, samples in bucket.items()
        }
    results["params"] = asdict(p)
    return results


# -- the no-hit cost ------------------------------------------------------------------------------


def run_misses(
    ctx: BenchContext, servers: dict[str, Server], reps: int, words_n: int, seed: int
) -> dict[str, Any]:
    """Unique prompts only: every server request carries a fresh ``cache_salt`` (nothing can hit,
    every block is hashed, looked up in every tier, then stored), against a full prefill."""
    words = Words(seed)
    arms: list[Arm] = [ctx.baseline]
    arms += [ServerArm(f"miss {name}", server, salt_each=True) for name, server in servers.items()]
    samples: dict[str, list[Sample]] = {a.name: [] for a in arms}
    tiny: list[Sample] = []
    for rep in range(reps + 1):
        prompt = words.text(words_n)
        request = Prepared(ctx.tokens.prompt(prompt), f"miss{rep}", 0, prompt=prompt)
        got = run_rotated(arms, request, rep)
        tiny_sample = servers["memory"].complete(prompt=TINY_PROMPT, max_tokens=1)
        if rep:
            tiny.append(tiny_sample)
            for name, sample in got.items():
                samples[name].append(sample)
    http_s = summary([s.ttft_s - s.server_ttft_s for s in tiny])["median"]
    base = [s.ttft_s for s in samples["baseline"]]
    out: dict[str, Any] = {"prompt_tokens": summary([s.prompt_tokens for s in samples["baseline"]])}
    for name, ss in samples.items():
        out[name] = {
            "ttft": summary([s.ttft_s for s in ss]),
            "server_ttft": summary([s.server_ttft_s for s in ss]),
            "total": summary([s.total_s for s in ss]),
            "cached_tokens": sum(s.cached_tokens for s in ss),
            "adjusted_vs_baseline": paired_ratios([max(s.ttft_s - http_s, 1e-6) for s in ss], base),
            "server_vs_baseline": paired_ratios([s.server_ttft_s for s in ss], base),
            "total_vs_baseline": paired_ratios([s.total_s - http_s for s in ss], base),
        }
    out["http_and_tokenize_s"] = http_s
    return out


# -- Redis restore vs raw MGET ---------------------------------------------------------------


def run_redis_restore(ctx: BenchContext, n_tokens: int, reps: int, seed: int) -> dict[str, Any]:
    """In this process, the server's own restore path from Redis (memory emptied before every
    repetition: ``PrefixCache.lookup`` = MGET + verify + decode, then ``kv.build_cache``) against
    a raw redis-py MGET of the very same keys, interleaved."""
    if ctx.redis_url is None:
        return {"skipped": "no Redis"}
    prefix = ctx.redis_prefix("restore")
    options = StoreOptions(
        memory_bytes=1 << 30,
        redis_url=ctx.redis_url,
        redis_prefix=prefix,
        store_timeout_ms=ctx.store_timeout_ms,
    )
    cache = build_prefix_cache(options, ctx.block)
    engine = Engine(ctx.loaded, cache, ctx.block)
    words = Words(seed)
    ids = list(ctx.tokens.prompt(words.text(n_tokens)))[:n_tokens]
    ids = ids[: len(ids) // ctx.block * ctx.block]
    engine.warmup(ids)
    if not cache.store.drain(120.0):
        raise RuntimeError("the Redis writer did not drain")
    namespace = namespace_hash(
        model_fingerprint=ctx.loaded.fingerprint, block_size=ctx.block, tenant="default"
    )
    hashes = block_hashes(ids, ctx.block, namespace)
    keys = [prefix.encode() + h.hex().encode() for h in hashes]
    with torch.inference_mode():
        probe = DynamicCache(config=ctx.loaded.model.config)
        cache_kw = kv.cache_argument(ctx.loaded.model)
        ctx.loaded.model(torch.tensor([[1]]), use_cache=True, logits_to_keep=1, **{cache_kw: probe})
    shapes = kv.layer_shapes(probe, ctx.block)
    client = redis.Redis.from_url(ctx.redis_url, socket_timeout=30)
    tier = cache.store.lower[0]
    times: dict[str, list[float]] = {k: [] for k in ("mget", "tier_get", "verify", "lookup", "restore")}
    nbytes = 0

    def mget() -> dict[str, float]:
        nonlocal nbytes
        start = time.perf_counter()
        values = client.mget(keys)
        nbytes = sum(len(v) for v in values if v is not None)
        return {"mget": time.perf_counter() - start}

    def tier_get() -> dict[str, float]:
        # The breakdown: RedisStore alone (bounded call on its thread), then verifying the records.
        start = time.perf_counter()
        values = tier.get_many(hashes)
        got = time.perf_counter()
        for i, value in enumerate(values):
            decode_block(
                value,  # type: ignore[arg-type]
                namespace=namespace,
                parent=namespace if i == 0 else hashes[i - 1],
                block_hash=hashes[i],
                token_ids=ids[i * ctx.block : (i + 1) * ctx.block],
                dtype=ctx.loaded.dtype,
                layer_shapes=shapes,
            )
        return {"tier_get": got - start, "verify": time.perf_counter() - got}

    def restore() -> dict[str, float]:
        cache.store.memory.clear()  # every block must come from Redis
        start = time.perf_counter()
        hit = cache.lookup(namespace, ids, dtype=ctx.loaded.dtype, layer_shapes=shapes)
        looked = time.perf_counter()
        with torch.inference_mode():
            kv.build_cache(ctx.loaded.model.config, hit.blocks, len(ids) - 1, ctx.loaded.device)
        done = time.perf_counter()
        hit.release()
        if hit.tiers.count("redis") != len(keys):
            raise RuntimeError(f"expected every block from Redis, got {hit.tiers}")
        return {"lookup": looked - start, "restore": done - start}

    steps = [mget, tier_get, restore]
    try:
        for rep in range(reps + 1):  # rotated order; repetition 0 warms up and is dropped
            for step in steps[rep % 3 :] + steps[: rep % 3]:
                for name, seconds in step().items():
                    if rep:
                        times[name].append(seconds)
    finally:
        client.close()
        cache.store.clear()
        cache.store.close()
    mget = times["mget"]
    return {
        "tokens": len(ids),
        "blocks": len(keys),
        "bytes": nbytes,
        "mget_s": summary(mget),
        "lookup_s": summary(times["lookup"]),
        "restore_s": summary(times["restore"]),
        "tier_get_s": summary(times["tier_get"]),
        "verify_s": summary(times["verify"]),
        # Throughput ratios (same bytes): MGET time / our time, per interleaved repetition.
        "lookup_vs_mget": paired_ratios(mget, times["lookup"]),
        "restore_vs_mget": paired_ratios(mget, times["restore"]),
    }
