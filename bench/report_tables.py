"""The markdown sections of the server bench report, one function per section."""

from __future__ import annotations

from typing import Any

from bench.stats import fmt_count, fmt_ms, fmt_ms1, fmt_ratio

SERVER_ARMS = ["memory", "memory+disk", "memory+redis", "disk (restart)", "redis (restart)"]


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def sweep_section(r: dict[str, Any]) -> list[str]:
    sweep = r["sweep"]
    lengths = sweep["lengths"]
    arms = list(next(iter(lengths.values())))
    p, o = sweep["params"], sweep["overhead"]
    out = [
        "## TTFT by prompt length",
        "",
        f"A block-aligned prefix plus a {p['suffix_words']}-word suffix; every repetition a new prefix, "
        f"so the restarted servers meet each with cold memory; {p['reps']} repetitions; ms.",
        "",
    ]
    out += table(
        ["prefix tokens", *arms], [[n] + [fmt_ms(row[a]["ttft"]) for a in arms] for n, row in lengths.items()]
    )
    out += [
        "",
        f"HTTP overhead row (`{o['prompt']}`, max_tokens 1): client TTFT {fmt_ms(o['ttft'])} ms, server "
        f"TTFT {fmt_ms(o['server_ttft'])} ms; HTTP + tokenization = client - server = "
        f"**{fmt_ms(o['http_and_tokenize'])} ms**, subtracted as `adj`. Ratios are per repetition "
        "(arms back to back), then median (min-max).",
        "",
    ]
    rows = []
    for n, row in lengths.items():
        for a in [x for x in SERVER_ARMS if x in row]:
            x = row[a]
            prompt, cached = x["prompt_tokens"]["median"], x["cached_tokens"]["median"]
            rows.append(
                [
                    n,
                    a,
                    fmt_ratio(x["adjusted_vs_recipe"]),
                    fmt_ratio(x["server_vs_recipe"]),
                    f"{1 / x['vs_baseline']['median']:.1f}x",
                    f"{prompt / max(prompt - cached, 1):.1f}x",
                    pct(x["expected_hits"]),
                    fmt_ms(x["http_and_tokenize"]),
                ]
            )
    header = [
        "prefix",
        "arm",
        "adj / recipe",
        "server / recipe",
        "speedup",
        "ceiling",
        "from tier",
        "HTTP ms",
    ]
    out += table(header, rows)
    out += [
        "",
        "Where the time to the first token went, ms (median (min-max)): the servers' own "
        "`usage.kvproxy` phases (lookup: hashing, tier reads, record checks; restore: K/V into the "
        "`DynamicCache`; prefill: the suffix through the model and the first sample), and the "
        "recipe's `deepcopy` (under restore) and forward (under prefill).",
        "",
    ]
    phase_rows = []
    for n, row in lengths.items():
        for a in [x for x in ("recipe", *SERVER_ARMS) if x in row and _has_phases(row[x])]:
            ph = row[a]["phases"]
            phase_rows.append([n, a, *(fmt_ms1(ph[k]) for k in ("lookup", "restore", "prefill"))])
    return out + table(["prefix", "arm", "lookup", "restore", "prefill"], phase_rows)


def _has_phases(x: dict[str, Any]) -> bool:
    """Rows from before the servers reported their phases (an older server.json) have none."""
    return bool(x.get("phases", {}).get("prefill", {}).get("n"))


def misses_section(r: dict[str, Any]) -> list[str]:
    m = r["misses"]
    rows = [
        [
            name,
            fmt_ms(x["ttft"]),
            fmt_ms(x["server_ttft"]),
            fmt_ms(x["total"]),
            fmt_ratio(x["adjusted_vs_baseline"]),
            fmt_ratio(x["server_vs_baseline"]),
            fmt_ratio(x["total_vs_baseline"]),
        ]
        for name, x in m.items()
        if isinstance(x, dict) and "ttft" in x
    ]
    header = ["arm", "TTFT ms", "server ms", "total ms", "adj / base", "server / base", "total-HTTP / base"]
    out = [
        f"## Misses: unique prompts only ({m['prompt_tokens']['median']:.0f} tokens)",
        "",
        "Every server request carries a fresh `cache_salt`: hashed, looked up in every tier, prefilled in "
        "full, then its blocks stored (after the first token; `total` includes that).",
        "",
    ]
    return out + table(header, rows)


