"""The router in front of real replicas, driven by the official openai and anthropic clients:
answers through it equal the replica's own, the picker's order is honoured, a replica that stops
costs no client request (retried before the first byte), all down is a 503 in each API's shape, a
client that leaves makes the replica cancel, and the cache admin routes fan out."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from proxy.route.forward import REPLICA_HEADER
from proxy.route.replicas import Replicas
from tests.proxy.route.harness import (
    ADMIN_KEY,
    USER_KEY,
    FixedPicker,
    RouterServer,
    start_replica,
    write_api_keys,
)
from tests.support.inprocess_server import InProcessServer
from tests.support.redis_fixtures import free_port

SYSTEM = "You are a careful assistant for the kvproxy router tests. Answer briefly and precisely. " * 2
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def api_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_api_keys(tmp_path_factory.mktemp("route-keys") / "keys.txt")


@pytest.fixture(scope="module")
def pair(
    tiny_llama_path: Path, api_keys: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[InProcessServer, InProcessServer]]:
    a = start_replica(tiny_llama_path, tmp_path_factory.mktemp("replica-a"), api_keys)
    b = start_replica(tiny_llama_path, tmp_path_factory.mktemp("replica-b"), api_keys)
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture(scope="module")
def router(pair: tuple[InProcessServer, InProcessServer]) -> Iterator[RouterServer]:
    a, b = pair
    with RouterServer(Replicas([a.url, b.url], health_interval_s=0.2), FixedPicker()) as server:
        yield server


@pytest.fixture
def picker(router: RouterServer) -> FixedPicker:
    router.picker.reset()
    return router.picker


def oai(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=ADMIN_KEY, max_retries=0)


def claude(url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key=ADMIN_KEY, max_retries=0)


def model_id(tiny_llama_path: Path) -> str:
    return str(tiny_llama_path)


def stats(server: InProcessServer) -> dict[str, Any]:
    return httpx.get(server.url + "/v1/cache/stats", headers=ADMIN, timeout=10).json()


def wait_cancelled(server: InProcessServer, before: int, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        current = stats(server)
        if current["cancelled"]["requests"] > before and not current["queue"]["busy"]:
            return
        time.sleep(0.05)
    pytest.fail("the replica did not cancel the generation after the client left the router")


def wait_idle(router: RouterServer, timeout_s: float = 10.0) -> dict[str, Any]:
    """The router's /health once it has nothing in flight."""
    deadline = time.monotonic() + timeout_s
    while True:
        body = httpx.get(router.url + "/health", timeout=5).json()
        if all(r["in_flight"] == 0 for r in body["replicas"].values()) or time.monotonic() > deadline:
            return body
        time.sleep(0.05)


def test_openai_answers_through_the_router_equal_the_replicas_own(
    router: RouterServer,
    picker: FixedPicker,
    pair: tuple[InProcessServer, InProcessServer],
    tiny_llama_path: Path,
) -> None:
    a, b = pair
    picker.order = [b.url, a.url]
    model = model_id(tiny_llama_path)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Count to four."}]
    args: dict[str, Any] = {"model": model, "messages": messages, "temperature": 0, "max_tokens": 8}
    decided = router.metric("kvproxy_route_decisions_total", replica=b.url, reason="key")
    cached_before = router.metric("kvproxy_route_cached_tokens_total", replica=b.url)

    want = oai(b.url).chat.completions.create(**args)
    raw = oai(router.url).chat.completions.with_raw_response.create(**args)
    assert raw.headers[REPLICA_HEADER] == b.url
    got = raw.parse()
    assert got.choices[0].message.content == want.choices[0].message.content
    assert got.usage is not None and got.usage.prompt_tokens_details is not None
    cached = got.usage.prompt_tokens_details.cached_tokens or 0
    assert cached > 0  # the direct request left the prefix on b

    raw_stream = oai(router.url).chat.completions.with_raw_response.create(
        **args, stream=True, stream_options={"include_usage": True}
    )
    assert raw_stream.headers[REPLICA_HEADER] == b.url
    assert raw_stream.headers["content-type"].startswith("text/event-stream")
    chunks = list(raw_stream.parse())
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == want.choices[0].message.content
    )
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens_details is not None
    streamed_cached = usage.prompt_tokens_details.cached_tokens or 0

    completion = {"model": model, "prompt": SYSTEM, "temperature": 0, "max_tokens": 6}
    want_text = oai(b.url).completions.create(**completion).choices[0].text
    raw_completion = oai(router.url).completions.with_raw_response.create(**completion)
    assert raw_completion.headers[REPLICA_HEADER] == b.url
    assert raw_completion.parse().choices[0].text == want_text
    completion_cached = raw_completion.parse().usage.prompt_tokens_details.cached_tokens  # type: ignore[union-attr]

    assert picker.routed_to == [b.url] * 3
    seen = picker.requests[0]
    assert (seen.route, seen.api_key, seen.body["messages"]) == ("/v1/chat/completions", ADMIN_KEY, messages)
    assert picker.offered[0] == [a.url, b.url]
    assert router.metric("kvproxy_route_decisions_total", replica=b.url, reason="key") == decided + 3
    total = cached + streamed_cached + (completion_cached or 0)
    assert router.metric("kvproxy_route_cached_tokens_total", replica=b.url) == cached_before + total


