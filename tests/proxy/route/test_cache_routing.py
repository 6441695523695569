"""`kvproxy route`'s cache-aware routing against real replicas on one Redis: the block events they
publish, the router's own hashes, and what it does when a replica restarts, the stream is trimmed
under it or Redis goes away. Two in-process replicas of the tiny llama (blocks of 16), API keys
for two tenants, the official openai client through the router."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from proxy.route.feed import EventFeed
from proxy.route.replicas import Replicas
from proxy.route.scoring import CachePicker, rendezvous
from proxy.route.server import build_picker, reference_info
from proxy.route.settings import RouteSettings
from proxy.settings import ServeSettings
from tests.proxy.route.harness import ADMIN_KEY, USER_KEY, RouterServer
from tests.support.inprocess_server import FakeClock, InProcessServer
from tests.support.redis_fixtures import RedisServer

OTHER_KEY = "sk-route-other"
BLOCK = 16


def wait_until(cond: Callable[[], object], timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Stack:
    """Two replicas on ``redis_url`` under ``prefix`` and the router in front of them."""

    def __init__(self, model: Path, tmp: Path, redis_url: str, prefix: str) -> None:
        self.model, self.tmp, self.redis_url, self.prefix = model, tmp, redis_url, prefix
        self.keys = tmp / "keys.txt"
        self.keys.write_text(f"{ADMIN_KEY} team admin\n{USER_KEY} team\n{OTHER_KEY} other\n")
        self.replicas = [self.replica(i) for i in range(2)]
        self.urls = [r.url for r in self.replicas]
        settings = RouteSettings(
            replica=self.urls,
            replica_api_key=ADMIN_KEY,
            api_keys=self.keys,
            redis_url=redis_url,
            redis_prefix=prefix,
        )
        info = reference_info(settings, 30.0)
        self.picker: CachePicker
        self.feed: EventFeed
        self.picker, self.feed = build_picker(settings, info, tmp / "router")
        self.pool = Replicas(self.urls, health_interval_s=0.2)
        self.feed.refuse_with(self.pool.refuse)
        self.feed.start()
        self.router = RouterServer(self.pool, self.picker).start()  # type: ignore[arg-type]

    def replica(self, i: int, port: int | None = None) -> InProcessServer:
        settings = ServeSettings(
            model=str(self.model),
            served_model_name=["tiny"],
            disk_dir=self.tmp / f"blocks-{i}",
            block_size=BLOCK,
            max_context=512,
            default_max_tokens=4,
            api_keys=self.keys,
            redis_url=self.redis_url,
            redis_prefix=self.prefix,
        )
        return InProcessServer(settings, FakeClock(), port=port).start()

    def restart(self, i: int) -> None:
        port = self.replicas[i].port
        self.replicas[i].stop()
        self.replicas[i] = self.replica(i, port=port)

    def client(self, url: str, key: str = USER_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)

    def memory(self, url: str) -> set[bytes]:
        held = self.feed.holdings(url)
        return set(held.tiers["memory"]) if held is not None else set()

    def close(self) -> None:
        self.router.stop()
        self.feed.close()
        for r in self.replicas:
            r.stop()


def messages(doc: str, question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": doc}, {"role": "user", "content": question}]


def document(tag: str) -> str:
    return f"Document {tag}: " + " ".join(f"fact {tag}-{i} is worth remembering." for i in range(6))


def chat(client: openai.OpenAI, msgs: list[dict[str, str]], **extra: Any) -> tuple[str, dict[str, Any]]:
    """(the replica that answered, the answer's JSON)."""
    raw = client.chat.completions.with_raw_response.create(
        model="tiny",
        messages=msgs,
        max_tokens=2,
        temperature=0,
        **extra,  # type: ignore[arg-type]
    )
    return raw.headers.get("x-kvproxy-replica", ""), raw.http_response.json()


@pytest.fixture(scope="module")
def stack(
    tiny_model_path: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory, redis_url: str
) -> Iterator[Stack]:
    prefix = f"kvptest:route:{uuid.uuid4().hex}:"
    built = Stack(tiny_model_path("llama"), tmp_path_factory.mktemp("route-stack"), redis_url, prefix)
    yield built
    built.close()
    with redis.Redis.from_url(redis_url) as client:
        for key in client.scan_iter(match=prefix + "*"):
            client.unlink(key)


def hashes_of(stack: Stack, msgs: list[dict[str, str]], key: str = USER_KEY, **extra: Any) -> list[bytes]:
    found = stack.picker.hasher.hashes(
        "/v1/chat/completions", {"model": "tiny", "messages": msgs, **extra}, key
    )
    assert found
    return found


def test_a_prefix_held_in_memory_draws_its_requests_there(stack: Stack) -> None:
    doc = document("memory")
    first = messages(doc, "What is the first fact?")
    hashes = hashes_of(stack, first)
    home = rendezvous(hashes[0], stack.urls)[0]
    other = next(u for u in stack.urls if u != home)
    # Warm the prefix straight on the replica the cold home rule would not pick.
    served, _ = chat(stack.client(other), first)
    assert served == ""  # straight to the replica: no router header
    wait_until(lambda: set(hashes) <= stack.memory(other), what="the replica's stored events")
    before = stack.router.metric("kvproxy_route_decisions_total", replica=other, reason="memory")
    served, answer = chat(stack.client(stack.router.url), messages(doc, "And the last one?"))
    assert served == other
    usage = answer["usage"]
    shared_blocks = len(hashes_of(stack, messages(doc, "")))  # what both prompts share, at least
    assert (
        usage["prompt_tokens_details"]["cached_tokens"] >= min(shared_blocks, len(hashes) - 1) * BLOCK - BLOCK
    )
    assert (
        usage["kvproxy"]["cached_by_tier"].get("memory", 0) == usage["prompt_tokens_details"]["cached_tokens"]
    )
    assert stack.router.metric("kvproxy_route_decisions_total", replica=other, reason="memory") == before + 1


def test_the_router_hashes_every_route_as_the_replicas_do(stack: Stack) -> None:
    a = stack.urls[0]
    doc = document("hashes")
    cases: list[tuple[str, dict[str, Any], str]] = [
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": messages(doc, "Why?"), "max_tokens": 1},
            USER_KEY,
        ),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": messages(doc, "Why?"), "max_tokens": 1, "cache_salt": "s1"},
            USER_KEY,
        ),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": messages(doc, "Why?"), "max_tokens": 1},
            OTHER_KEY,
        ),
        ("/v1/completions", {"model": "tiny", "prompt": doc + " And so", "max_tokens": 1}, USER_KEY),
        (
            "/v1/messages",
            {
                "model": "tiny",
                "system": doc,
                "messages": [{"role": "user", "content": "Why?"}],
                "max_tokens": 1,
            },
            USER_KEY,
        ),
    ]
    seen: list[set[bytes]] = []
    for route, body, key in cases:
        response = httpx.post(a + route, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        assert response.status_code == 200, response.text
        expected = stack.picker.hasher.hashes(route, body, key)
        assert expected
        blocks = httpx.get(
            a + "/v1/cache/blocks", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10
        ).json()
        held = {bytes.fromhex(h) for h in blocks["memory"]}
        assert set(expected) <= held, route
        seen.append(set(expected))
    # Tenants and salts never share a block, through the router either.
    assert not seen[0] & seen[1] and not seen[0] & seen[2]
    _, answer = chat(stack.client(stack.router.url, OTHER_KEY), messages(document("tenant"), "Hi?"))
    assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    _, answer = chat(stack.client(stack.router.url, USER_KEY), messages(document("tenant"), "Hi?"))
    assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # the other tenant's blocks


def test_a_stream_trimmed_under_the_router_is_recovered_from_a_snapshot(stack: Stack) -> None:
    a = stack.urls[0]
    wait_until(lambda: stack.feed.holdings(a) is not None, what="the index of the first replica")
    stack.feed.stop()  # the router falls behind...
    first = messages(document("trim-1"), "One?")
    chat(stack.client(a), first)
    info = httpx.get(
        a + "/v1/cache/info", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10
    ).json()
    with redis.Redis.from_url(stack.redis_url) as client:
        assert client.xlen(info["events"]["stream"]) > 0
        client.xtrim(info["events"]["stream"], maxlen=0, approximate=False)  # ...and its events are gone
    second = messages(document("trim-2"), "Two?")
    chat(stack.client(a), second)
    resyncs = stack.feed.resyncs
    stack.feed.start()
    wanted = set(hashes_of(stack, first)) | set(hashes_of(stack, second))
    wait_until(lambda: wanted <= stack.memory(a), what="the snapshot to bring the trimmed blocks back")
    assert stack.feed.resyncs > resyncs


def test_a_restarted_replica_starts_with_an_empty_index_and_a_killed_one_loses_no_request(
    stack: Stack,
) -> None:
    b = stack.urls[1]
    doc = document("restart")
    hashes = hashes_of(stack, messages(doc, "Q?"))
    chat(stack.client(b), messages(doc, "Q?"))
    wait_until(lambda: set(hashes) <= stack.memory(b), what="b's blocks in the index")
    old_epoch = stack.feed.holdings(b).epoch  # type: ignore[union-attr]
    stack.restart(1)
    # The new epoch (seen by the health probe) drops b's index; its snapshot is empty of them.
    wait_until(
        lambda: (h := stack.feed.holdings(b)) is not None and h.epoch != old_epoch,
        what="the restarted replica's new epoch",
    )
    assert not set(hashes) & stack.memory(b)

    # Stop one replica under traffic: every request through the router is still answered, and
    # once it is gone every request goes to the other.
    def ask(i: int) -> str:
        served, answer = chat(stack.client(stack.router.url), messages(document(f"kill-{i}"), "Q?"))
        assert answer["choices"][0]["message"] is not None
        return served

    with ThreadPoolExecutor(max_workers=4) as pool:
        during = [pool.submit(ask, i) for i in range(12)]
        time.sleep(0.05)
        stack.replicas[1].stop()
        assert all(f.result(timeout=60) in stack.urls for f in during)
    assert [ask(100 + i) for i in range(4)] == [stack.urls[0]] * 4
    stack.restart(1)
    wait_until(lambda: stack.pool.get(b).healthy, what="the replica back")  # type: ignore[union-attr]


@pytest.mark.slow
def test_without_redis_routing_goes_on_from_what_the_router_sent(
    tiny_model_path: Callable[[str], Path], tmp_path: Path, private_redis: RedisServer
) -> None:
    stack = Stack(tiny_model_path("llama"), tmp_path, private_redis.url, "kvp:v1:")
    try:
        doc = document("no-redis")
        served, first = chat(stack.client(stack.router.url), messages(doc, "First?"))
        assert served in stack.urls
        private_redis.stop()
        wait_until(lambda: stack.feed.holdings(served) is None, what="the index to go stale")
        before = stack.router.metric("kvproxy_route_decisions_total", replica=served, reason="memory")
        again, second = chat(stack.client(stack.router.url), messages(doc, "First?"))
        assert again == served
        assert second["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        assert (
            stack.router.metric("kvproxy_route_decisions_total", replica=served, reason="memory")
            == before + 1
        )
    finally:
        stack.close()


def test_warmup_and_pins_go_where_their_prefix_routes(stack: Stack) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    router = stack.router.url
    doc = document("warm")
    # An operator warms a conversation for tenant "other" through the router.
    warm = {"items": [{"messages": messages(doc, "Q?")}], "tenant": "other"}
    response = httpx.post(router + "/v1/cache/warmup", json=warm, headers=admin, timeout=60)
    assert response.status_code == 200, response.text
    warmed = response.headers["x-kvproxy-replica"]
    expected = hashes_of(stack, messages(doc, "Q?"), key=OTHER_KEY)
    held = httpx.get(warmed + "/v1/cache/blocks", headers=admin, timeout=10).json()["memory"]
    assert set(expected) <= {bytes.fromhex(h) for h in held}
    wait_until(lambda: set(expected) <= stack.memory(warmed), what="the warmed blocks in the index")
    served, answer = chat(stack.client(router, OTHER_KEY), messages(doc, "Q?"))
    assert served == warmed
    assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == len(expected) * BLOCK
    # A pin goes where its prefix routes; listing and deleting pins fan out to every replica.
    pin = {"prompt": document("pin"), "ttl_s": 60}
    response = httpx.post(router + "/v1/cache/pins", json=pin, headers=admin, timeout=60)
    assert response.status_code == 200, response.text
    pinned_on, pin_id = response.headers["x-kvproxy-replica"], response.json()["pin"]["id"]
    listed = httpx.get(router + "/v1/cache/pins", headers=admin, timeout=10).json()["replicas"]
    assert set(listed) == set(stack.urls)
    assert [p["id"] for p in listed[pinned_on]["pins"]] == [pin_id]
    deleted = httpx.delete(f"{router}/v1/cache/pins/{pin_id}", headers=admin, timeout=10)
    assert deleted.status_code == 200 and "deleted" in deleted.json()["replicas"][pinned_on]
