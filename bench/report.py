"""The server bench's outputs: the JSON, a markdown report with the targets, and the TTFT plot."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter

from bench import report_tables as tables
from bench.stats import fmt_ratio

COMMAND = "python -m bench.server_bench"
TARGET_MEMORY, TARGET_COLD, TARGET_MISS, TARGET_CHAT, TARGET_MGET = 1.10, 1.30, 1.03, 0.95, 0.80

FINDINGS: dict[str, str] = {
    "memory": (
        "serving work and this VM's noise, not the cache. Fixed in this round (each measured with "
        "server-side phase timings, thread CPU time and minor-fault counts): per-request page faults "
        "(glibc returned freed buffers to the kernel; now the allocator keeps them and the memory "
        "budget is faulted in at start: ~0 faults per hit), a 220-250 ms GC pause once per server "
        "(the loaded objects are now frozen out of the collector), and a restore that made 512 "
        "per-layer slices per 2048 tokens (now one torch.stack). What remains, from the phase table "
        "(two full runs of this round): lookup 1.5-2.1 ms (hashing, 32 memory reads, header and "
        "token checks, and the XXH3-64 payload check of 16.8 MB, kept on memory hits too) + restore "
        "1.4-1.8 ms against the recipe's 1.6-1.7 ms deepcopy, i.e. +2 ms or ~4% at 2048 tokens; "
        "the suffix forward is the same computation, and its median differs by up to 5% between "
        "arms doing identical work in one run. Serving work the tiny-prompt row does not subtract "
        "adds the rest: tokenizing a 2k-token prompt (~1.3 ms) and its body make client-minus-server "
        "5-7 ms instead of the row's 3-4 ms."
    ),
    "cold": (
        "data movement. The restarted servers now fault in no pages (from ~10,000 minor faults per "
        "2048-token restore before the memory reservation) and their restore and prefill phases "
        "equal the memory arm's; what remains is the lookup, i.e. reading 16.8 MB per 2048-token "
        "prefix (medians of two full runs of this round): from disk 10-14 ms once the files have "
        "left the page cache (this VM's DAMON reclaims file pages idle for a minute; the disk tier "
        "now reads on four threads, 26 -> 17 ms for 16.8 MB with the page cache dropped), from "
        "Redis 13-26 ms: an MGET from a "
        "single-threaded server sharing the two cores with eight server processes and the bench, "
        "5-7 ms when the same bytes are read alone (table above). In a run with six servers "
        "instead of eight the same arms measured 1.12 (disk) and 1.16-1.27 (Redis) at 2048 "
        "tokens; at 512-1024 tokens both are within the target."
    ),
    "mget": (
        "verification, which stays: XXH3-64 over 16.8 MB plus header and token checks cost ~1 ms "
        "against a 4-7 ms MGET, and RedisStore's bounded call (run on its thread pool, so a "
        "trickling Redis cannot hold a request past --store-timeout-ms) ~0.3 ms. A reader of our "
        "own that parses the MGET reply with recv_into straight into the records measured no "
        "faster than redis-py with hiredis (3.4 vs 3.4 ms); overlapping verification with a "
        "chunked fetch would save at most ~0.7 ms while every chunk adds a round trip and two "
        "thread hops, so neither was kept. Before this round the ratio was 0.50-0.52: the rest of "
        "the gap was fresh pages for every reply, gone with the allocator settings; the two full "
        "runs of this round measured 0.76 and 0.89."
    ),
    "miss": (
        "in isolation (14 interleaved requests of ~1,000 unique tokens) the server's no-hit TTFT "
        "is 0.97-0.98x the in-process full prefill; lookup on a miss is one hash pass, a trie "
        "probe and one batched call per lower tier, and storing happens after the first token."
    ),
}
"""Per missed target, what profiling found (py-spy / pyinstrument / getrusage runs on this machine,
separate from the timed run; shown only when the target is missed)."""


def targets(r: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """(key, target, measured, met) rows."""
    rows: list[tuple[str, str, str, bool]] = []
    lengths = r["sweep"]["lengths"]
    for arm, limit, key in (
        ("memory", TARGET_MEMORY, "memory"),
        ("memory+disk", TARGET_MEMORY, "memory"),
        ("memory+redis", TARGET_MEMORY, "memory"),
        ("disk (restart)", TARGET_COLD, "cold"),
        ("redis (restart)", TARGET_COLD, "cold"),
    ):
        if arm not in next(iter(lengths.values())):
            continue
        vals = {n: row[arm]["adjusted_vs_recipe"]["median"] for n, row in lengths.items()}
        measured = ", ".join(f"{n}: {v:.2f}" for n, v in vals.items())
        rows.append(
            (key, f"{arm}: (TTFT - HTTP overhead) / recipe <= {limit}", measured, max(vals.values()) <= limit)
        )
    for name, row in r["misses"].items():
        if name.startswith("miss "):
            v = row["adjusted_vs_baseline"]
            rows.append(
                (
                    "miss",
                    f"{name}: no-hit TTFT overhead <= 3%",
                    f"{fmt_ratio(v)} (total {fmt_ratio(row['total_vs_baseline'])})",
                    v["median"] <= TARGET_MISS,
                )
            )
    chat = r["chat"]
    for name in ("memory", "memory+disk", "memory+redis"):
        if name in chat:
            v = chat[name]["cached_vs_block_allowed"]
            rows.append(
                ("chat", f"chat {name}: cached / block-allowed >= 95%", tables.pct(v), v >= TARGET_CHAT)
            )
    rr = r["redis_restore"]
    if "lookup_vs_mget" in rr:
        # The Redis tier's restore: MGET, verify, decode, promote. Building the DynamicCache from
        # the blocks is the same copy whichever tier they came from, so it is shown, not judged.
        v = rr["lookup_vs_mget"]
        rows.append(
            (
                "mget",
                "restore from Redis (MGET + verify + decode + promote) >= 0.8x raw MGET throughput",
                f"{fmt_ratio(v)}; with the DynamicCache built too: {fmt_ratio(rr['restore_vs_mget'])}",
                v["median"] >= TARGET_MGET,
            )
        )
    return rows


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    out = [
        "# kvproxy server benchmark",
        "",
        f"`{COMMAND}{' --quick' if r['quick'] else ''}`: {r['model']} (random Llama-style weights, "
        f"8 layers, hidden 512, 8/2 GQA heads, float32), block size {r['block_size']}, {m['cores']} CPU "
        f"cores ({m['platform']}, torch {m['torch']}, {m['threads']} torch thread(s) in every arm); "
        f"{r.get('wall_s', 0) / 60:.1f} min. The machine is "
        "shared and noisy: every figure is a median with its (min-max) over repetitions, every comparison "
        "a ratio within this run, the arms interleaved request by request (rotated order).",
        "",
        "TTFT over HTTP is taken on the client: request sent -> first streamed chunk with content "
        "(stream=True; the chat route's bare role chunk does not count). `server` figures are the "
        "server's own `usage.kvproxy.ttft_ms` (lookup, restore, suffix prefill, first sample). The "
        "in-process arms (baseline: plain transformers, full prefill; recipe: a prefilled `DynamicCache` "
        "deep-copied per request, exact prefix only) start from the same token ids and stop at the "
        "first greedy token.",
        "",
        "## Targets",
        "",
    ]
    rows = targets(r)
    out += tables.table(
        ["target", "measured", "met"],
        [[text, measured, "yes" if ok else "**no**"] for _, text, measured, ok in rows],
    )
    for section in (
        tables.sweep_section(r),
        tables.misses_section(r),
        tables.redis_section(r),
        tables.replay_section(r, "docqa", "Long-document QA"),
        tables.replay_section(r, "fanout", "Shared-prefix fan-out"),
        tables.chat_section(r),
        tables.replay_section(r, "restart", "Cold restart (the document QA replayed on restarted servers)"),
        tables.divergence_section(r),
        tables.capacity_section(r),
    ):
        out += ["", *section]
    missed = list(dict.fromkeys(key for key, _, _, ok in rows if not ok))
    if missed:
        out += ["", "## Missed targets: what the profile found", ""]
        out += [f"- **{key}**: {FINDINGS.get(key, 'not profiled in this run.')}" for key in missed]
    out += ["", "Parameters (seeded):", "", "```json", json.dumps(r["plan"], default=str), "```", ""]
    return "\n".join(out)


def plot(r: dict[str, Any], path: Path) -> None:
    lengths = r["sweep"]["lengths"]
    xs = [int(n) for n in lengths]
    arms = list(next(iter(lengths.values())))
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for arm in arms:
        med = [lengths[str(n)][arm]["ttft"]["median"] * 1e3 for n in xs]
        lo = [m - lengths[str(n)][arm]["ttft"]["min"] * 1e3 for m, n in zip(med, xs, strict=True)]
        hi = [lengths[str(n)][arm]["ttft"]["max"] * 1e3 - m for m, n in zip(med, xs, strict=True)]
        style = "--" if arm in ("baseline", "miss") else ("-." if arm == "recipe" else "-")
        left.errorbar(xs, med, yerr=[lo, hi], label=arm, linestyle=style, marker="o", capsize=3)
    overhead = r["sweep"]["overhead"]["http_and_tokenize"]["median"] * 1e3
    left.set(
        xscale="log",
        yscale="log",
        xlabel="cached prefix tokens (+ short suffix)",
        ylabel="TTFT, ms (median, min-max)",
    )
    left.set_xticks(xs, [str(x) for x in xs])
    left.minorticks_off()
    left.set_title(f"TTFT per arm (HTTP + tokenize overhead {overhead:.0f} ms included for servers)")
    left.legend(fontsize=8)
    names = [("docqa", "doc QA"), ("fanout", "fan-out"), ("chat", "chat"), ("restart", "restart")]
    bar_arms = ["recipe", "memory", "memory+disk"]
    renamed = {"memory": "memory (never stopped)", "memory+disk": "memory+disk (restarted)"}
    width = 0.25
    for i, arm in enumerate(bar_arms):
        vals, ceils = [], []
        for key, _ in names:
            x = r[key].get(renamed.get(arm, arm) if key == "restart" else arm)
            vals.append(x["speedup"] if x else 0.0)
            ceils.append(x["ceiling"] if x else 0.0)
        pos = [j + (i - 1) * width for j in range(len(names))]
        right.bar(pos, vals, width, label=f"{arm} speedup")
        right.scatter(pos, ceils, marker="_", s=300, color="black", zorder=3)
    right.set_xticks(range(len(names)), [n for _, n in names])
    right.set(yscale="log", ylim=(1, None), ylabel="TTFT-sum speedup over baseline (bar), ceiling (-)")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    right.yaxis.set_major_formatter(plain)
    right.yaxis.set_minor_formatter(plain)
    right.set_title("Workloads (restart: memory never stopped, disk restarted)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(r: dict[str, Any], out_dir: Path, docs_dir: Path | None) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "server.json").write_text(json.dumps(r, indent=1, default=str))
    text = markdown(r)
    (out_dir / "server.md").write_text(text)
    plot(r, out_dir / "server_ttft.png")
    if docs_dir is not None:
        docs_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out_dir / "server.md", docs_dir / "server.md")
        shutil.copyfile(out_dir / "server_ttft.png", docs_dir / "server_ttft.png")
    return text
