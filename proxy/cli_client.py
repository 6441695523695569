"""``kvproxy stats``, ``flush``, ``pins``, ``pin`` and ``unpin``: talk to a running server's admin
routes."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from proxy.settings import format_size


class CliError(Exception):
    """A failure the CLI reports in one line (no traceback)."""


class ServerRefused(CliError):
    """The server answered an HTTP error: its ``status`` and ``message`` are kept for a command that
    reports one refusal and goes on (a prompt that cannot be pinned among several)."""

    def __init__(self, text: str, *, status: int, message: str) -> None:
        super().__init__(text)
        self.status = status
        self.message = message


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
        raise ServerRefused(
            f"{method} {path}: HTTP {response.status_code}: {message}{hint}",
            status=response.status_code,
            message=str(message),
        )
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


# "pin_" and 12 hex digits of the pin's last block hash: unique among any realistic set of pins, and
# `unpin` takes any unique prefix of an id.
SHORT_PIN_ID = 16


@dataclass(frozen=True)
class PinInputs:
    """What ``kvproxy pin`` sends: ``(where, body)`` per prompt, and the inputs it could not read."""

    items: tuple[tuple[str, dict[str, Any]], ...]
    problems: tuple[str, ...]


def pin_sources(files: Sequence[str], prompt: str | None) -> PinInputs:
    """The prompts of ``files`` (read as ``kvproxy warmup`` reads them) and ``--prompt``."""
    items: list[tuple[str, dict[str, Any]]] = []
    problems: list[str] = []
    if files:
        from proxy.cli_warmup import read_items  # pulls in the request schemas (and torch)

        for sourced in read_items([Path(f) for f in files], problems):
            items.append((sourced.where, sourced.item.model_dump(exclude_none=True)))
    if prompt is not None:
        items.append(("--prompt", {"prompt": prompt}))
    if not items and not problems:
        raise CliError("nothing to pin: give FILE... or --prompt TEXT")
    return PinInputs(tuple(items), tuple(problems))


def format_duration(seconds: float) -> str:
    """``299.4`` -> ``"4m 59s"``, ``300`` -> ``"5m"``: the two largest units, a zero second one left out."""
    s = max(0, int(seconds))
    for big, big_s, small, small_s in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if s >= big_s:
            rest = s % big_s // small_s
            return f"{s // big_s}{big}" + (f" {rest}{small}" if rest else "")
    return f"{s}s"


def pin_total(listing: dict[str, Any]) -> str:
    count = len(listing.get("pins", []))
    pins = f"{count} pin" + ("" if count == 1 else "s")
    limit = listing.get("max_pinned_bytes", 0)
    if not limit:
        return f"{pins}: pinning is off on this server (--max-pinned-bytes 0, or no prefix cache)"
    return (
        f"{pins}: {format_size(listing.get('pinned_bytes', 0))} pinned of {format_size(limit)} "
        f"(at most {format_size(listing.get('tenant_max_bytes', 0))} per tenant)"
    )


_SOURCE_LABELS = {"cache_control": "breakpoint", "prompt_cache_retention": "retention"}
"""Short names for the table (an 80-column terminal); ``--json`` keeps the API's."""


def render_pins(listing: dict[str, Any], console: Console) -> None:
    pinned = sorted(listing.get("pins", []), key=lambda p: (p["tenant"], p["expires_in_s"]))
    if pinned:
        table = Table(title="pins", title_justify="left")
        table.add_column("id", no_wrap=True)
        table.add_column("tenant", overflow="fold")  # wrapped when narrow, never cut short
        table.add_column("source", no_wrap=True)
        for col in ("tokens", "bytes", "expires in", "hits"):
            table.add_column(col, justify="right", no_wrap=True)
        for p in pinned:
            table.add_row(
                p["id"][:SHORT_PIN_ID],
                escape(p["tenant"]),
                _SOURCE_LABELS.get(p["source"], p["source"]),
                f"{p['tokens']:,}",
                format_size(p["bytes"]),
                format_duration(p["expires_in_s"]),
                str(p["hits"]),
            )
        console.print(table)
    else:
        console.print("no pins")
    console.print(pin_total(listing))


