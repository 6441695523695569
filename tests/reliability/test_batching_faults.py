"""Faults while requests share the batch (continuous batching on: ``--max-batch 16``).

- A stalled Redis (SIGSTOP, or the fault proxy holding every byte) while streams are decoding:
  the running streams keep getting tokens while the new request's lookup waits on Redis, the new
  request is a ``store_unavailable`` miss within about the store timeout, every answer is the
  clean one. A Redis SIGKILLed mid-batch: the same, and nothing hangs.
- A corrupted record hit by one request of a batch: that request recomputes from the bad block
  (``verification_failed``), the others of the batch keep their full hits, every answer is right.
- An exception in one request's sampling or detokenizing (injected with monkeypatch in-process,
  with a ``sitecustomize`` in a live server): that request fails alone, the others of its batch
  finish with the tokens they get when run alone, the engine keeps serving, and the client gets a
  clean OpenAI-shaped error with no Python internals (and a keep-alive connection that still
  works). A request waiting for the blocks a failing request is prefilling is looked up again and
  served from what that request stored; two requests sharing a prefix that are ready in the same
  loop turn compute it once.

One kvproxy server with a private redis-server behind a fault proxy serves the Redis cases; the
server keeps no block in memory (``--memory-bytes 1``) and has no disk tier, so every lookup goes
to Redis. References are greedy (temperature 0) answers of the same prompts in a namespace
nothing was cached in, computed one at a time before any fault.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from openai import OpenAI

from cache_store.redis_store import EVENTS_INFIX
from model_runner.detokenize import CONTEXT_TOKENS, IncrementalDetokenizer
from model_runner.engine import Engine
from model_runner.engine_config import EngineConfig
from model_runner.loading import LoadedModel, load_model
from model_runner.records import Failed, Finished, GenerationRequest, TextDelta
from model_runner.sampling import SamplingParams
from model_runner.sequence import Event, TokenStream
from tests.model_runner.conftest import BLOCK, base_tokens, make_cache
from tests.proxy.helpers import expected_cached
from tests.reliability.conftest import BLOCK_SIZE, ServerFactory
from tests.reliability.helpers import Reply, chain_order, chat, chat_body, clean_reference, salt, text
from tests.support.fault_proxy import FaultProxy, Pass, Stall
from tests.support.live_server import LiveServer
from tests.support.redis_fixtures import RedisServer

MAX_BATCH = 16
TIMEOUT_MS = 200
COOLDOWN_S = 1.0
SLACK_S = 1.0
REDIS_PREFIX = "kvp:batch:"
DECODE_TOKENS = 96
"""Long enough (~1 s batched on 2 cores) that the running streams outlast a stalled lookup."""
RUNNING = 3
INTERNAL_ERROR = {
    "message": "The server had an internal error.",
    "type": "server_error",
    "param": None,
    "code": "internal_error",
}
INTERNALS = ("Traceback", "RuntimeError", "injected", 'File "', ".py")


# -- the Redis rig ---------------------------------------------------------------------------------


@dataclass
class Rig:
    redis: RedisServer
    proxy: FaultProxy
    server: LiveServer
    client: OpenAI

    def redis_state(self) -> dict[str, Any]:
        return dict(self.server.get_json("/health")["tiers"]["redis"])

    def ensure_redis_up(self) -> None:
        """Redis running and answering, traffic passing, the breaker closed (a request drives the
        half-open trial)."""
        self.proxy.set_fault(Pass())
        self.redis.resume()
        self.redis.start()
        deadline = time.monotonic() + 10 * COOLDOWN_S + 10
        while time.monotonic() < deadline:
            state = self.redis_state()
            if state["breaker"] == "closed" and state["healthy"]:
                return
            chat(self.server, chat_body(text(seed=1, words=40), cache_salt=salt()))
            time.sleep(0.1)
        raise AssertionError(f"the Redis breaker did not close: {self.redis_state()}")

    def batch(self) -> dict[str, Any]:
        return dict(self.server.get_json("/v1/cache/stats")["batch"])

    def redis_keys(self) -> set[bytes]:
        """Hashes of the blocks in Redis."""
        with self.redis.client() as client:
            return {
                bytes.fromhex(rkey.decode()[len(REDIS_PREFIX) :])
                for rkey in client.scan_iter(match=REDIS_PREFIX + "*", count=1000)
                if not rkey.decode().startswith(REDIS_PREFIX + EVENTS_INFIX)  # the event stream
            }

    def redis_records(self, keys: set[bytes]) -> dict[bytes, bytes]:
        with self.redis.client() as client:
            values = client.mget([REDIS_PREFIX + key.hex() for key in keys]) if keys else []
        return {key: value for key, value in zip(keys, values, strict=True) if value is not None}


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, module_server_factory: ServerFactory) -> Iterator[Rig]:
    redis_server = RedisServer(tmp_path_factory.mktemp("redis-batch")).start()
    proxy = FaultProxy(redis_server.port)
    server = module_server_factory(
        "--no-disk",
        "--redis-url", proxy.redis_url(),
        "--redis-prefix", REDIS_PREFIX,
        "--store-timeout-ms", str(TIMEOUT_MS),
        "--breaker-cooldown-s", str(COOLDOWN_S),
        "--memory-bytes", "1",
        "--max-batch", str(MAX_BATCH),
    )  # fmt: skip
    client = OpenAI(base_url=server.url + "/v1", api_key="not-needed", max_retries=0, timeout=60)
    yield Rig(redis_server, proxy, server, client)
    client.close()
    proxy.close()
    redis_server.resume()
    redis_server.kill()


# -- streaming through the official client, with arrival times -------------------------------------


@dataclass
class StreamLog:
    """One streamed chat request: when it was sent, when each content chunk arrived."""

    name: str
    sent: float = 0.0
    tokens: list[float] = field(default_factory=list)
    text: str = ""
    usage: dict[str, Any] | None = None
    error: BaseException | None = None
    decoding: threading.Event = field(default_factory=threading.Event)
    """Set once two content chunks came (the request is in the batch, decoding), or at the end."""
    done: float = 0.0

    @property
    def reply(self) -> Reply:
        assert self.error is None, f"{self.name} failed: {self.error!r}"
        assert self.usage is not None, f"{self.name}: no usage chunk"
        return Reply(self.text, self.usage, self.done - self.sent)

    def tokens_between(self, start: float, end: float) -> int:
        return sum(1 for t in self.tokens if start < t < end)


def _openai_args(body: dict[str, object]) -> dict[str, Any]:
    args = {k: v for k, v in body.items() if k != "cache_salt"}
    if "cache_salt" in body:
        args["extra_body"] = {"cache_salt": body["cache_salt"]}
    return args


def stream_chat(client: OpenAI, body: dict[str, object], log: StreamLog) -> StreamLog:
    parts: list[str] = []
    log.sent = time.monotonic()
    try:
        stream = client.chat.completions.create(
            **_openai_args(body), stream=True, stream_options={"include_usage": True}
        )
        for chunk in stream:
            now = time.monotonic()
            if chunk.choices and chunk.choices[0].delta.content:
                log.tokens.append(now)
                parts.append(chunk.choices[0].delta.content)
                if len(log.tokens) >= 2:
                    log.decoding.set()
            if chunk.usage is not None:
                log.usage = chunk.usage.model_dump()
    except Exception as exc:  # reported by the test thread
        log.error = exc
    finally:
        log.done = time.monotonic()
        log.text = "".join(parts)
        log.decoding.set()
    return log


def start_stream(client: OpenAI, body: dict[str, object], name: str) -> tuple[StreamLog, threading.Thread]:
    log = StreamLog(name)
    thread = threading.Thread(target=stream_chat, args=(client, body, log), name=name, daemon=True)
    thread.start()
    return log, thread


def join_all(threads: list[threading.Thread], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(max(deadline - time.monotonic(), 0.0))
    hung = [t.name for t in threads if t.is_alive()]
    assert not hung, f"requests still hanging after {timeout_s}s: {hung}"


def running_streams(rig: Rig, seed: int) -> tuple[list[dict[str, object]], list[Reply]]:
    """Bodies of ``RUNNING`` long generations (fresh namespaces) and their clean references."""
    bodies = [
        chat_body(text(seed=seed + i, words=30), max_tokens=DECODE_TOKENS, cache_salt=salt())
        for i in range(RUNNING)
    ]
    references = [clean_reference(rig.server, body) for body in bodies]
    for ref in references:
        # They must still be decoding when the new request arrives: no early end of sequence.
        assert ref.usage["completion_tokens"] == DECODE_TOKENS, ref.usage
    return bodies, references


@dataclass
class Cached:
    body: dict[str, object]
    reference: Reply
    chain: list[bytes]
    """Hashes of the blocks its first run stored in Redis, first to last."""


def cached_in_redis(rig: Rig, seed: int, words: int = 60, max_tokens: int = 6) -> Cached:
    """A prompt whose blocks are all in Redis (a full hit from there right now), its clean
    reference and its blocks."""
    body = chat_body(text(seed=seed, words=words), max_tokens=max_tokens, cache_salt=salt())
    reference = clean_reference(rig.server, body)
    rig.server.wait_written()
    before = rig.redis_keys()
    for _ in range(3):
        # A write or read can overrun the short store timeout on a loaded machine (a Redis just
        # resumed catches up on its backlog first): store again, until it reads back from Redis.
        chat(rig.server, body)
        rig.server.wait_written()
        warm = chat(rig.server, body)
        assert warm.text == reference.text
        if warm.miss_reason == "full_hit" and warm.by_tier == {"redis": warm.cached}:
            break
    else:
        raise AssertionError(f"the prompt never read back from Redis: {warm.usage}, {rig.redis_state()}")
    chain = chain_order(rig.redis_records(rig.redis_keys() - before))
    return Cached(body, reference, chain)


# -- 1. a stalled or killed Redis under a running batch --------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("stall", ["sigstop", "proxy-stall"])
def test_stalled_redis_delays_only_the_new_requests_admission(rig: Rig, stall: str) -> None:
    rig.ensure_redis_up()
    cached = cached_in_redis(rig, seed=800)
    new_body, new_reference = cached.body, cached.reference
    bodies, references = running_streams(rig, seed=810)
    batch_before = rig.batch()
    started = [start_stream(rig.client, body, f"running-{i}") for i, body in enumerate(bodies)]
    logs = [log for log, _ in started]
    for log in logs:
        assert log.decoding.wait(30), f"{log.name} never started decoding"
        assert log.error is None, log.error
    if stall == "sigstop":
        rig.redis.pause()
    else:
        rig.proxy.set_fault(Stall())
    try:
        new = stream_chat(rig.client, new_body, StreamLog("new"))
        join_all([t for _, t in started], 60)
    finally:
        rig.proxy.set_fault(Pass())
        rig.redis.resume()

    new_reply = new.reply
    assert new.tokens, "the new request got no token"
    first = new.tokens[0]
    # The new request waited on Redis for about the store timeout, then computed its prompt.
    assert new_reply.miss_reason == "store_unavailable", new_reply.usage
    assert new_reply.cached == 0, new_reply.usage
    lookup_ms = new_reply.usage["kvproxy"]["lookup_ms"]
    assert 0.9 * TIMEOUT_MS <= lookup_ms <= TIMEOUT_MS + 1000 * SLACK_S, new_reply.usage
    bound = TIMEOUT_MS / 1000 + new_reference.seconds + SLACK_S
    assert first - new.sent <= bound, f"first token {first - new.sent:.2f}s after sending > {bound:.2f}s"
    # Meanwhile the running streams kept decoding: tokens arrived after the new request was sent
    # and before its first token (a step loop blocked on the lookup would have sent none).
    during = {log.name: log.tokens_between(new.sent, first) for log in logs}
    assert all(n >= 3 for n in during.values()), (during, round(first - new.sent, 3))
    # ... and they were still running when the new request joined (it shared their batch).
    assert all(log.tokens[-1] > first for log in logs), "a running stream ended before the new request"
    # Every answer is the clean one.
    assert new_reply.text == new_reference.text
    for log, reference in zip(logs, references, strict=True):
        assert log.reply.text == reference.text, log.name
    batch_after = rig.batch()
    assert batch_after["batched"] and batch_after["max_batch"] == MAX_BATCH, batch_after
    assert batch_after["batched_steps"] > batch_before["batched_steps"]
    assert batch_after["max_step_requests"] >= RUNNING + 1, batch_after


@pytest.mark.slow
def test_redis_killed_mid_batch(rig: Rig) -> None:
    rig.ensure_redis_up()
    cached = cached_in_redis(rig, seed=820)
    new_body, new_reference = cached.body, cached.reference
    fresh_bodies = [
        chat_body(text(seed=830 + i, words=50), max_tokens=8, cache_salt=salt()) for i in range(2)
    ]
    fresh_references = [clean_reference(rig.server, body) for body in fresh_bodies]
    bodies, references = running_streams(rig, seed=840)
    started = [start_stream(rig.client, body, f"running-{i}") for i, body in enumerate(bodies)]
    for log, _ in started:
        assert log.decoding.wait(30), f"{log.name} never started decoding"
    rig.redis.kill()
    killed_at = time.monotonic()
    late = [start_stream(rig.client, new_body, "cached-before-the-kill")]
    late += [start_stream(rig.client, body, f"fresh-{i}") for i, body in enumerate(fresh_bodies)]
    try:
        join_all([t for _, t in started + late], 60)
    finally:
        rig.ensure_redis_up()

    for (log, _), reference in zip(started, references, strict=True):
        assert log.reply.text == reference.text, log.name
    for (log, _), reference in zip(late, [new_reference, *fresh_references], strict=True):
        reply = log.reply
        assert reply.text == reference.text, log.name
        assert log.sent >= killed_at
        bound = TIMEOUT_MS / 1000 + reference.seconds + SLACK_S
        assert log.tokens and log.tokens[0] - log.sent <= bound, (log.name, reply.usage)
        assert reply.cached == 0, reply.usage
    assert late[0][0].reply.miss_reason == "store_unavailable", late[0][0].reply.usage
    # Hits come back once Redis does (it restarted empty: write, then read back).
    cached_in_redis(rig, seed=850)


# -- 2. a corrupted record hit by one request of a batch -------------------------------------------


def _flip(record: bytes) -> bytes:
    out = bytearray(record)
    for i in range(len(out) - 512, len(out), 7):  # inside the K/V payload
        out[i] ^= 0xFF
    return bytes(out)


@pytest.mark.slow
def test_corrupt_record_fails_only_its_request_in_a_batch(rig: Rig) -> None:
    rig.ensure_redis_up()
    cached = [cached_in_redis(rig, seed=900 + i, words=60, max_tokens=40) for i in range(3)]
    assert all(len(c.chain) >= 3 for c in cached), "each prompt must span at least three blocks"
    bodies = [c.body for c in cached]
    references = [c.reference for c in cached]
    # The middle of the first prompt's cached prefix goes bad in Redis.
    target = cached[0].chain[1]
    with rig.redis.client() as client:
        key = REDIS_PREFIX + target.hex()
        good = client.get(key)
        assert good is not None
        client.set(key, _flip(good))
    rejected_before = rig.server.log_text().count("failed verification")

    started = [start_stream(rig.client, body, f"request-{i}") for i, body in enumerate(bodies)]
    join_all([t for _, t in started], 60)
    logs = [log for log, _ in started]
    replies = [log.reply for log in logs]

    # The three were decoding at the same time: the same steps of one batch.
    assert max(log.tokens[0] for log in logs) < min(log.tokens[-1] for log in logs), "no overlap"
    bad, *others = replies
    assert bad.text == references[0].text
    assert bad.miss_reason == "verification_failed", bad.usage
    assert bad.cached == BLOCK_SIZE, bad.usage  # block 0 restored, the restore stopped at block 1
    assert bad.by_tier == {"redis": BLOCK_SIZE}, bad.usage
    for i, (reply, reference) in enumerate(zip(others, references[1:], strict=True), start=1):
        assert reply.text == reference.text, i
        assert reply.miss_reason == "full_hit", reply.usage
        assert reply.cached == expected_cached(reply.usage["prompt_tokens"]), reply.usage
        assert reply.by_tier == {"redis": reply.cached}, reply.usage
    assert rig.server.log_text().count("failed verification") == rejected_before + 1
    rig.server.wait_written()
    with rig.redis.client() as client:
        assert client.get(REDIS_PREFIX + target.hex()) != _flip(good), "the bad record is still there"


# -- 3. an exception in one request's token stream --------------------------------------------------


@pytest.fixture(scope="module")
def llama(
    tiny_model_path: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LoadedModel]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: intra-op threads only add barrier waits on 2 cores
    yield load_model(
        str(tiny_model_path("llama")), "cpu", "float32", cache_dir=tmp_path_factory.mktemp("kvproxy-cache")
    )
    torch.set_num_threads(before)


@dataclass
class Collected:
    tokens: list[int]
    end: Finished | Failed


def collect(events: queue.SimpleQueue[Event], timeout_s: float = 30.0) -> Collected:
    tokens: list[int] = []
    deadline = time.monotonic() + timeout_s
    while True:
        event = events.get(timeout=max(deadline - time.monotonic(), 0.01))
        if isinstance(event, TextDelta):
            tokens.extend(event.token_ids)
        elif isinstance(event, Finished | Failed):
            return Collected(tokens, event)
        else:
            raise AssertionError(f"unexpected event {event!r}")


def _request(prompt: list[int], cache_salt: str = "", max_tokens: int = 12) -> GenerationRequest:
    return GenerationRequest(
        prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0), cache_salt=cache_salt
    )


def hold_loop(engine: Engine) -> Callable[[], None]:
    """Park the step loop between two turns (``Engine.call``); what is submitted meanwhile waits
    in its inbox and is taken in one turn. The returned function lets the lookups finish, then
    lets the loop go on."""
    entered, gate = threading.Event(), threading.Event()

    def hold() -> None:
        entered.set()
        gate.wait(30)

    held = engine.call(hold)
    assert entered.wait(10), "the step loop never ran the call"

    def release() -> None:
        time.sleep(0.2)
        gate.set()
        held.result(timeout=10)

    return release


def _alone(engine: Engine, prompt: list[int]) -> list[int]:
    events: queue.SimpleQueue[Event] = queue.SimpleQueue()
    engine.submit(_request(prompt, cache_salt=uuid.uuid4().hex), events.put)
    got = collect(events)
    assert isinstance(got.end, Finished), got.end
    return got.tokens


class InjectedFault(RuntimeError):
    pass


@pytest.mark.parametrize("where", ["sampling", "detokenizing"])
def test_a_fault_in_one_requests_token_stream_fails_it_alone(
    llama: LoadedModel, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    engine = Engine(llama, make_cache(), BLOCK, EngineConfig(max_batch=MAX_BATCH))
    try:
        prompts = [base_tokens(llama, 10 + i, seed=60 + i) for i in range(4)]
        assert len({tuple(p[-CONTEXT_TOKENS:]) for p in prompts}) == len(prompts)
        faulty = prompts[1]
        alone = [_alone(engine, p) for p in prompts]  # one at a time, before any fault
        assert engine.stats().failed == 0
        steps_before = engine.stats().steps

        if where == "sampling":
            accept = TokenStream.accept

            def faulty_accept(self: TokenStream, logits: torch.Tensor) -> bool:
                seq = self._seq
                if tuple(seq.prompt) == tuple(faulty) and len(seq.generated) >= 3:
                    raise InjectedFault("injected sampling fault")
                return accept(self, logits)

            monkeypatch.setattr(TokenStream, "accept", faulty_accept)
        else:
            push = IncrementalDetokenizer.push

            def faulty_push(self: IncrementalDetokenizer, token_id: int) -> str:
                ids = self._ids
                if (
                    tuple(ids[:CONTEXT_TOKENS]) == tuple(faulty[-CONTEXT_TOKENS:])
                    and len(ids) >= CONTEXT_TOKENS + 3
                ):
                    raise InjectedFault("injected detokenizer fault")
                return push(self, token_id)

            monkeypatch.setattr(IncrementalDetokenizer, "push", faulty_push)

        # Hold the step loop until all four are queued, so they are admitted into one batch.
        release = hold_loop(engine)
        queues: list[queue.SimpleQueue[Event]] = []
        for prompt in prompts:
            events: queue.SimpleQueue[Event] = queue.SimpleQueue()
            engine.submit(_request(prompt, cache_salt="batch"), events.put)
            queues.append(events)
        release()  # all four are taken in one turn and admitted together
        results = [collect(q) for q in queues]

        stats = engine.stats()
        assert stats.max_step_requests >= len(prompts), stats
        bad = results[1]
        assert isinstance(bad.end, Failed), bad.end
        assert isinstance(bad.end.error, InjectedFault), bad.end.error
        assert 0 < len(bad.tokens) < len(alone[1])  # it failed mid-stream, decoding with the others
        assert bad.tokens == alone[1][: len(bad.tokens)]  # what it sent before failing was right
        for i, (got, tokens) in enumerate(zip(results, alone, strict=True)):
            if i == 1:
                continue
            assert isinstance(got.end, Finished), (i, got.end)
            assert got.end.finish_reason == "length"
            assert got.tokens == tokens, i
        assert stats.failed == 1, stats
        assert stats.steps > steps_before
        assert engine.prefix_cache is not None
        assert not engine.prefix_cache.trie.locked_blocks(), "a failed request kept blocks pinned"

        # The engine keeps serving, the faulty prompt included once the fault is gone.
        monkeypatch.undo()
        # Through generate(), a request's Failed event is raised as its error.
        monkeypatch.setattr(TokenStream, "accept", _always_fails)
        with pytest.raises(InjectedFault):
            list(engine.generate(_request(prompts[0])))
        monkeypatch.undo()
        assert engine.stats().failed == 2
        for prompt, tokens in zip(prompts, alone, strict=True):
            assert _alone(engine, prompt) == tokens
        assert engine.stats().failed == 2
    finally:
        assert engine.close(grace_s=5)


def _always_fails(self: TokenStream, logits: torch.Tensor) -> bool:
    raise InjectedFault("injected sampling fault")


def _wait_idle(engine: Engine, timeout_s: float = 10.0) -> None:
    """The scheduler's figures are published at the top of each loop turn: wait for an idle one."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sched = engine.stats().scheduler
        if sched.running == 0 and sched.waiting == 0:
            return
        time.sleep(0.01)
    raise AssertionError(f"the engine did not go idle: {engine.stats()}")


