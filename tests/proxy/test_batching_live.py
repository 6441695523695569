"""Continuous batching through a live server and the official openai client.

A scheduler that quietly serialised requests must fail these: each test asserts, from the
server's own figures, that requests really ran together, and orders events rather than timing
them.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.proxy.conftest import ServerFactory
from tests.proxy.helpers import salt, text
from tests.support.live_server import LiveServer

LONG_CONTEXT = ["--max-context", "4096"]


def client_for(server: LiveServer) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=180)


@dataclass
class StreamLog:
    """One stream's chunks, each stamped with a counter shared by all streams of a test."""

    text: str = ""
    stamps: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None


class Clock:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = itertools.count()

    def tick(self) -> int:
        with self._lock:
            return next(self._count)


def stream_chat(
    client: OpenAI, content: str, clock: Clock, *, system: str | None = None, **params: Any
) -> StreamLog:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": content}
    ]
    log = StreamLog()
    stream = client.chat.completions.create(
        model="demo", messages=messages, stream=True, stream_options={"include_usage": True}, **params
    )
    for chunk in stream:
        if chunk.usage is not None:
            log.usage = chunk.usage.model_dump()
        for choice in chunk.choices:
            if choice.delta.content:
                log.text += choice.delta.content
                log.stamps.append(clock.tick())
            if choice.finish_reason:
                log.finish_reason = choice.finish_reason
    return log


class MetricPeak:
    """Polls one gauge on /metrics in the background; ``peak`` is the largest value seen."""

    def __init__(self, server: LiveServer, name: str) -> None:
        self._url = server.url + "/metrics"
        self._pattern = re.compile(rf"^{name} (\S+)$", re.MULTILINE)
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            match = self._pattern.search(httpx.get(self._url, timeout=10).text)
            if match:
                self.peak = max(self.peak, float(match.group(1)))
            self._stop.wait(0.02)

    def __enter__(self) -> MetricPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def wait_idle(server: LiveServer, timeout_s: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = server.get_json("/v1/cache/stats")
        if stats["queue"]["running"] == 0 and stats["queue"]["waiting"] == 0 and stats["locked_blocks"] == 0:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(
                f"the server did not go idle: {stats['queue']}, locked {stats['locked_blocks']}"
            )
        time.sleep(0.05)


def sixteen_requests() -> list[dict[str, Any]]:
    """Different lengths and sampling parameters: half greedy, half seeded sampling."""
    bodies = []
    for i in range(16):
        body: dict[str, Any] = {"content": text(seed=300 + i, words=10 + 9 * i), "max_tokens": 8 + i % 5}
        if i % 2:
            body.update(temperature=0.9, top_p=0.9, seed=1000 + i)
        else:
            body.update(temperature=0.0)
        bodies.append(body)
    return bodies


@pytest.mark.slow
def test_sixteen_concurrent_streams_equal_their_sequential_results(server_factory: ServerFactory) -> None:
    server = server_factory("--max-batch", "16", "--no-disk")
    client = client_for(server)
    clock = Clock()
    sequential = [
        stream_chat(client, clock=clock, extra_body={"cache_salt": salt()}, **b) for b in sixteen_requests()
    ]
    barrier = threading.Barrier(16)

    def concurrent(body: dict[str, Any]) -> StreamLog:
        barrier.wait(30)
        return stream_chat(client, clock=clock, extra_body={"cache_salt": salt()}, **body)

    with MetricPeak(server, "kvproxy_running_requests") as running, ThreadPoolExecutor(16) as pool:
        batched = list(pool.map(concurrent, sixteen_requests()))
    for i, (one, many) in enumerate(zip(sequential, batched, strict=True)):
        assert many.text == one.text and many.finish_reason == one.finish_reason, f"request {i}"
    assert running.peak >= 6, f"at most {running.peak} requests ever ran together"
    stats = wait_idle(server)
    assert stats["batch"]["max_step_requests"] >= 6 and stats["batch"]["batched_steps"] > 0


@pytest.mark.slow
def test_a_client_that_disconnects_mid_batch_leaves_the_others_intact(server_factory: ServerFactory) -> None:
    server = server_factory("--max-batch", "8", "--no-disk")
    client = client_for(server)
    clock = Clock()
    prompts = [text(seed=400 + i, words=30) for i in range(6)]
    expected = [stream_chat(client, p, clock, max_tokens=24, temperature=0).text for p in prompts]
    before = server.get_json("/v1/cache/stats")["cancelled"]["requests"]
    barrier = threading.Barrier(7)

    def full(prompt: str) -> str:
        barrier.wait(30)
        return stream_chat(client, prompt, clock, max_tokens=24, temperature=0).text

    def leaver() -> int:
        barrier.wait(30)
        got = 0
        with httpx.stream(
            "POST",
            server.url + "/v1/chat/completions",
            json={
                "model": "demo",
                "messages": [{"role": "user", "content": text(seed=499, words=40)}],
                "max_tokens": 400,
                "stream": True,
            },
            timeout=60,
        ) as resp:
            for line in resp.iter_lines():
                got += line.startswith("data: {")
                if got >= 3:
                    break  # the connection closes mid-stream
        return got

    with ThreadPoolExecutor(7) as pool:
        gone = pool.submit(leaver)
        results = list(pool.map(full, prompts))
        assert gone.result() == 3
    assert results == expected
    stats = wait_idle(server)
    assert stats["locked_blocks"] == 0
    deadline = time.monotonic() + 15
    while stats["cancelled"]["requests"] == before and time.monotonic() < deadline:
        time.sleep(0.05)
        stats = server.get_json("/v1/cache/stats")
    assert stats["cancelled"]["requests"] == before + 1
    assert stats["batch"]["max_step_requests"] >= 2


@pytest.mark.slow
def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(server_factory: ServerFactory) -> None:
    server = server_factory("--max-batch-tokens", "64", "--max-batch", "16", "--no-disk", *LONG_CONTEXT)
    client = client_for(server)
    clock = Clock()
    started = threading.Barrier(9)

    def decoder(i: int) -> StreamLog:
        log = StreamLog()
        stream = client.chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": text(seed=500 + i, words=20)}],
            stream=True,
            max_tokens=150,
            temperature=0,
        )
        for chunk in stream:
            for choice in chunk.choices:
                if choice.delta.content:
                    log.text += choice.delta.content
                    log.stamps.append(clock.tick())
                    if len(log.stamps) == 3:
                        started.wait(60)  # every decoder is running before the long prompt comes
        return log

    with ThreadPoolExecutor(8) as pool:
        decoders = [pool.submit(decoder, i) for i in range(8)]
        started.wait(60)
        sent_at = clock.tick()
        long = stream_chat(client, text(seed=599, words=420), clock, max_tokens=2, temperature=0)
        logs = [d.result() for d in decoders]
    assert long.usage is not None
    prompt_tokens = long.usage["prompt_tokens"]
    assert prompt_tokens >= 1000
    steps = long.usage["kvproxy"]["prefill_steps"]
    assert steps >= prompt_tokens // 64, f"a {prompt_tokens}-token prefill took only {steps} steps"
    first = long.stamps[0]
    # Streams still decoding when the long prompt's first token came received tokens all along
    # its prefill: the chunks went between decode steps, not ahead of them.
    alive = [log for log in logs if log.stamps and log.stamps[-1] > first]
    assert len(alive) >= 4, "too many decoding streams ended before the long prefill did"
    for log in alive:
        between = sum(1 for stamp in log.stamps if sent_at < stamp < first)
        assert between >= steps // 4, f"a decoding stream got {between} tokens during a {steps}-step prefill"