def pins(server: str, api_key: str | None, *, as_json: bool = False) -> int:
    listing = admin_request("GET", server, api_key, "/v1/cache/pins")
    if as_json:
        print(json.dumps(listing, indent=2))
    else:
        render_pins(listing, Console())
    return 0


def pin(
    server: str,
    api_key: str | None,
    inputs: PinInputs,
    *,
    ttl_s: float,
    tenant: str | None = None,
    cache_salt: str | None = None,
) -> int:
    """Pin each prompt; 1 when any input was unreadable or refused (the others are still pinned)."""
    out, err = Console(soft_wrap=True), Console(stderr=True, soft_wrap=True)
    for problem in inputs.problems:
        err.print(f"[yellow]skipped[/] {escape(problem)}")
    extra: dict[str, Any] = {"ttl_s": ttl_s}
    if tenant:
        extra["tenant"] = tenant
    if cache_salt:
        extra["cache_salt"] = cache_salt
    made, tokens, nbytes = 0, 0, 0
    for where, body in inputs.items:
        try:
            result = admin_request(
                "POST", server, api_key, "/v1/cache/pins", json={**body, **extra}, timeout=600.0
            )
        except ServerRefused as exc:
            if exc.status not in (400, 409, 413):  # about this prompt; anything else stops the run
                raise
            err.print(f"[red]not pinned[/] {escape(where)}: {escape(exc.message)}")
            continue
        p = result["pin"]
        made, tokens, nbytes = made + 1, tokens + p["tokens"], nbytes + p["bytes"]
        fresh = "" if result.get("blocks_written") else ", already cached"
        out.print(
            f"pinned [bold]{p['id']}[/]  {escape(where)}: tenant {escape(p['tenant'])}, "
            f"{p['tokens']:,} tokens in {p['blocks']} blocks, {format_size(p['bytes'])}, "
            f"expires in {format_duration(p['expires_in_s'])}{fresh}"
        )
        if result.get("yielded"):
            out.print(f"  released to make room: {', '.join(result['yielded'])}")
    failed = len(inputs.items) - made + len(inputs.problems)
    out.print(f"pinned {made} of {made + failed}: {tokens:,} tokens, {format_size(nbytes)}")
    return 1 if failed else 0


def resolve_pin_id(given: str, listing: dict[str, Any]) -> str:
    """The id of the one pin ``given`` names: the whole id, or a prefix of it (``pin_`` optional)."""
    ids = [p["id"] for p in listing.get("pins", [])]
    if given in ids:
        return given
    matches = [i for i in ids if i.startswith(given) or i.startswith("pin_" + given)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise CliError(f"no pin {given!r} (it may have expired; `kvproxy pins` lists them)")
    raise CliError(f"{given!r} names {len(matches)} pins ({', '.join(matches)}): give more of the id")


def unpin(server: str, api_key: str | None, given: Sequence[str]) -> int:
    # Every id is resolved before anything is dropped: a typo in the second drops nothing.
    listing = admin_request("GET", server, api_key, "/v1/cache/pins")
    ids = [resolve_pin_id(g, listing) for g in given]
    out, err = Console(soft_wrap=True), Console(stderr=True, soft_wrap=True)
    gone = 0
    for pin_id in ids:
        try:
            p = admin_request("DELETE", server, api_key, f"/v1/cache/pins/{pin_id}")["deleted"]
        except ServerRefused as exc:
            if exc.status != 404:
                raise
            err.print(f"[red]not unpinned[/] {pin_id}: {escape(exc.message)}")
            continue
        gone += 1
        out.print(
            f"unpinned {p['id']}: tenant {escape(p['tenant'])}, {p['tokens']:,} tokens, "
            f"{format_size(p['bytes'])} (its blocks stay cached, evictable again)"
        )
    return 0 if gone == len(ids) else 1
