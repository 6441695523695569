"""A bounded load test on loopback: 32 concurrent clients for KVPROXY_LOAD_SECONDS (default 20)
against one server, mixing cache hits (shared system prompts) and misses (fresh cache_salt),
JSON and SSE, with some streams dropped midway. Zero errors except deliberate 503 back-pressure
(--max-queue is below the client count), the server's RSS within its configured budgets plus a
stated margin, every output (and the start of every dropped stream) equal to the sequential
(temperature 0) result although the requests ran batched (the default), and no block left locked
at the end. Requests/s and p50/p99 TTFT are printed and written to artifacts/load.json."""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.reliability.conftest import ServerFactory
from tests.reliability.helpers import text
from tests.support.live_server import LiveServer

CLIENTS = 32
SECONDS = float(os.environ.get("KVPROXY_LOAD_SECONDS", "20"))
MAX_QUEUE = 16
MEMORY_BYTES = 16 * 1024**2
DISK_BYTES = 64 * 1024**2
# What the server may use beyond its idle RSS and the memory tier's budget: up to MAX_QUEUE
# requests' activations and buffers, and blocks waiting in the write-behind queue for the disk.
RSS_MARGIN_BYTES = 256 * 1024**2
MAX_TOKENS = 8
CANCEL_SHARE = 0.15
ARTIFACT = Path(__file__).resolve().parents[2] / "artifacts" / "load.json"

SYSTEMS = [text(seed=1200 + i, words=70) for i in range(6)]
QUESTIONS = ["What is this about?", "Summarize it in five words.", "Which word comes first?"]


def body_for(system: int, question: int, *, stream: bool, cache_salt: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "demo",
        "messages": [
            {"role": "system", "content": SYSTEMS[system]},
            {"role": "user", "content": QUESTIONS[question]},
        ],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    if cache_salt is not None:
        body["cache_salt"] = cache_salt
    return body


@dataclass
class Tally:
    ok: int = 0
    rejected: int = 0  # 503 queue_full: deliberate back-pressure
    cancelled: int = 0
    hits: int = 0
    misses: int = 0
    ttft_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)


async def back_off(resp: httpx.Response, tally: Tally) -> None:
    """A well-behaved client waits as long as Retry-After says before trying again."""
    tally.rejected += 1
    await asyncio.sleep(float(resp.headers["Retry-After"]))


async def one_request(
    client: httpx.AsyncClient, rng: random.Random, reference: dict[tuple[int, int], str], tally: Tally
) -> None:
    key = (rng.randrange(len(SYSTEMS)), rng.randrange(len(QUESTIONS)))
    miss = rng.random() < 0.25
    stream = rng.random() < 0.6
    cancel = stream and rng.random() < CANCEL_SHARE
    body = body_for(*key, stream=stream, cache_salt=uuid.uuid4().hex if miss else None)
    started = time.perf_counter()
    if not stream:
        resp = await client.post("/v1/chat/completions", json=body)
        if resp.status_code == 503 and resp.json()["error"]["code"] == "queue_full":
            await back_off(resp, tally)
            return
        if resp.status_code != 200:
            tally.errors.append(f"{resp.status_code}: {resp.text[:200]}")
            return
        data = resp.json()
        out, usage = data["choices"][0]["message"]["content"], data["usage"]
    else:
        parts: list[str] = []
        usage = None
        async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            if resp.status_code == 503:
                payload = json.loads(await resp.aread())
                if payload["error"]["code"] == "queue_full":
                    await back_off(resp, tally)
                    return
            if resp.status_code != 200:
                tally.errors.append(f"{resp.status_code}: {(await resp.aread())[:200]!r}")
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    tally.errors.append(f"in-stream error: {chunk['error']}")
                    return
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk["choices"]:
                    if choice["delta"].get("content"):
                        if not parts:
                            tally.ttft_s.append(time.perf_counter() - started)
                        parts.append(choice["delta"]["content"])
                if cancel and parts:
                    tally.cancelled += 1
                    # What a dropped stream got so far is the start of the sequential answer.
                    if not reference[key].startswith("".join(parts)):
                        tally.mismatches.append(
                            f"{key} (dropped): {''.join(parts)!r} is no prefix of {reference[key]!r}"
                        )
                    return  # leaving the block drops the connection mid-stream
        out = "".join(parts)
        if usage is None:
            tally.errors.append("a stream ended without its usage chunk")
            return
    tally.ok += 1
    if usage["prompt_tokens_details"]["cached_tokens"]:
        tally.hits += 1
    else:
        tally.misses += 1
    if out != reference[key]:
        tally.mismatches.append(f"{key}: {out!r} != {reference[key]!r}")


