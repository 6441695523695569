"""Cache behaviour: reuse lost to block rounding per block size (prompts diverging at random
offsets), and hit rate per tier when more prefixes are in use than the memory tier holds."""

from __future__ import annotations

import uuid
from collections import OrderedDict
from itertools import pairwise
from typing import Any

from bench.arms import Arm, Prepared, ServerArm, run_rotated
from bench.context import BenchContext
from bench.server_proc import Sample, Server
from bench.stats import hit_rate, paired_ratios, summary, tier_tokens
from bench.workloads import CapacityParams, DivergenceParams, Words, divergence, reusable_tokens, zipf_trace


def run_divergence(
    ctx: BenchContext, p: DivergenceParams, servers: dict[int, Server], aligned_tokens: int, reps: int
) -> dict[str, Any]:
    """``servers``: block size -> a memory-only server. Part 1: a base prompt, then variants that
    keep a random number of its words; reused tokens over the true common token prefix. Part 2:
    per block size, a full hit on a prefix aligned to every block size (per-block overhead, no
    rounding) and a miss of the same prompt (the cost of storing many small or few large blocks)."""
    base, variants = divergence(p)
    arms: list[Arm] = [ServerArm(f"block {b}", s, salt="diverge") for b, s in servers.items()]
    earlier: list[tuple[int, ...]] = []
    rows: dict[int, list[tuple[int, int]]] = {b: [] for b in servers}  # (common, cached)
    ttft: dict[int, list[float]] = {b: [] for b in servers}
    for turn, text in enumerate([base] + [v for _, v in variants]):
        ids = ctx.tokens.prompt(text)
        common = max((reusable_tokens(ids, [e], 1)[0] for e in earlier), default=0)
        got = run_rotated(arms, Prepared(ids, "diverge", 0, prompt=text), turn)
        if turn:
            for b in servers:
                sample = got[f"block {b}"]
                rows[b].append((min(common, len(ids) - 1), sample.cached_tokens))
                ttft[b].append(sample.ttft_s)
        earlier.append(ids)
    out: dict[str, Any] = {"params": {**p.__dict__}, "variants": len(variants), "by_block": {}}
    for b, pairs in rows.items():
        common_sum = sum(c for c, _ in pairs)
        out["by_block"][str(b)] = {
            "reused_over_common": sum(min(k, c) for c, k in pairs) / common_sum if common_sum else 0.0,
            "expected_rounding": sum(c // b * b for c, _ in pairs) / common_sum if common_sum else 0.0,
            "mean_share": sum((min(k, c) / c if c else 1.0) for c, k in pairs) / len(pairs),
            "variant_ttft": summary(ttft[b]),
        }
    out["aligned"] = _aligned_costs(ctx, servers, aligned_tokens, reps)
    out["recommendation"] = recommend_block(out)
    return out


def _aligned_costs(ctx: BenchContext, servers: dict[int, Server], n_tokens: int, reps: int) -> dict[str, Any]:
    from bench.sections_ttft import aligned_prefix  # one helper, shared with the sweep

    words = Words(99)
    # The largest block size (a power of two) is a multiple of the others: aligned for all.
    prefix, n = aligned_prefix(ctx, words, n_tokens, block=max(servers))
    for server in servers.values():
        server.warmup([prefix], cache_salt="aligned")
    hits = [ServerArm(f"hit {b}", s, salt="aligned") for b, s in servers.items()]
    misses = [ServerArm(f"miss {b}", s, salt_each=True) for b, s in servers.items()]
    arms: list[Arm] = [ctx.baseline, *hits, *misses]
    samples: dict[str, list[Sample]] = {a.name: [] for a in arms}
    for rep in range(reps + 1):
        prompt = f"{prefix} {words.text(16)}"
        got = run_rotated(arms, Prepared(ctx.tokens.prompt(prompt), "aligned", n, prompt=prompt), rep)
        if rep:
            for name, sample in got.items():
                samples[name].append(sample)
    base = [s.ttft_s for s in samples["baseline"]]
    out: dict[str, Any] = {"prefix_tokens": n, "baseline": summary(base)}
    for b in servers:
        hit, miss = samples[f"hit {b}"], samples[f"miss {b}"]
        out[str(b)] = {
            "hit_ttft": summary([s.server_ttft_s for s in hit]),
            "hit_cached": summary([s.cached_tokens for s in hit]),
            "miss_total": summary([s.total_s for s in miss]),
            "miss_total_vs_baseline": paired_ratios([s.total_s for s in miss], base),
        }
    return out


def recommend_block(result: dict[str, Any]) -> dict[str, Any]:
    """The block size with the lowest expected TTFT of a hit: its measured full-hit TTFT (every
    per-block cost: hashing, records, verification, restore) plus the tokens rounding loses on
    average when the shared prefix ends at a random point, (B - 1) / 2, at this run's measured
    prefill cost per token. Small blocks lose little to rounding but pay more per block."""
    aligned = result["aligned"]
    sizes = sorted(int(b) for b in result["by_block"])
    per_token = aligned["baseline"]["median"] / aligned["prefix_tokens"]
    expected = {b: aligned[str(b)]["hit_ttft"]["median"] + (b - 1) / 2 * per_token for b in sizes}
    hit = {b: aligned[str(b)]["hit_ttft"]["median"] for b in sizes}
    # Prefill cost per token above which the smaller of two block sizes wins: its extra per-block
    # cost against the (b - a) / 2 tokens it saves from rounding on average.
    breakeven = {f"{a} vs {b}": (hit[a] - hit[b]) / ((b - a) / 2) for a, b in pairwise(sizes)}
    return {
        "block_size": min(sizes, key=lambda b: expected[b]),
        "per_token_s": per_token,
        "breakeven_per_token_s": breakeven,
        "rule": "lowest expected hit TTFT = full-hit TTFT + (block - 1) / 2 tokens lost to rounding "
        f"x {per_token * 1e3:.2f} ms per prefilled token",
        "expected_hit_ttft": {str(b): expected[b] for b in sizes},
        "reuse_share": {str(b): result["by_block"][str(b)]["reused_over_common"] for b in sizes},
    }


# -- capacity -------------------------------------------------------------------------------------


def lru_hits(trace: list[int], capacity: int) -> int:
    """Hits of an LRU cache of ``capacity`` prefixes over the trace (what a perfect memory tier of
    that size would serve)."""
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for i in trace:
        if i in cache:
            hits += 1
            cache.move_to_end(i)
        else:
            cache[i] = None
            if len(cache) > capacity:
                cache.popitem(last=False)
    return hits


def record_bytes(ctx: BenchContext, block: int) -> int:
    """Bytes of one block record of the bench model (K and V of every layer, plus a header)."""
    config = ctx.loaded.model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    itemsize = ctx.loaded.dtype.itemsize
    return config.num_hidden_layers * 2 * config.num_key_value_heads * block * head_dim * itemsize + 4096


def capacity_servers(ctx: BenchContext, p: CapacityParams) -> tuple[dict[str, Server], int]:
    prefixes, _ = zipf_trace(p)
    blocks = len(ctx.tokens.prompt(prefixes[0])) // ctx.block
    budget = p.memory_prefixes * blocks * record_bytes(ctx, ctx.block)
    servers = {
        "memory+disk": ctx.server("cap-md", disk="cap", memory_bytes=budget),
    }
    if ctx.redis_url is not None:
        servers["memory+redis"] = ctx.server("cap-mr", redis_name="cap", memory_bytes=budget)
    return servers, budget


def run_capacity(
    ctx: BenchContext, p: CapacityParams, servers: dict[str, Server], budget: int
) -> dict[str, Any]:
    prefixes, trace = zipf_trace(p)
    salt = f"cap-{uuid.uuid4().hex[:8]}"
    arms: list[Arm] = [ctx.baseline, *(ServerArm(n, s, salt=salt) for n, s in servers.items())]
    samples: dict[str, list[Sample]] = {a.name: [] for a in arms}
    for turn, (_, prompt) in enumerate(trace):
        got = run_rotated(arms, Prepared(ctx.tokens.prompt(prompt), "cap", 0, prompt=prompt), turn)
        for name, sample in got.items():
            samples[name].append(sample)
        if (turn + 1) % 10 == 0:
            print(f"  capacity {turn + 1}/{len(trace)}", flush=True)
    order = [i for i, _ in trace]
    seen: set[int] = set()
    repeats = 0
    for i in order:
        repeats += i in seen
        seen.add(i)
    prefix_tokens = len(ctx.tokens.prompt(prefixes[0])) // ctx.block * ctx.block
    base_sum = sum(s.ttft_s for s in samples["baseline"])
    out: dict[str, Any] = {
        "params": {**p.__dict__},
        "memory_bytes": budget,
        "distinct_prefixes_used": len(seen),
        "ideal_repeat_share": repeats / len(order),
        "lru_memory_repeat_share": lru_hits(order, p.memory_prefixes) / len(order),
        "prefix_tokens": prefix_tokens,
        "draws_by_rank": [order.count(i) for i in range(p.prefixes)],
    }
    for name, ss in list(samples.items())[1:]:
        prompt_total = sum(s.prompt_tokens for s in ss)
        by_tier = tier_tokens(ss)
        source: dict[str, list[float]] = {}
        for s in ss:
            tier = max(s.cached_by_tier, key=lambda t: s.cached_by_tier[t]) if s.cached_tokens else "miss"
            source.setdefault(tier, []).append(s.ttft_s)
        stats = servers[name].stats()
        out[name] = {
            "hit_rate": hit_rate(ss),
            "tier_hit_rate": {t: n / prompt_total for t, n in by_tier.items()},
            "requests_by_source": {t: len(v) for t, v in source.items()},
            "ttft_by_source": {t: summary(v) for t, v in source.items()},
            "speedup": base_sum / sum(s.ttft_s for s in ss),
            "memory_evictions": stats["tiers"]["memory"]["evictions"],
        }
    out["baseline_ttft"] = summary([s.ttft_s for s in samples["baseline"]])
    return out