def test_anthropic_answers_through_the_router_equal_the_replicas_own(
    router: RouterServer,
    picker: FixedPicker,
    pair: tuple[InProcessServer, InProcessServer],
    tiny_llama_path: Path,
) -> None:
    a, _ = pair
    picker.order = [a.url]
    args: dict[str, Any] = {
        "model": model_id(tiny_llama_path),
        "max_tokens": 8,
        "extra_body": {"temperature": 0},  # greedy (this SDK has no temperature argument)
        "system": SYSTEM,
        "messages": [{"role": "user", "content": "Name three colours."}],
    }
    want = claude(a.url).messages.create(**args)
    raw = claude(router.url).messages.with_raw_response.create(**args)
    assert raw.headers[REPLICA_HEADER] == a.url
    got = raw.parse()
    assert got.content == want.content and got.stop_reason == want.stop_reason
    assert (got.usage.cache_read_input_tokens or 0) > 0
    with claude(router.url).messages.stream(**args) as stream:
        text = "".join(stream.text_stream)
        assert stream.response.headers[REPLICA_HEADER] == a.url
    assert [text] == [block.text for block in want.content if block.type == "text"]
    count = {k: v for k, v in args.items() if k in ("model", "system", "messages")}
    beta = claude(router.url).beta.messages.with_raw_response.count_tokens(
        **count, extra_query={"beta": "true"}
    )
    assert beta.http_request.url.params["beta"] == "true" and beta.headers[REPLICA_HEADER] == a.url
    assert beta.parse().input_tokens == claude(a.url).messages.count_tokens(**count).input_tokens
    assert [r.route for r in picker.requests] == ["/v1/messages"] * 2 + ["/v1/messages/count_tokens"]
    assert all(r.api_key == ADMIN_KEY for r in picker.requests)


def test_the_pickers_order_is_honoured_and_unknown_replicas_skipped(
    router: RouterServer,
    picker: FixedPicker,
    pair: tuple[InProcessServer, InProcessServer],
    tiny_llama_path: Path,
) -> None:
    a, b = pair
    body = {"model": model_id(tiny_llama_path), "prompt": "one two three", "max_tokens": 2, "temperature": 0}
    with httpx.Client(timeout=30, headers=ADMIN) as client:
        for order, expected in (([a.url], a.url), ([b.url], b.url), (["http://127.0.0.1:9", b.url], b.url)):
            picker.order = order
            resp = client.post(router.url + "/v1/completions", json=body)
            assert resp.status_code == 200 and resp.headers[REPLICA_HEADER] == expected
        # A body that is not JSON still goes to the picked replica, which answers its own 400.
        picker.order = [a.url]
        resp = client.post(router.url + "/v1/chat/completions", content=b"{not json")
        assert resp.status_code == 400 and resp.headers[REPLICA_HEADER] == a.url
        assert resp.json()["error"]["code"] == "invalid_json"
    assert picker.requests[-1].body == {}
    assert picker.routed_to == [a.url, b.url, b.url]  # the 400 is no routing


def test_models_health_and_the_cache_admin_routes(
    router: RouterServer, pair: tuple[InProcessServer, InProcessServer], tiny_llama_path: Path
) -> None:
    a, b = pair
    models = oai(router.url).models.with_raw_response.list()
    assert models.headers[REPLICA_HEADER] in (a.url, b.url)
    assert [m.id for m in models.parse().data] == [model_id(tiny_llama_path)]
    health = wait_idle(router)
    assert health["status"] == "ok"
    assert set(health["replicas"]) == {a.url, b.url}
    for url, state in health["replicas"].items():
        # The epoch is whatever the replica's own /health says (none when it has no events).
        epoch = httpx.get(url + "/health", timeout=5).json().get("epoch")
        assert state == {"healthy": True, "in_flight": 0, "epoch": epoch}
    with httpx.Client(timeout=30) as client:
        resp = client.get(router.url + "/v1/cache/stats", headers=ADMIN)
        assert resp.status_code == 200
        assert {url: s["block_size"] for url, s in resp.json()["replicas"].items()} == {a.url: 16, b.url: 16}
        refused = client.get(router.url + "/v1/cache/stats")
        assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
        assert "www-authenticate" in refused.headers
        assert client.delete(router.url + "/v1/cache", headers={"x-api-key": USER_KEY}).status_code == 403
        cleared = client.delete(router.url + "/v1/cache", headers=ADMIN)
        assert cleared.status_code == 200 and set(cleared.json()["replicas"]) == {a.url, b.url}
    for replica in (a, b):
        assert stats(replica)["tiers"]["memory"]["blocks"] == 0