async def client_loop(
    url: str, seed: int, deadline: float, reference: dict[tuple[int, int], str], tally: Tally
) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        while time.monotonic() < deadline:
            try:
                await one_request(client, rng, reference, tally)
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                tally.errors.append(repr(exc))


def sequential_reference(server: LiveServer) -> dict[tuple[int, int], str]:
    """Every (system, question) pair once, one at a time, from a cold cache."""
    out: dict[tuple[int, int], str] = {}
    for s in range(len(SYSTEMS)):
        for q in range(len(QUESTIONS)):
            resp = httpx.post(
                server.url + "/v1/chat/completions",
                json=body_for(s, q, stream=False, cache_salt=None),
                timeout=60,
            )
            assert resp.status_code == 200, resp.text
            out[(s, q)] = resp.json()["choices"][0]["message"]["content"]
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@pytest.mark.slow
def test_load(server_factory: ServerFactory, tmp_path: Path) -> None:
    server = server_factory(
        "--memory-bytes", str(MEMORY_BYTES),
        "--disk-dir", str(tmp_path / "blocks"),
        "--disk-bytes", str(DISK_BYTES),
        "--max-queue", str(MAX_QUEUE),
    )  # fmt: skip
    reference = sequential_reference(server)
    baseline_rss = server.rss_bytes()
    rss_samples: list[int] = []
    sampling = threading.Event()

    def sample_rss() -> None:
        while not sampling.is_set():
            rss_samples.append(server.rss_bytes())
            time.sleep(0.2)

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    tally = Tally()
    started = time.monotonic()
    deadline = started + SECONDS

    async def main() -> None:
        await asyncio.gather(
            *(client_loop(server.url, i, deadline, reference, tally) for i in range(CLIENTS))
        )

    try:
        asyncio.run(main())
    finally:
        sampling.set()
        sampler.join(timeout=5)
    elapsed = time.monotonic() - started

    # Cancelled generations leave the batch at its next step; wait until the engine is idle.
    stats: dict[str, Any] = {}
    for _ in range(100):
        stats = server.get_json("/v1/cache/stats")
        if not stats["queue"]["busy"] and stats["queue"]["waiting"] == 0:
            break
        time.sleep(0.1)
    budget = baseline_rss + MEMORY_BYTES + RSS_MARGIN_BYTES
    figures = {
        "clients": CLIENTS,
        "seconds": round(elapsed, 1),
        "requests_ok": tally.ok,
        "requests_per_s": round(tally.ok / elapsed, 2),
        "rejected_503": tally.rejected,
        "cancelled_streams": tally.cancelled,
        "hits": tally.hits,
        "misses": tally.misses,
        "ttft_ms_p50": round(percentile(tally.ttft_s, 0.5) * 1000, 1) if tally.ttft_s else None,
        "ttft_ms_p99": round(percentile(tally.ttft_s, 0.99) * 1000, 1) if tally.ttft_s else None,
        "ttft_ms_mean": round(statistics.fmean(tally.ttft_s) * 1000, 1) if tally.ttft_s else None,
        "rss_baseline_mib": round(baseline_rss / 2**20, 1),
        "rss_max_mib": round(max(rss_samples) / 2**20, 1),
        "rss_budget_mib": round(budget / 2**20, 1),
        "memory_tier_mib": MEMORY_BYTES // 2**20,
        "max_queue": MAX_QUEUE,
        "server_cancelled": stats.get("cancelled", {}).get("requests"),
        "batched": stats.get("batch", {}).get("batched"),
        "max_batch": stats.get("batch", {}).get("max_batch"),
        "batched_steps": stats.get("batch", {}).get("batched_steps"),
        "max_step_requests": stats.get("batch", {}).get("max_step_requests"),
        "locked_blocks_after": stats.get("locked_blocks"),
        "evictions": {name: tier["evictions"] for name, tier in stats.get("tiers", {}).items()},
    }
    print("load:", json.dumps(figures))
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    ARTIFACT.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")

    assert not tally.errors, Counter(tally.errors).most_common(3)
    assert not tally.mismatches, tally.mismatches[:3]
    # Batching was on (the default): the clients really shared steps, and the outputs above still
    # equal the sequential ones.
    assert figures["batched"] and figures["max_batch"] > 1, figures
    assert figures["batched_steps"] and figures["max_step_requests"] > 1, figures
    assert tally.ok >= CLIENTS and tally.hits and tally.misses and tally.cancelled
    assert max(rss_samples) <= budget, figures
    assert stats["locked_blocks"] == 0, stats["locked_blocks"]
    assert server.get_json("/health")["status"] == "ok"
