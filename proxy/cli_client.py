"""``kvproxy stats`` and ``kvproxy flush``: talk to a running server's admin routes."""

from __future__ import annotations

from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from proxy.settings import format_size


class CliError(Exception):
    """A failure the CLI reports in one line (no traceback)."""


def admin_request(
    method: str, server: str, api_key: str | None, path: str, *, json: Any = None, timeout: float = 30.0
) -> Any:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = server.rstrip("/") + path
    try:
        response = httpx.request(method, url, headers=headers, json=json, timeout=timeout)
    except httpx.HTTPError as exc:
        raise CliError(f"cannot reach {server}: {exc.__class__.__name__}: {exc}") from None
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200]
        hint = " (pass --api-key or set KVPROXY_API_KEY)" if response.status_code in (401, 403) else ""
        raise CliError(f"{method} {path}: HTTP {response.status_code}: {message}{hint}")
    return response.json()


def _pct(value: float) -> str:
    return f"{value * 100:.1f}%"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def render_stats(stats: dict[str, Any], console: Console) -> None:
    rate = stats.get("hit_rate", {})
    overview = Table(
        title=f"kvproxy: {stats.get('model')}  (block size {stats.get('block_size')})",
        show_header=False,
        title_justify="left",
    )
    overview.add_column(style="bold")
    overview.add_column(justify="right")
    by_cache = stats.get("by_cache", {})
    overview.add_row(
        "requests",
        f"{stats.get('requests', 0)}  (hit {by_cache.get('hit', 0)}, partial "
        f"{by_cache.get('partial', 0)}, miss {by_cache.get('miss', 0)})",
    )
    overview.add_row("token hit rate", _pct(rate.get("tokens", 0.0)))
    overview.add_row("request hit rate", _pct(rate.get("requests", 0.0)))
    overview.add_row("prompt tokens", str(stats.get("prompt_tokens", 0)))
    overview.add_row("tokens saved (cached)", str(stats.get("cached_tokens", 0)))
    ttft = stats.get("ttft_ms", {})
    overview.add_row(
        "mean TTFT hit / partial / miss",
        f"{_ms(ttft.get('hit'))} / {_ms(ttft.get('partial'))} / {_ms(ttft.get('miss'))}",
    )
    overview.add_row("locked blocks", str(stats.get("locked_blocks", 0)))
    console.print(overview)

    tiers = Table(title="tiers", title_justify="left")
    for col in (
        "tier",
        "blocks",
        "bytes",
        "capacity",
        "hits",
        "misses",
        "hit rate",
        "evictions",
        "errors",
        "state",
    ):
        tiers.add_column(col, justify="left" if col in ("tier", "state") else "right")
    for name, t in stats.get("tiers", {}).items():
        errors = sum((t.get("errors") or {}).values())
        state = "ok" if t.get("healthy", True) else "DOWN"
        if t.get("breaker"):
            state += f" (breaker {t['breaker']})"
        cap = t.get("capacity_bytes")
        # A shared Redis is not counted (that would take a full SCAN); it reports 0 blocks.
        shared = name == "redis" and not cap and not t.get("blocks")
        tiers.add_row(
            name,
            "shared" if shared else str(t.get("blocks", 0)),
            "-" if shared else format_size(t.get("bytes", 0)),
            format_size(cap) if cap else "-",
            str(t.get("hits", 0)),
            str(t.get("misses", 0)),
            _pct(t.get("hit_rate", 0.0)),
            str(t.get("evictions", 0)),
            str(errors),
            state,
        )
    console.print(tiers)

    recent = stats.get("recent", [])[:10]
    if recent:
        table = Table(title="recent requests", title_justify="left")
        for col in ("route", "tenant", "prompt", "cached", "cache", "tiers", "miss reason", "TTFT"):
            table.add_column(col)
        for r in recent:
            by_tier = ", ".join(f"{k} {v}" for k, v in r.get("cached_by_tier", {}).items() if v) or "-"
            table.add_row(
                r["route"],
                r["tenant"],
                str(r["prompt_tokens"]),
                str(r["cached_tokens"]),
                r["cache"],
                by_tier,
                str(r.get("miss_reason") or "-"),
                _ms(r.get("ttft_ms")),
            )
        console.print(table)


def stats(server: str, api_key: str | None) -> int:
    render_stats(admin_request("GET", server, api_key, "/v1/cache/stats"), Console())
    return 0


def flush(server: str, api_key: str | None) -> int:
    result = admin_request("DELETE", server, api_key, "/v1/cache")
    tiers: dict[str, Any] = result.get("tiers", {})
    console = Console()
    console.print(f"flushed {result.get('deleted', 0)} blocks from {', '.join(tiers)}")
    failed = [name for name, outcome in tiers.items() if not outcome.get("ok", True)]
    if failed:
        console.print(f"[red]not flushed: {', '.join(failed)} failed; its blocks may remain[/red]")
        return 1
    return 0
