"""16 concurrent clients with shared and distinct prefixes: all succeed, and each gets exactly
the text it gets when the same requests run one at a time."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from tests.proxy.helpers import salt, text
from tests.support.live_server import LiveServer

SHARED = [text(seed=21, words=60), text(seed=22, words=60)]


def _requests(cache_salt: str) -> list[dict[str, Any]]:
    bodies = []
    for i in range(16):
        # 12 share one of two long prefixes, 4 have prefixes of their own.
        prefix = SHARED[i % 2] if i < 12 else text(seed=100 + i, words=40)
        body: dict[str, Any] = {"model": "demo", "max_tokens": 6, "temperature": 0, "cache_salt": cache_salt}
        if i % 3 == 0:
            bodies.append({**body, "prompt": f"{prefix} question {i}?"})
        else:
            bodies.append(
                {
                    **body,
                    "messages": [
                        {"role": "system", "content": prefix},
                        {"role": "user", "content": f"question {i}?"},
                    ],
                }
            )
    return bodies


def _send(url: str, body: dict[str, Any]) -> tuple[str, int]:
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    resp = httpx.post(url + path, json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    data = resp.json()
    choice = data["choices"][0]
    out = choice["text"] if "prompt" in body else choice["message"]["content"]
    return out, data["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_sixteen_concurrent_clients_match_sequential(server: LiveServer) -> None:
    sequential = [_send(server.url, b) for b in _requests(salt())]
    concurrent_bodies = _requests(salt())  # a fresh namespace: the concurrent run starts cold too
    with ThreadPoolExecutor(max_workers=16) as pool:
        concurrent = list(pool.map(lambda b: _send(server.url, b), concurrent_bodies))
    assert [text for text, _ in concurrent] == [text for text, _ in sequential]
    # Later requests of a shared prefix find it cached in both runs.
    assert sum(cached for _, cached in sequential) > 0
    assert sum(cached for _, cached in concurrent) > 0
    stats = httpx.get(server.url + "/v1/cache/stats", timeout=10).json()
    assert stats["locked_blocks"] == 0