@pytest.mark.parametrize("fail_at", [0, 3], ids=["first-token", "third-token"])
def test_a_request_waiting_on_a_failing_requests_blocks_is_served(
    llama: LoadedModel, monkeypatch: pytest.MonkeyPatch, fail_at: int
) -> None:
    """B's prompt extends A's and arrives while A is prefilling (in chunks of one block), so B
    waits for A's blocks. A fails in its sampling at the end of its prefill (``first-token``) or
    while decoding: B is looked up again, restores the blocks A stored and is served right."""
    engine = Engine(llama, make_cache(), BLOCK, EngineConfig(max_batch=2, max_batch_tokens=BLOCK))
    try:
        shared = base_tokens(llama, 5 * BLOCK + 1, seed=6)
        longer = shared + base_tokens(llama, 2 * BLOCK + 2, seed=71)
        alone = [_alone(engine, p) for p in (shared, longer)]
        accept = TokenStream.accept

        def faulty_accept(self: TokenStream, logits: torch.Tensor) -> bool:
            seq = self._seq
            if tuple(seq.prompt) == tuple(shared) and len(seq.generated) >= fail_at:
                raise InjectedFault("injected sampling fault")
            return accept(self, logits)

        monkeypatch.setattr(TokenStream, "accept", faulty_accept)
        release = hold_loop(engine)
        producer_q: queue.SimpleQueue[Event] = queue.SimpleQueue()
        follower_q: queue.SimpleQueue[Event] = queue.SimpleQueue()
        engine.submit(_request(shared, cache_salt="follow"), producer_q.put)
        # Submitted from the step loop in A's admission turn: B joins while A is prefilling.
        engine.call(lambda: engine.submit(_request(longer, cache_salt="follow"), follower_q.put))
        release()
        producer, follower = collect(producer_q), collect(follower_q)
        monkeypatch.undo()

        assert isinstance(producer.end, Failed) and isinstance(producer.end.error, InjectedFault)
        assert len(producer.tokens) <= fail_at
        assert isinstance(follower.end, Finished), follower.end
        assert follower.tokens == alone[1]
        # A stored its full prompt blocks chunk by chunk before it failed; B restored them.
        assert follower.end.usage.cached_tokens == len(shared) // BLOCK * BLOCK, follower.end.usage
        _wait_idle(engine)
        stats = engine.stats()
        assert stats.failed == 1, stats
        assert engine.prefix_cache is not None
        assert not engine.prefix_cache.trie.locked_blocks()
        assert _alone(engine, shared) == alone[0]
    finally:
        assert engine.close(grace_s=5)