def redis_section(r: dict[str, Any]) -> list[str]:
    rr = r["redis_restore"]
    if "restore_s" not in rr:
        return [f"## Redis restore: {rr.get('skipped', 'not run')}"]
    mb = rr["bytes"] / 1e6

    def row(name: str, key: str, ratio: str) -> list[str]:
        return [name, fmt_ms(rr[key]), f"{mb / rr[key]['median']:.0f}", ratio]

    out = [
        f"## Redis restore vs raw MGET ({rr['tokens']} tokens, {rr['blocks']} blocks, {mb:.1f} MB)",
        "",
        "In-process, memory emptied before each repetition: the server's own `PrefixCache.lookup` "
        "(one MGET, then checksum, header and token checks, zero-copy decode) and `kv.build_cache` "
        "(the K/V concatenated per layer into the `DynamicCache`, the same step a memory hit pays).",
        "",
    ]
    return out + table(
        ["step", "ms", "MB/s", "MGET time / this"],
        [
            row("raw redis-py MGET", "mget_s", "1"),
            row("of which: RedisStore.get_many", "tier_get_s", "-"),
            row("of which: verify + decode every record", "verify_s", "-"),
            row("lookup (MGET + verify + decode + promote)", "lookup_s", fmt_ratio(rr["lookup_vs_mget"])),
            row("lookup + DynamicCache", "restore_s", fmt_ratio(rr["restore_vs_mget"])),
        ],
    )


def replay_section(r: dict[str, Any], key: str, title: str) -> list[str]:
    w = r[key]
    out = [
        f"## {title}",
        "",
        f"{w['requests']} requests over {w['groups']} shared prefixes, prompts "
        f"{fmt_count(w['prompt_tokens'])} tokens; hit rate that {r['block_size']}-token blocks allow: "
        f"{pct(w['block_allowed_hit_rate'])}.",
        "",
    ]
    rows = []
    for name, x in w.items():
        if isinstance(x, dict) and "ttft_first" in x:
            rows.append(
                [
                    name,
                    fmt_ms(x["ttft_first"]),
                    fmt_ms(x["ttft_repeat"]),
                    fmt_ratio(x["repeat_vs_baseline"]),
                    pct(x["hit_rate"]),
                    f"{x['speedup']:.1f}x",
                    f"{x['ceiling']:.1f}x",
                    ", ".join(f"{t} {n}" for t, n in x["tier_tokens"].items()) or "-",
                ]
            )
    header = [
        "arm",
        "first of group ms",
        "repeats ms",
        "repeats / base",
        "hit rate",
        "speedup",
        "ceiling",
        "by tier",
    ]
    out += table(header, rows)
    if "startup_s" in w:
        out += [
            "",
            "Restart to ready: " + ", ".join(f"{n} {s:.1f} s" for n, s in w["startup_s"].items()) + ".",
        ]
    return out


def chat_section(r: dict[str, Any]) -> list[str]:
    c = r["chat"]
    first = c["rounds"][0]
    arms = [a for a in first if isinstance(first[a], dict) and "ttft" in first[a]]
    out = [
        "## Multi-round chat",
        "",
        f"{len(c['rounds'])} rounds; hit rate the blocks allow: {pct(c['block_allowed_hit_rate'])}; "
        f"answers that differed between server arms: {c['answer_mismatches']}. TTFT per round (median "
        "over users), ms:",
        "",
    ]
    rows = [
        [str(i + 1), f"{row['prompt_tokens']['median']:.0f}"] + [fmt_ms(row[a]["ttft"]) for a in arms]
        for i, row in enumerate(c["rounds"])
    ]
    out += [*table(["round", "prompt tokens", *arms], rows), ""]
    rows = [
        [
            a,
            pct(c[a]["hit_rate"]),
            pct(c[a]["cached_vs_block_allowed"]),
            pct(c[a]["cached_vs_common_prefix"]),
            f"{c[a]['speedup']:.1f}x",
            f"{c[a]['ceiling']:.1f}x",
        ]
        for a in arms
    ]
    return out + table(
        ["arm", "hit rate", "cached / block-allowed", "cached / common prefix", "speedup", "ceiling"], rows
    )