@pytest.mark.slow
def test_twelve_requests_on_one_new_prefix_prefill_it_once(server_factory: ServerFactory) -> None:
    server = server_factory("--max-batch", "16", "--no-disk", *LONG_CONTEXT)
    client = client_for(server)
    clock = Clock()
    system = text(seed=700, words=820)
    cache_salt = salt()
    barrier = threading.Barrier(12)

    def user(i: int) -> StreamLog:
        barrier.wait(30)
        return stream_chat(
            client,
            f"question {i}: what is {i} plus {i}?",
            clock,
            system=system,
            max_tokens=60,
            temperature=0,
            extra_body={"cache_salt": cache_salt},
        )

    with ThreadPoolExecutor(12) as pool:
        logs = list(pool.map(user, range(12)))
    usages = [log.usage for log in logs]
    assert all(u is not None for u in usages)
    prompt = min(u["prompt_tokens"] for u in usages)  # type: ignore[index]
    assert prompt >= 2000
    prefilled = sum(u["kvproxy"]["prefilled_tokens"] for u in usages)  # type: ignore[index]
    producers = [log for log in logs if log.usage["prompt_tokens_details"]["cached_tokens"] == 0]  # type: ignore[index]
    assert len(producers) == 1, [u["prompt_tokens_details"]["cached_tokens"] for u in usages]  # type: ignore[index]
    # The shared prefix went through the model once; the others prefilled their own tails only.
    assert prefilled < prompt + 11 * 64, f"{prefilled} prompt tokens computed for 12 x {prompt}"
    producer = producers[0]
    last = producer.stamps[-1]
    followers = [log for log in logs if log is not producer]
    assert all(log.stamps and log.stamps[0] < last for log in followers), (
        "the followers' first tokens must come while the first request still decodes"
    )
    stats = wait_idle(server)
    assert stats["batch"]["max_step_requests"] >= 2
