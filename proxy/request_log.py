"""Recent requests and running totals for /v1/cache/stats and the dashboard.

Only lengths, tiers and reasons are kept: never prompt or completion text. Updated from the event
loop only, so it needs no lock.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class RequestRecord:
    at: float
    route: str
    tenant: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cached_by_tier: dict[str, int]
    cache: str
    """``hit`` (every full block restored), ``partial`` or ``miss``."""
    miss_reason: str | None
    miss_block: int | None
    ttft_ms: float | None
    finish_reason: str
    cache_key: str | None = None
    """The client's ``prompt_cache_key`` (a routing hint; never widens sharing)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def classify(prompt_tokens: int, cached_tokens: int, block_size: int, miss_reason: str | None) -> str:
    """hit: every full block of the prompt restored; partial: some; miss: none."""
    if cached_tokens <= 0:
        return "miss"
    full_blocks = prompt_tokens // block_size
    if miss_reason == "full_hit" or (full_blocks and -(-cached_tokens // block_size) >= full_blocks):
        return "hit"
    return "partial"


@dataclass
class _TtftTotals:
    count: int = 0
    total_ms: float = 0.0

    def add(self, ms: float) -> None:
        self.count += 1
        self.total_ms += ms

    def mean(self) -> float | None:
        return self.total_ms / self.count if self.count else None


@dataclass
class RequestLog:
    capacity: int = 200
    started_at: float = field(default_factory=time.time)
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    by_cache: dict[str, int] = field(default_factory=lambda: {"hit": 0, "partial": 0, "miss": 0})
    cached_by_tier: dict[str, int] = field(default_factory=dict)
    _ttft: dict[str, _TtftTotals] = field(default_factory=dict)
    _recent: deque[RequestRecord] = field(init=False)

    def __post_init__(self) -> None:
        self._recent = deque(maxlen=self.capacity)

    def add(self, record: RequestRecord) -> None:
        self.requests += 1
        self.prompt_tokens += record.prompt_tokens
        self.cached_tokens += record.cached_tokens
        self.completion_tokens += record.completion_tokens
        self.by_cache[record.cache] = self.by_cache.get(record.cache, 0) + 1
        for tier, tokens in record.cached_by_tier.items():
            self.cached_by_tier[tier] = self.cached_by_tier.get(tier, 0) + tokens
        if record.ttft_ms is not None:
            self._ttft.setdefault(record.cache, _TtftTotals()).add(record.ttft_ms)
        self._recent.append(record)

    def summary(self, recent: int = 50) -> dict[str, Any]:
        hits = self.by_cache.get("hit", 0) + self.by_cache.get("partial", 0)
        return {
            "requests": self.requests,
            "by_cache": dict(self.by_cache),
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "prefilled_tokens": self.prompt_tokens - self.cached_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens_by_tier": dict(self.cached_by_tier),
            "hit_rate": {
                # The headline figure: the share of prompt tokens that were not recomputed.
                "tokens": self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0,
                "requests": hits / self.requests if self.requests else 0.0,
            },
            "ttft_ms": {
                kind: (self._ttft[kind].mean() if kind in self._ttft else None)
                for kind in ("hit", "partial", "miss")
            },
            "recent": [r.to_json() for r in list(self._recent)[-recent:][::-1]],
        }

    def reset_recent(self) -> None:
        self._recent.clear()
