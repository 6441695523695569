"""Prompts and small helpers shared by the proxy's end-to-end tests."""

from __future__ import annotations

import uuid
from typing import Any

from tests.proxy.conftest import BLOCK_SIZE

_WORDS = [
    "cache",
    "block",
    "prefix",
    "token",
    "model",
    "server",
    "tenant",
    "memory",
    "disk",
    "redis",
    "restore",
    "prefill",
    "decode",
    "stream",
    "chunk",
    "usage",
    "metric",
    "latency",
    "window",
    "layer",
    "tensor",
    "namespace",
    "record",
    "verify",
    "hash",
]


def text(seed: int, words: int = 120) -> str:
    """Deterministic filler text: different seeds diverge from the first word."""
    out = [f"doc{seed}:"]
    for i in range(words):
        out.append(_WORDS[(seed * 7 + i * (seed % 5 + 3)) % len(_WORDS)])
    return " ".join(out)


def salt() -> str:
    """A fresh cache_salt: a cold, private namespace for one test."""
    return uuid.uuid4().hex


def expected_cached(prompt_tokens: int, block_size: int = BLOCK_SIZE) -> int:
    """DESIGN.md: cached_tokens = min(matched_blocks x block_size, prompt_tokens - 1)."""
    return min((prompt_tokens // block_size) * block_size, prompt_tokens - 1)


def chat_body(content: str, **extra: object) -> dict[str, object]:
    return {
        "model": "demo",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 6,
        "temperature": 0,
        **extra,
    }


# A tool schema a random model can only fill in a few tokens (every field bounded).
WEATHER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Tokyo", "Lima"]},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
