"""Serving under load: /health stays fast during a long prefill, a client that disconnects
mid-stream stops its generation and leaves no locked blocks, a full queue answers 503."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.proxy.conftest import MAX_CONTEXT, ServerFactory
from tests.proxy.helpers import chat_body, salt, text
from tests.support.live_server import LiveServer


def _stats(server: LiveServer) -> dict[str, Any]:
    return httpx.get(server.url + "/v1/cache/stats", timeout=10).json()


def _wait_cancelled(server: LiveServer, before: int, timeout_s: float = 10.0) -> dict[str, Any]:
    """The cache stats once the worker counted one more cancelled generation and went idle; fails
    the test if the generation did not stop after the client left."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = _stats(server)
        if stats["cancelled"]["requests"] > before and not stats["queue"]["busy"]:
            return stats
        time.sleep(0.05)
    pytest.fail("the generation did not stop after the client disconnected")


def _long_prompt(seed: int) -> str:
    """Close to the 1024-token context: about 970 tokens of prefill (~2.9 tokens a word)."""
    return text(seed=seed, words=330)


def test_health_answers_fast_during_long_prefill(server: LiveServer) -> None:
    done = threading.Event()

    def long_requests() -> None:
        try:
            for i in range(4):
                body = {
                    "model": "demo",
                    "prompt": _long_prompt(40 + i),
                    "max_tokens": 1,
                    "cache_salt": salt(),
                }
                resp = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
                assert resp.status_code == 200, resp.text
        finally:
            done.set()

    worker = threading.Thread(target=long_requests)
    worker.start()
    latencies, busy_samples = [], 0
    with httpx.Client(timeout=5) as client:
        while not done.is_set():
            started = time.perf_counter()
            resp = client.get(server.url + "/health")
            latencies.append(time.perf_counter() - started)
            assert resp.status_code == 200
            busy_samples += resp.json()["queue"]["busy"]
            time.sleep(0.02)
    worker.join()
    assert busy_samples >= 3, "the prefill finished before /health could be sampled during it"
    assert max(latencies) < 0.2, f"slowest /health took {max(latencies) * 1000:.0f} ms"


def test_disconnect_mid_stream_stops_generation(server: LiveServer) -> None:
    prompt, cache_salt = text(seed=50, words=60), salt()
    # A first request caches the prefix, so the streamed one holds locked blocks while it runs.
    warm = httpx.post(
        server.url + "/v1/chat/completions", json=chat_body(prompt, cache_salt=cache_salt), timeout=60
    )
    assert warm.status_code == 200
    before = _stats(server)["cancelled"]["requests"]
    body = chat_body(
        prompt, cache_salt=cache_salt, max_tokens=MAX_CONTEXT - 300, temperature=1.0, seed=1, stream=True
    )
    locked_mid_stream = 0
    with (
        httpx.Client(timeout=60) as client,
        client.stream("POST", server.url + "/v1/chat/completions", json=body) as resp,
    ):
        assert resp.status_code == 200
        chunks = 0
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks += 1
            if chunks == 3:
                locked_mid_stream = _stats(server)["locked_blocks"]
            if chunks >= 4:
                break  # leaving the block closes the connection mid-stream
    assert locked_mid_stream > 0, "the streamed request should hold its cached blocks while it runs"
    stats = _wait_cancelled(server, before)
    assert stats["locked_blocks"] == 0
    assert stats["cancelled"]["completion_tokens"] < MAX_CONTEXT - 300


def test_full_queue_answers_503_with_retry_after(server_factory: ServerFactory) -> None:
    small = server_factory("--no-disk", "--max-queue", "2")
    body = {"model": "demo", "prompt": text(seed=60, words=120), "max_tokens": 16, "temperature": 0}

    def send(i: int) -> httpx.Response:
        return httpx.post(
            small.url + "/v1/completions", json={**body, "cache_salt": f"burst-{i}"}, timeout=120
        )

    with ThreadPoolExecutor(max_workers=10) as pool:
        responses = list(pool.map(send, range(10)))
    statuses = sorted(r.status_code for r in responses)
    assert 200 in statuses and 503 in statuses, statuses
    assert set(statuses) == {200, 503}
    for resp in responses:
        if resp.status_code == 503:
            assert int(resp.headers["Retry-After"]) >= 1
            assert resp.json()["error"]["code"] == "queue_full"
    # Still serving afterwards.
    assert httpx.post(small.url + "/v1/completions", json=body, timeout=60).status_code == 200


def test_disconnect_during_plain_request_stops_generation(server: LiveServer) -> None:
    before = _stats(server)["cancelled"]["requests"]
    body = chat_body(text(seed=51, words=40), max_tokens=MAX_CONTEXT - 200, temperature=1.0, seed=2)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=0.5)  # gives up and hangs up
    stats = _wait_cancelled(server, before)
    assert stats["locked_blocks"] == 0


def test_the_memory_budget_is_reserved_before_the_server_is_ready(server_factory: ServerFactory) -> None:
    """`kvproxy serve` faults its memory tier's budget in while it loads (a request then never
    pays for fresh pages); --no-memory-reserve leaves RSS to grow with use. Both answer alike."""
    budget = 384 << 20
    reserved = server_factory("--no-disk", "--memory-bytes", str(budget))
    lazy = server_factory("--no-disk", "--memory-bytes", str(budget), "--no-memory-reserve")
    assert reserved.rss_bytes() >= lazy.rss_bytes() + budget * 0.9
    body = {"model": "demo", "prompt": text(seed=7, words=40), "max_tokens": 8, "temperature": 0}
    answers = [httpx.post(s.url + "/v1/completions", json=body, timeout=60).json() for s in (reserved, lazy)]
    assert answers[0]["choices"][0]["text"] == answers[1]["choices"][0]["text"]