def test_requests_sharing_a_prefix_that_arrive_together_compute_it_once(llama: LoadedModel) -> None:
    """Two requests ready in the same loop turn, the second extending the first: the second waits
    for the blocks the first is prefilling and restores them, instead of computing them again
    (as it does when it arrives one turn later, see the test above)."""
    engine = Engine(llama, make_cache(), BLOCK, EngineConfig(max_batch=MAX_BATCH))
    try:
        shared = base_tokens(llama, 5 * BLOCK + 1, seed=6)
        longer = shared + base_tokens(llama, 2 * BLOCK + 2, seed=71)
        release = hold_loop(engine)
        queues: list[queue.SimpleQueue[Event]] = []
        for prompt in (shared, longer):
            events: queue.SimpleQueue[Event] = queue.SimpleQueue()
            engine.submit(_request(prompt, cache_salt="together"), events.put)
            queues.append(events)
        release()  # both lookups (misses) are done: both are ready in the same turn
        first, second = (collect(q) for q in queues)
        assert isinstance(first.end, Finished) and isinstance(second.end, Finished)
        assert second.end.usage.cached_tokens == len(shared) // BLOCK * BLOCK, second.end.usage
    finally:
        assert engine.close(grace_s=5)


# -- 3b. the same through a live server: a clean error for the client -------------------------------