def divergence_section(r: dict[str, Any]) -> list[str]:
    d = r["divergence"]
    al = d["aligned"]
    out = [
        f"## Divergence at random offsets, and the block size ({d['variants']} variants)",
        "",
        "Reused tokens as a share of the true common token prefix; then, per block size, a full hit on "
        f"a {al['prefix_tokens']}-token prefix aligned for all (server TTFT: per-block costs, no "
        "rounding) and a miss of it (total time: storing many small or few large blocks; baseline "
        f"{fmt_ms(al['baseline'])} ms).",
        "",
    ]
    rows = [
        [
            b,
            pct(x["reused_over_common"]),
            pct(x["expected_rounding"]),
            fmt_ms(x["variant_ttft"]),
            fmt_ms(al[b]["hit_ttft"]),
            fmt_ms(al[b]["miss_total"]),
            fmt_ratio(al[b]["miss_total_vs_baseline"]),
            f"{d['recommendation']['expected_hit_ttft'][b] * 1e3:.0f}",
        ]
        for b, x in d["by_block"].items()
    ]
    header = [
        "block",
        "reused / common",
        "rounding allows",
        "variant TTFT ms",
        "hit ms",
        "miss ms",
        "miss / base",
        "expected hit ms",
    ]
    rec = d["recommendation"]
    return (
        out
        + table(header, rows)
        + [
            "",
            f"Lowest expected hit TTFT on this machine: block size **{rec['block_size']}** ({rec['rule']}). "
            "The smaller block size of a pair wins when prefill costs more per token than: "
            + ", ".join(f"{k}: {v * 1e3:.2f} ms" for k, v in rec.get("breakeven_per_token_s", {}).items())
            + ".",
        ]
    )


def capacity_section(r: dict[str, Any]) -> list[str]:
    cap = r["capacity"]
    p = cap["params"]
    out = [
        "## Capacity: Zipf access over more prefixes than memory holds",
        "",
        f"{p['requests']} requests over {p['prefixes']} prefixes of {cap['prefix_tokens']} cacheable "
        f"tokens (Zipf s={p['zipf_s']}); memory tier {cap['memory_bytes'] / 2**20:.1f} MiB, about "
        f"{p['memory_prefixes']} prefixes. Requests whose prefix came before (an unbounded cache's "
        f"hits): {pct(cap['ideal_repeat_share'])}; an exact LRU of {p['memory_prefixes']} prefixes: "
        f"{pct(cap['lru_memory_repeat_share'])}. Baseline TTFT {fmt_ms(cap['baseline_ttft'])} ms.",
        "",
    ]
    rows = []
    for a, x in cap.items():
        if isinstance(x, dict) and "tier_hit_rate" in x:
            rows.append(
                [
                    a,
                    pct(x["hit_rate"]),
                    ", ".join(f"{t} {pct(v)}" for t, v in x["tier_hit_rate"].items()),
                    ", ".join(f"{t} {n}" for t, n in x["requests_by_source"].items()),
                    ", ".join(f"{t} {fmt_ms(v)}" for t, v in x["ttft_by_source"].items()),
                    f"{x['speedup']:.1f}x",
                    str(x["memory_evictions"]),
                ]
            )
    header = [
        "arm",
        "hit rate",
        "by tier (tokens)",
        "requests by source",
        "TTFT by source ms",
        "speedup",
        "evictions",
    ]
    return out + table(header, rows)
