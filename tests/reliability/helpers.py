"""Requests, references and readings shared by the reliability tests."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from cache_store.codec import RecordError, peek_header
from tests.proxy.helpers import chat_body, salt, text
from tests.support.live_server import LiveServer

__all__ = [
    "Reply",
    "chain_order",
    "chat",
    "chat_body",
    "clean_reference",
    "metric_total",
    "salt",
    "text",
]

CHAT = "/v1/chat/completions"


@dataclass(frozen=True)
class Reply:
    text: str
    usage: dict[str, Any]
    seconds: float

    @property
    def cached(self) -> int:
        return int(self.usage["prompt_tokens_details"]["cached_tokens"])

    @property
    def by_tier(self) -> dict[str, int]:
        return dict(self.usage["kvproxy"]["cached_by_tier"])

    @property
    def miss_reason(self) -> str:
        return str(self.usage["kvproxy"]["miss_reason"])


def chat(
    server: LiveServer,
    body: Mapping[str, object],
    *,
    headers: dict[str, str] | None = None,
    timeout: float = 60,
) -> Reply:
    """One non-streaming chat request that must succeed; its text, usage and wall time."""
    started = time.perf_counter()
    resp = httpx.post(server.url + CHAT, json=dict(body), headers=headers, timeout=timeout)
    seconds = time.perf_counter() - started
    assert resp.status_code == 200, f"{resp.status_code}: {resp.text[:500]}"
    data = resp.json()
    return Reply(data["choices"][0]["message"]["content"], data["usage"], seconds)


def clean_reference(server: LiveServer, body: Mapping[str, object], **kwargs: Any) -> Reply:
    """The same request in a namespace nothing was ever cached in (a fresh ``cache_salt``): a full
    prefill, i.e. what a server with no cache at all answers."""
    reply = chat(server, {**body, "cache_salt": salt()}, **kwargs)
    assert reply.cached == 0, reply.usage
    return reply


_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


def metric_total(metrics_text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (Prometheus text format)."""
    total = 0.0
    for line in metrics_text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or match["name"] != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"] or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match["value"])
    return total


def chain_order(records: Mapping[bytes, bytes]) -> list[bytes]:
    """Block hashes of ``records`` (hash -> record) from the first block of the chain to the last.
    Records from several prompts are fine as long as they form one chain from a root."""
    parents: dict[bytes, bytes] = {}
    for key, record in records.items():
        try:
            parents[key] = peek_header(record).parent
        except RecordError:
            continue
    children = {parent: key for key, parent in parents.items()}
    roots = [key for key, parent in parents.items() if parent not in parents]
    if len(roots) != 1:
        raise AssertionError(f"expected one chain, found {len(roots)} roots")
    order = [roots[0]]
    while order[-1] in children:
        order.append(children[order[-1]])
    return order