POISON = "poison-"
SITECUSTOMIZE = textwrap.dedent(
    f'''
    """Test-only fault: a request whose cache_salt starts with {POISON!r} fails in its sampling
    at its third token (loaded by a kvproxy server started by test_batching_faults.py)."""
    from model_runner.sequence import TokenStream

    _accept = TokenStream.accept


    def _faulty_accept(self, logits):
        seq = self._seq
        if seq.request.cache_salt.startswith({POISON!r}) and len(seq.generated) >= 3:
            raise RuntimeError("injected sampling fault in /srv/model_runner/sequence.py")
        return _accept(self, logits)


    TokenStream.accept = _faulty_accept
    '''
)


@pytest.fixture(scope="module")
def poison_server(
    module_server_factory: ServerFactory, tmp_path_factory: pytest.TempPathFactory
) -> LiveServer:
    """A server whose requests with a ``poison-`` cache_salt fail in their sampling."""
    site = tmp_path_factory.mktemp("site")
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    pythonpath = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    return module_server_factory("--no-disk", "--max-batch", str(MAX_BATCH), env={"PYTHONPATH": pythonpath})


def poisoned_body() -> dict[str, object]:
    return chat_body(text(seed=960, words=30), max_tokens=16, cache_salt=POISON + uuid.uuid4().hex)


