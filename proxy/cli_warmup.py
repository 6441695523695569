"""``kvproxy warmup FILE...``: prefill prompts into the cache, offline or through a server.

Files: JSONL (``.jsonl``/``.ndjson``/``.json``; one ``{"prompt": ...}`` or ``{"messages": [...]}``
per line) or plain text (the whole file is one prompt). Bad lines are reported with their line
number and skipped. Offline, the stores are written directly (the same options as ``serve``) and
the background writer is drained before the summary, so every tier holds the blocks.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from proxy.chat_plan import template_messages
from proxy.cli_client import CliError, admin_request
from proxy.schemas import WarmupItem

_JSONL_SUFFIXES = {".jsonl", ".ndjson", ".json"}
_BATCH = 4  # items per server request: small enough for a smooth progress bar


@dataclass(frozen=True)
class SourcedItem:
    item: WarmupItem
    where: str


@dataclass
class Totals:
    prompts: int = 0
    tokens: int = 0
    blocks_written: int = 0
    already_cached: int = 0
    skipped: list[str] = field(default_factory=list)

    def add(self, other: dict[str, Any]) -> None:
        self.prompts += int(other.get("prompts", 0))
        self.tokens += int(other.get("tokens", 0))
        self.blocks_written += int(other.get("blocks_written", 0))
        self.already_cached += int(other.get("already_cached", 0))


def read_items(paths: list[Path], problems: list[str]) -> list[SourcedItem]:
    items: list[SourcedItem] = []
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"{path}: cannot read ({exc.__class__.__name__})")
            continue
        if path.suffix.lower() in _JSONL_SUFFIXES:
            items.extend(_jsonl_items(path, text, problems))
        elif text.strip():
            items.append(SourcedItem(WarmupItem(prompt=text), str(path)))
        else:
            problems.append(f"{path}: empty file")
    return items


def _jsonl_items(path: Path, text: str, problems: list[str]) -> Iterator[SourcedItem]:
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{where}: not valid JSON ({exc.msg})")
            continue
        if not isinstance(data, dict):
            problems.append(f"{where}: expected an object with 'prompt' or 'messages'")
            continue
        try:
            yield SourcedItem(WarmupItem.model_validate(data), where)
        except ValidationError as exc:
            err = exc.errors(include_url=False, include_input=False)[0]
            loc = ".".join(str(p) for p in err["loc"])
            detail = str(err["msg"]).removeprefix("Value error, ")
            problems.append(f"{where}: {loc + ': ' if loc else ''}{detail}")


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("warming"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def via_server(
    items: list[SourcedItem], args: argparse.Namespace, api_key: str | None, console: Console, totals: Totals
) -> None:
    with _progress(console) as progress:
        task = progress.add_task("warmup", total=len(items))
        for start in range(0, len(items), _BATCH):
            batch = items[start : start + _BATCH]
            body: dict[str, Any] = {"items": [s.item.model_dump(exclude_none=True) for s in batch]}
            if args.tenant:
                body["tenant"] = args.tenant
            if args.cache_salt:
                body["cache_salt"] = args.cache_salt
            try:
                result = admin_request(
                    "POST", args.server, api_key, "/v1/cache/warmup", json=body, timeout=600.0
                )
            except CliError as exc:
                if "HTTP 400" not in str(exc):
                    raise
                # One bad item refuses the batch: retry its items one by one to keep the good ones.
                result = _one_by_one(batch, body, args, api_key, totals)
            totals.add(result)
            progress.advance(task, len(batch))


def _one_by_one(
    batch: list[SourcedItem],
    body: dict[str, Any],
    args: argparse.Namespace,
    api_key: str | None,
    totals: Totals,
) -> dict[str, Any]:
    merged = Totals()
    for sourced in batch:
        single = {**body, "items": [sourced.item.model_dump(exclude_none=True)]}
        try:
            merged.add(
                admin_request("POST", args.server, api_key, "/v1/cache/warmup", json=single, timeout=600.0)
            )
        except CliError as exc:
            totals.skipped.append(f"{sourced.where}: {exc}")
    return {
        "prompts": merged.prompts,
        "tokens": merged.tokens,
        "blocks_written": merged.blocks_written,
        "already_cached": merged.already_cached,
    }


def offline(items: list[SourcedItem], args: argparse.Namespace, console: Console, totals: Totals) -> None:
    from proxy.cli import STORE_OPTIONS, quiet_library_progress, settings_from_args
    from proxy.runtime import build_runtime

    settings = settings_from_args(args, STORE_OPTIONS)
    console.print(f"loading {settings.model_name} ...")
    quiet_library_progress()
    runtime = build_runtime(settings, metrics=None)
    tenant = args.tenant or "default"
    salt = args.cache_salt or ""
    try:
        with _progress(console) as progress:
            task = progress.add_task("warmup", total=len(items))
            for sourced in items:
                item = sourced.item
                if item.messages is not None:
                    ids = runtime.engine.encode_chat(template_messages(item.messages, runtime.engine.chat))
                else:
                    ids = runtime.engine.encode_prompt(item.prompt or "")
                if len(ids) >= runtime.max_context:
                    totals.skipped.append(
                        f"{sourced.where}: longer than the context "
                        f"({len(ids)} >= {runtime.max_context} tokens)"
                    )
                else:
                    totals.add(runtime.warmup(ids, tenant=tenant, cache_salt=salt))
                progress.advance(task)
        console.print("writing the lower tiers ...")
        if not runtime.drain(600.0):
            raise CliError("the store writer did not finish within 600 s")
    finally:
        runtime.close(grace_s=1.0, drain_s=5.0)


def run(args: argparse.Namespace, *, api_key: str | None) -> int:
    from proxy.cli import STORE_OPTIONS

    console = Console(stderr=True)
    if args.server:
        given = [name for name in STORE_OPTIONS if hasattr(args, name)]
        if given:
            flags = ", ".join("--" + n.replace("_", "-") for n in given)
            raise CliError(f"{flags}: store options apply offline only; the server uses its own")
    problems: list[str] = []
    items = read_items([Path(f) for f in args.files], problems)
    for problem in problems:
        console.print(f"[yellow]skipped[/] {problem}")
    if not items:
        raise CliError("nothing to warm: no valid prompts in the given files")
    totals = Totals()
    started = time.perf_counter()
    if args.server:
        via_server(items, args, api_key, console, totals)
    else:
        offline(items, args, console, totals)
    for problem in totals.skipped:
        console.print(f"[yellow]skipped[/] {problem}")
    elapsed = time.perf_counter() - started
    skipped = len(problems) + len(totals.skipped)
    Console().print(
        f"warmed {totals.prompts} prompts, {totals.tokens} tokens: {totals.blocks_written} blocks "
        f"written, {totals.already_cached} already cached, {skipped} skipped, in {elapsed:.1f} s"
    )
    return 0
