"""Small pure helpers for the server bench's figures: medians with spread, ratios, ceilings."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence

from bench.server_proc import Sample

Summary = dict[str, float]


def summary(values: Sequence[float]) -> Summary:
    """Median with its spread (min, max) and the count: the form of every figure in the report."""
    if not values:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def ttft_summary(samples: Iterable[Sample], *, server: bool = False) -> Summary:
    return summary([s.server_ttft_s if server else s.ttft_s for s in samples])


def ratio(a: Summary, b: Summary) -> float:
    return a["median"] / b["median"] if b["median"] else float("nan")


def paired_ratios(a: Sequence[float], b: Sequence[float]) -> Summary:
    """Per-repetition ratios ``a[i] / b[i]`` (the two measured back to back), summarized."""
    return summary([x / y for x, y in zip(a, b, strict=True) if y > 0])


def hit_rate(samples: Sequence[Sample]) -> float:
    """Cached prompt tokens over prompt tokens."""
    prompt = sum(s.prompt_tokens for s in samples)
    return sum(s.cached_tokens for s in samples) / prompt if prompt else 0.0


def ceiling(samples: Sequence[Sample]) -> float:
    """The most a cache can speed prefill up: prompt tokens / tokens still prefilled."""
    prompt = sum(s.prompt_tokens for s in samples)
    uncached = sum(max(s.prompt_tokens - s.cached_tokens, 1) for s in samples)
    return prompt / uncached


def tier_tokens(samples: Sequence[Sample]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in samples:
        for tier, n in s.cached_by_tier.items():
            out[tier] = out.get(tier, 0) + n
    return out


def fmt_ms(s: Summary) -> str:
    if not s["n"]:
        return "-"
    return f"{s['median'] * 1e3:.0f} ({s['min'] * 1e3:.0f}-{s['max'] * 1e3:.0f})"


def fmt_ms1(s: Summary) -> str:
    """Like ``fmt_ms`` with one decimal (for phases of a few ms)."""
    if not s["n"]:
        return "-"
    return f"{s['median'] * 1e3:.1f} ({s['min'] * 1e3:.1f}-{s['max'] * 1e3:.1f})"


def fmt_ratio(s: Summary) -> str:
    if not s["n"]:
        return "-"
    return f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"


def fmt_count(s: Summary) -> str:
    return f"{s['median']:.0f} ({s['min']:.0f}-{s['max']:.0f})" if s["n"] else "-"
