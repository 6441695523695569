"""The batching bench's report: targets, tables and the plot, from the results dict alone (so a
saved ``batching.json`` can be rendered again with ``--render``)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BATCHED = "kvproxy"
SERIAL = "kvproxy max-batch 1"
PEER = "transformers serve"

DECODE_TARGET = 1.0
"""Engine decode tokens/s over the padded-batch ceiling, at every B."""
THROUGHPUT_TARGET = 3.0
"""At N=12: batched / one-at-a-time output throughput."""
PEER_TARGET = 1.0
"""At N=12: batched / transformers serve output throughput (strictly above)."""
TTFT_TARGET = 0.35
"""At N=12: batched / one-at-a-time TTFT p50."""
SINGLE_TARGET = 1.05
"""At N=1: TTFT p50 and per-stream decode speed within this factor of one-at-a-time."""
TARGET_USERS = 12
MAX_BATCH_TOLERANCE = 0.95
"""The recommended max_batch: the smallest measured B within 5% of the best decode tokens/s."""
BUDGET_RULE = (
    "start at the smallest budget and double it while that saves the long prompt more time to "
    "first token than it adds to the decoding streams' worst inter-token gap"
)
"""How the recommended max_batch_tokens is read off the budget table: a bigger step prefills more
efficiently (fewer steps, each with the decodes' fixed cost) but stalls every decoding stream
for longer while a long prompt prefills."""


def med(values: Sequence[float]) -> float:
    values = [v for v in values if v == v]  # drop NaN
    return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float], scale: float = 1.0, digits: int = 0) -> str:
    values = [v * scale for v in values if v == v]
    if not values:
        return "-"
    m = statistics.median(values)
    if len(values) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def header(*cells: str) -> str:
    """A markdown table header row and its rule."""
    return "| " + " | ".join(cells) + " |\n|" + "---|" * len(cells)


def paired(a: Sequence[float], b: Sequence[float]) -> list[float]:
    return [x / y for x, y in zip(a, b, strict=False) if y and y == y and x == x]


# -- derived figures ---------------------------------------------------------------------------


def decode_ratios(decode: dict[str, Any]) -> dict[str, list[float]]:
    return {
        b: paired([r["tok_s"] for r in rows["engine"]], [r["tok_s"] for r in rows["ceiling"]])
        for b, rows in decode["by_batch"].items()
    }


def users_field(users: dict[str, Any], n: str, arm: str, key: str) -> list[float]:
    rows = users["by_users"].get(n, {}).get(arm, [])
    return [float(r[key]) for r in rows if r.get(key) is not None]


def users_ratio(users: dict[str, Any], n: str, a: str, b: str, key: str) -> list[float]:
    return paired(users_field(users, n, a, key), users_field(users, n, b, key))


def recommend(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    decode = results.get("decode")
    if decode:
        candidates = {
            int(b): med([r["tok_s"] for r in rows["engine"]]) for b, rows in decode["by_batch"].items()
        }
        candidates = {b: v for b, v in candidates.items() if b >= 16}
        if candidates:
            best = max(candidates.values())
            out["max_batch"] = min(b for b, v in candidates.items() if v >= MAX_BATCH_TOLERANCE * best)
            out["max_batch_tok_s"] = {str(b): v for b, v in sorted(candidates.items())}
    budgets = results.get("budgets")
    if budgets:
        rows = sorted((int(b), rows) for b, rows in budgets["by_budget"].items())
        ttft = [med([r["long_ttft_ms"] for r in rs]) for _, rs in rows]
        worst = [med([r["gap_during_max_ms"] for r in rs]) for _, rs in rows]
        pick = 0
        while pick + 1 < len(rows) and ttft[pick] - ttft[pick + 1] >= worst[pick + 1] - worst[pick]:
            pick += 1
        out["max_batch_tokens"] = rows[pick][0]
    return out


def targets(results: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    rows: list[tuple[str, str, bool | None]] = []
    decode = results.get("decode")
    if decode:
        ratios = decode_ratios(decode)
        cells = ", ".join(f"B={b}: {spread(v, digits=2)}" for b, v in ratios.items())
        rows.append(
            (
                f"decode tokens/s, engine / padded-batch ceiling >= {DECODE_TARGET}",
                cells,
                all(med(v) >= DECODE_TARGET for v in ratios.values()),
            )
        )
    users = results.get("users")
    if users:
        n = str(TARGET_USERS)
        if n in users["by_users"]:
            thr = users_ratio(users, n, BATCHED, SERIAL, "throughput")
            rows.append(
                (
                    f"N={n}: output tok/s, batched / max-batch 1 >= {THROUGHPUT_TARGET}",
                    spread(thr, digits=2),
                    med(thr) >= THROUGHPUT_TARGET,
                )
            )
            peer = users_ratio(users, n, BATCHED, PEER, "throughput")
            rows.append(
                (
                    f"N={n}: output tok/s, batched / transformers serve > {PEER_TARGET}",
                    spread(peer, digits=2) if peer else "peer not run",
                    med(peer) > PEER_TARGET if peer else None,
                )
            )
            ttft = users_ratio(users, n, BATCHED, SERIAL, "ttft_p50")
            rows.append(
                (
                    f"N={n}: TTFT p50, batched / max-batch 1 <= {TTFT_TARGET}",
                    spread(ttft, digits=2),
                    med(ttft) <= TTFT_TARGET,
                )
            )
        if "1" in users["by_users"]:
            ttft1 = users_ratio(users, "1", BATCHED, SERIAL, "ttft_p50")
            rows.append(
                (
                    f"N=1: TTFT p50, batched / max-batch 1 <= {SINGLE_TARGET}",
                    spread(ttft1, digits=2),
                    med(ttft1) <= SINGLE_TARGET,
                )
            )
            dec1 = users_ratio(users, "1", SERIAL, BATCHED, "decode_p50")
            rows.append(
                (
                    f"N=1: per-stream decode speed, max-batch 1 / batched <= {SINGLE_TARGET}",
                    spread(dec1, digits=2),
                    med(dec1) <= SINGLE_TARGET,
                )
            )
    return rows


# -- markdown ----------------------------------------------------------------------------------


def _met(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "**no**")


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        "# kvproxy batching benchmark",
        "",
        f"`{results['command']}` on {results['date']}; {results['wall_s'] / 60:.1f} min. Model "
        f"{results['model']} (random Qwen2-style weights: 8 layers, hidden 512, 8 query / 2 KV heads, "
        f"intermediate 1408, vocab {results.get('vocab', '?')}), {results['dtype']} on {results['device']}; "
        f"{m['platform']}, {m['cores']} cores, torch {m['torch']}, transformers {m['transformers']}, "
        f"{m['threads']} torch threads in every arm (in-process and every server).",
        "",
        "The machine is shared and noisy (other jobs ran during this run): every figure is a median "
        "over repetitions with its (min-max), every comparison a ratio between arms measured back "
        "to back in the same repetition (arms rotated), never an absolute threshold.",
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {cell} | {_met(ok)} |" for name, cell, ok in targets(results)]
    lines += [
        "",
        "![decode tokens/s against the ceiling; output throughput and TTFT against users](batching.png)",
    ]
    rec = recommend(results)
    if results.get("decode"):
        lines += decode_tables(results["decode"])
    if results.get("users"):
        lines += users_tables(results["users"], results.get("users_plan", {}))
    elif results.get("users_skipped"):
        lines += ["", f"Multi-user section skipped: {results['users_skipped']}"]
    if results.get("budgets"):
        lines += budget_tables(results["budgets"], rec)
    if results.get("peer_skipped"):
        lines += ["", f"**transformers serve arm skipped**: {results['peer_skipped']}"]
    lines.append("")
    return "\n".join(lines)


def decode_tables(decode: dict[str, Any]) -> list[str]:
    ratios = decode_ratios(decode)
    lines = [
        "",
        "## Decode throughput against the padded-batch ceiling",
        "",
        f"B requests, each {decode['context_tokens']} tokens of context ({decode['cached_tokens']} restored "
        "from the memory tier, the rest prefilled), decoding together through `Engine` (in process, "
        f"max_batch_tokens {decode['config']['max_batch_tokens']}); the ceiling is plain transformers "
        "decoding B "
        "equal-length rows of the same context in one `DynamicCache` (`model(input_ids [B, 1], "
        "past_key_values=cache)`, greedy, tokens to the host every step). Steady rate of the full "
        "decode steps, every cost between two steps included; tokens/s.",
        "",
        header(
            "B",
            "engine",
            "ceiling",
            "engine / ceiling",
            "engine step ms",
            "of which forward ms",
            "ceiling step ms",
        ),
    ]
    for b, rows in decode["by_batch"].items():
        e, c = rows["engine"], rows["ceiling"]
        lines.append(
            f"| {b} | {spread([r['tok_s'] for r in e])} | {spread([r['tok_s'] for r in c])} | "
            f"{spread(ratios[b], digits=2)} | {spread([r['cycle_ms'] for r in e], digits=1)} | "
            f"{spread([r['forward_ms'] for r in e], digits=1)} | "
            f"{spread([r['cycle_ms'] for r in c], digits=1)} |"
        )
    prof = decode.get("profile") or {}
    if prof:
        lines += [
            "",
            "Where an engine decode step goes (one more run per B with the packed attention function "
            "timed; ms per full decode step, medians):",
            "",
            header(
                "B",
                "step",
                "attention (B x layers SDPA calls)",
                "share",
                "per call, µs",
                "rest of the forward",
                "between",
            ),
        ]
        for b, p in prof.items():
            lines.append(
                f"| {b} | {p['cycle_ms']:.1f} | {p['attention_ms']:.1f} | "
                f"{100 * p['attention_ms'] / p['cycle_ms']:.0f}% | {p['attention_call_us']:.0f} | "
                f"{p['rest_of_forward_ms']:.1f} | {p['between_steps_ms']:.1f} |"
            )
    return lines


def users_tables(users: dict[str, Any], plan: dict[str, Any]) -> list[str]:
    by_users = users["by_users"]
    arms = list(next(iter(by_users.values())).keys())
    lines = [
        "",
        "## Many users over HTTP",
        "",
        f"N users at once, {plan.get('rounds', '?')} rounds each (every round: the shared system prompt of "
        f"{users.get('system_tokens', '~800')} tokens, the user's history and a new question), streamed chat "
        f"completions of {plan.get('max_tokens', '?')} new tokens, greedy; N=1 is "
        f"{plan.get('single_sessions', 1)} single-user sessions back to back. Arms: `kvproxy serve` "
        "(defaults), `kvproxy serve --max-batch 1`, `transformers serve --continuous-batching`, "
        "each warmed first (system prompt computed once, the peer's batching manager built). TTFT "
        "on the client (request sent -> first content chunk); output tok/s = completion tokens / "
        "(first request -> last stream done); decode = per stream, (tokens - 1) / (first -> last "
        "content chunk). kvproxy's own figures: queue p50 (`usage.kvproxy.queue_ms`), requests per "
        "step (generated tokens / steps) and the share of steps holding more than one request.",
        "",
        header(
            "N",
            "arm",
            "output tok/s",
            "TTFT p50 ms",
            "TTFT p95 ms",
            "decode tok/s/stream",
            "queue p50 ms",
            "req/step",
            "batched steps",
        ),
    ]
    for n, per_arm in by_users.items():
        for arm in arms:
            rows = per_arm.get(arm, [])
            if not rows:
                continue

            def col(key: str, scale: float = 1.0, digits: int = 0, rows: list[dict[str, Any]] = rows) -> str:
                return spread([float(r[key]) for r in rows if r.get(key) is not None], scale, digits)

            lines.append(
                f"| {n} | {arm} | {col('throughput')} | {col('ttft_p50', 1e3)} | {col('ttft_p95', 1e3)} | "
                f"{col('decode_p50', digits=1)} | {col('queue_p50', 1e3)} | "
                f"{col('requests_per_step', digits=1)} | "
                f"{col('batched_share', 100)}{'%' if rows[0].get('batched_share') is not None else ''} |"
            )
    lines += [
        "",
        "Ratios per repetition (median (min-max)):",
        "",
        header(
            "N",
            "tok/s batched / max-batch 1",
            "tok/s batched / transformers serve",
            "TTFT p50 batched / max-batch 1",
            "TTFT p50 batched / transformers serve",
            "TTFT p95 batched / max-batch 1",
        ),
    ]
    for n in by_users:
        lines.append(
            f"| {n} | {spread(users_ratio(users, n, BATCHED, SERIAL, 'throughput'), digits=2)} | "
            f"{spread(users_ratio(users, n, BATCHED, PEER, 'throughput'), digits=2)} | "
            f"{spread(users_ratio(users, n, BATCHED, SERIAL, 'ttft_p50'), digits=2)} | "
            f"{spread(users_ratio(users, n, BATCHED, PEER, 'ttft_p50'), digits=2)} | "
            f"{spread(users_ratio(users, n, BATCHED, SERIAL, 'ttft_p95'), digits=2)} |"
        )
    return lines


def budget_tables(budgets: dict[str, Any], rec: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## CPU defaults: --max-batch and --max-batch-tokens",
        "",
    ]
    if "max_batch_tok_s" in rec:
        cells = ", ".join(
            f"B={b}: {v:.0f} tok/s ({v / int(b):.1f} per stream)" for b, v in rec["max_batch_tok_s"].items()
        )
        lines += [
            f"Engine decode throughput by batch size (table above): {cells}. Rule: the smallest B within "
            f"{100 * (1 - MAX_BATCH_TOLERANCE):.0f}% of the best, past which a bigger batch only slows every "
            f"stream: **max_batch {rec['max_batch']}**.",
            "",
        ]
    lines += [
        f"{budgets['streams']} requests decode (800-token contexts) when one {budgets['long_prompt']}-token "
        "uncached prompt arrives; per step token budget (`max_batch_tokens`): the decoding streams' "
        "inter-token gap (= the step time: every decoding request gets a token per step) before it "
        "(decode only) and while it prefills, and the long prompt's time to first token; ms.",
        "",
        header(
            "max_batch_tokens",
            "gap, decode only",
            "gap during the prefill p50",
            "p95",
            "max",
            "long prompt TTFT",
            "prefill steps",
        ),
    ]
    for b, rows in budgets["by_budget"].items():

        def col(key: str, digits: int = 0, rows: list[dict[str, Any]] = rows) -> str:
            return spread([r[key] for r in rows], digits=digits)

        lines.append(
            f"| {b} | {col('gap_before_ms')} | {col('gap_during_p50_ms')} | {col('gap_during_p95_ms')} | "
            f"{col('gap_during_max_ms')} | {col('long_ttft_ms')} | {col('prefill_steps')} |"
        )
    if "max_batch_tokens" in rec:
        lines += [
            "",
            f"Rule: {BUDGET_RULE}: **max_batch_tokens {rec['max_batch_tokens']}**.",
        ]
    return lines


# -- the plot ----------------------------------------------------------------------------------


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    decode = results.get("decode")
    ax = axes[0]
    if decode:
        bs = [int(b) for b in decode["by_batch"]]
        for arm, style in (("engine", "o-"), ("ceiling", "s--")):
            ax.plot(
                bs, [med([r["tok_s"] for r in decode["by_batch"][str(b)][arm]]) for b in bs], style, label=arm
            )
        ax.set_xlabel("requests decoding together (B)")
        ax.set_ylabel("decode tokens/s")
        ax.set_title("Engine vs padded-batch ceiling")
        ax.legend()
        ax.grid(alpha=0.3)
    users = results.get("users")
    if users:
        by_users = users["by_users"]
        ns = [int(n) for n in by_users]
        arms = list(next(iter(by_users.values())).keys())
        for arm in arms:
            thr = [med(users_field(users, str(n), arm, "throughput")) for n in ns]
            axes[1].plot(ns, thr, "o-", label=arm)
            (line,) = axes[2].plot(
                ns,
                [1e3 * med(users_field(users, str(n), arm, "ttft_p50")) for n in ns],
                "o-",
                label=f"{arm} p50",
            )
            axes[2].plot(
                ns,
                [1e3 * med(users_field(users, str(n), arm, "ttft_p95")) for n in ns],
                "x--",
                color=line.get_color(),
                label=f"{arm} p95",
            )
        axes[1].set_xlabel("users at once (N)")
        axes[1].set_ylabel("output tokens/s")
        axes[1].set_title("Output throughput")
        axes[1].legend()
        axes[1].grid(alpha=0.3)
        axes[2].set_xlabel("users at once (N)")
        axes[2].set_ylabel("TTFT ms (log)")
        axes[2].set_yscale("log")
        axes[2].set_title("Time to first token, p50 (solid) / p95 (dashed)")
        axes[2].legend(fontsize=7)
        axes[2].grid(alpha=0.3)
    fig.suptitle(
        f"kvproxy batching, {results['model']} {results['dtype']} on {results['device']} ({results['date']})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