@pytest.mark.slow
def test_a_failing_request_in_a_live_batch_gets_a_clean_error(poison_server: LiveServer) -> None:
    server = poison_server
    bodies = [
        chat_body(text(seed=950 + i, words=30), max_tokens=DECODE_TOKENS, cache_salt=salt())
        for i in range(RUNNING)
    ]
    references = [clean_reference(server, body) for body in bodies]

    def client() -> OpenAI:
        return OpenAI(base_url=server.url + "/v1", api_key="not-needed", max_retries=0, timeout=60)

    running_client, plain_client, stream_client = client(), client(), client()
    started = [start_stream(running_client, body, f"running-{i}") for i, body in enumerate(bodies)]
    for log, _ in started:
        assert log.decoding.wait(30), f"{log.name} never started decoding"
    # Non-streaming: HTTP 500 in the OpenAI error shape.
    with pytest.raises(openai.InternalServerError) as plain:
        plain_client.chat.completions.create(**_openai_args(poisoned_body()))
    plain_done = time.monotonic()
    assert plain.value.status_code == 500
    assert plain.value.response.json() == {"error": INTERNAL_ERROR}
    # Streaming: the status line went out already; an in-band error chunk, then the end.
    stream_log = stream_chat(stream_client, poisoned_body(), StreamLog("poisoned"))
    assert isinstance(stream_log.error, openai.APIError), stream_log.error
    assert stream_log.error.body == INTERNAL_ERROR, stream_log.error.body
    join_all([t for _, t in started], 60)

    for leaked in INTERNALS:
        assert leaked not in plain.value.response.text
        assert leaked not in str(stream_log.error.body)
    # The running streams shared the batch with both failures, untouched.
    for (log, _), reference in zip(started, references, strict=True):
        assert log.reply.text == reference.text, log.name
        assert log.tokens[0] < plain_done < stream_log.done < log.tokens[-1], f"{log.name} did not overlap"
    # The details are in the server's log; the server keeps serving.
    assert server.log_text().count("injected sampling fault") >= 2
    assert server.get_json("/health")["status"] == "ok"
    assert chat(server, bodies[0]).text == references[0].text
    for c in (running_client, plain_client, stream_client):
        c.close()


@pytest.mark.slow
def test_a_handled_500_keeps_the_connection_usable(poison_server: LiveServer) -> None:
    """After an internal-error 500 the client's keep-alive connection still works (or the response
    said ``Connection: close``): a pooled client must not meet a dropped connection next."""
    good = chat_body(text(seed=970, words=20), max_tokens=4)
    conn = http.client.HTTPConnection("127.0.0.1", poison_server.port, timeout=30)
    headers = {"Content-Type": "application/json"}
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(poisoned_body()), headers=headers)
        resp = conn.getresponse()
        payload = resp.read()
        assert resp.status == 500 and json.loads(payload) == {"error": INTERNAL_ERROR}, payload
        time.sleep(0.5)  # whatever the server does after sending the response is done by now
        if resp.will_close:
            return  # announced: a client opens a new connection
        try:
            conn.request("POST", "/v1/chat/completions", body=json.dumps(good), headers=headers)
            again = conn.getresponse()
            again.read()
        except (http.client.HTTPException, ConnectionError) as exc:
            raise AssertionError(
                f"the server dropped the keep-alive connection after a 500 without Connection: close: {exc!r}"
            ) from None
        assert again.status == 200
    finally:
        conn.close()