def test_a_streaming_client_that_leaves_the_router_makes_the_replica_cancel(
    router: RouterServer,
    picker: FixedPicker,
    pair: tuple[InProcessServer, InProcessServer],
    tiny_llama_path: Path,
) -> None:
    a, _ = pair
    picker.order = [a.url]
    before = stats(a)["cancelled"]["requests"]
    body = {
        "model": model_id(tiny_llama_path),
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 400,
        "temperature": 1.0,
        "seed": 1,
        "stream": True,
    }
    chunks = 0
    with httpx.stream(
        "POST", router.url + "/v1/chat/completions", json=body, headers=ADMIN, timeout=30
    ) as resp:
        assert resp.status_code == 200 and resp.headers[REPLICA_HEADER] == a.url
        for line in resp.iter_lines():
            chunks += line.startswith("data: {")
            if chunks >= 3:
                break  # leaving the block hangs up mid-stream
    wait_cancelled(a, before)
    assert wait_idle(router)["replicas"][a.url]["in_flight"] == 0


def test_a_client_that_leaves_before_the_answer_makes_the_replica_cancel(
    router: RouterServer,
    picker: FixedPicker,
    pair: tuple[InProcessServer, InProcessServer],
    tiny_llama_path: Path,
) -> None:
    _, b = pair
    picker.order = [b.url]
    before = stats(b)["cancelled"]["requests"]
    body = {
        "model": model_id(tiny_llama_path),
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 480,
        "temperature": 1.0,
        "seed": 1,
    }

    async def leave_while_it_runs() -> None:
        # Hang up once the replica is generating (whatever the machine's load), before any byte
        # of the non-streamed answer came back.
        async with httpx.AsyncClient(timeout=60) as client:
            sent = asyncio.create_task(
                client.post(router.url + "/v1/chat/completions", json=body, headers=ADMIN)
            )
            deadline = time.monotonic() + 30
            while (await asyncio.to_thread(stats, b))["queue"]["running"] == 0:
                assert not sent.done(), "the answer came back before the replica was seen running"
                assert time.monotonic() < deadline, "the request never ran"
                await asyncio.sleep(0.01)
            sent.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sent

    asyncio.run(leave_while_it_runs())
    wait_cancelled(b, before)
    assert wait_idle(router)["replicas"][b.url]["in_flight"] == 0


def test_a_stopped_replica_costs_no_request_and_all_down_is_503(
    tiny_llama_path: Path, tmp_path: Path
) -> None:
    c = start_replica(tiny_llama_path, tmp_path / "c")
    d = start_replica(tiny_llama_path, tmp_path / "d")
    # Probes far apart: only the router's own retries and failure counting can save the requests.
    replicas = Replicas([c.url, d.url], health_interval_s=60, fail_threshold=2)
    body = {"model": model_id(tiny_llama_path), "prompt": "one two three", "max_tokens": 2, "temperature": 0}
    try:
        with (
            RouterServer(replicas, FixedPicker([c.url, d.url])) as router,
            httpx.Client(timeout=30) as client,
        ):
            assert client.post(router.url + "/v1/completions", json=body).headers[REPLICA_HEADER] == c.url
            c.stop()
            for _ in range(4):
                resp = client.post(router.url + "/v1/completions", json=body)
                assert resp.status_code == 200 and resp.headers[REPLICA_HEADER] == d.url
            assert router.picker.down == [c.url]
            assert router.metric("kvproxy_route_retries_total", replica=c.url) == 2  # then no more tries
            assert router.metric("kvproxy_route_decisions_total", replica=d.url, reason="retry") == 4
            health = client.get(router.url + "/health").json()
            assert health["status"] == "degraded" and not health["replicas"][c.url]["healthy"]

            d.stop()  # every try fails now
            for _ in range(3):
                assert_all_down(router.url)
            assert client.get(router.url + "/health").status_code == 503
    finally:
        c.stop()
        d.stop()


def assert_all_down(url: str) -> None:
    with pytest.raises(openai.APIStatusError) as oai_error:
        oai(url).completions.create(model="m", prompt="hi", max_tokens=1)
    assert oai_error.value.status_code == 503
    assert int(oai_error.value.response.headers["retry-after"]) >= 1
    assert oai_error.value.response.json()["error"]["code"] == "no_replica_available"
    with pytest.raises(anthropic.APIStatusError) as claude_error:
        claude(url).messages.create(model="m", max_tokens=1, messages=[{"role": "user", "content": "hi"}])
    assert claude_error.value.status_code == 503
    assert int(claude_error.value.response.headers["retry-after"]) >= 1
    assert claude_error.value.response.json() == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "No replica is available; retry shortly."},
    }


def test_no_healthy_replica_answers_503_in_each_apis_shape() -> None:
    replicas = Replicas([f"http://127.0.0.1:{free_port()}"], health_interval_s=60)
    with RouterServer(replicas, FixedPicker()) as router:
        assert_all_down(router.url)
        with httpx.Client(timeout=10) as client:
            assert client.get(router.url + "/health").status_code == 503
            assert client.get(router.url + "/v1/models").status_code == 503
            assert client.get(router.url + "/v1/cache/stats").status_code == 503
        assert router.picker.requests == []  # nothing to pick from
