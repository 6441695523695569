"""The router's parts without servers: header passing, the client's key, the try order, the
baseline pickers, the cached-tokens tap, the error shapes, and replica health bookkeeping (over
httpx's MockTransport)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import httpx
import pytest
from starlette.datastructures import Headers

from proxy.route.forward import (
    REPLICA_HEADER,
    client_api_key,
    downstream_headers,
    no_replica_response,
    try_order,
    upstream_headers,
)
from proxy.route.metrics import CachedTokensTap, cached_tokens
from proxy.route.picking import LeastLoadedPicker, RoundRobinPicker, RouteRequest
from proxy.route.replicas import Replicas, ReplicaState, normalize_url

A, B, C = "http://a:1", "http://b:2", "http://c:3"
REQUEST = RouteRequest(route="/v1/chat/completions", body={}, api_key=None)


def test_request_headers_lose_hop_by_hop_and_host_but_keep_the_rest() -> None:
    headers = Headers(
        raw=[
            (b"host", b"router:9000"),
            (b"connection", b"keep-alive, x-private"),
            (b"x-private", b"1"),
            (b"keep-alive", b"timeout=5"),
            (b"content-length", b"12"),
            (b"authorization", b"Bearer sk-1"),
            (b"anthropic-beta", b"a"),
            (b"anthropic-beta", b"b"),
            (b"content-type", b"application/json"),
        ]
    )
    assert upstream_headers(headers) == [
        ("authorization", "Bearer sk-1"),
        ("anthropic-beta", "a"),
        ("anthropic-beta", "b"),
        ("content-type", "application/json"),
        ("accept-encoding", "identity"),  # httpx must not ask for gzip on the client's behalf
    ]
    assert ("accept-encoding", "gzip") in upstream_headers(Headers(raw=[(b"accept-encoding", b"gzip")]))


def test_response_headers_keep_the_replicas_own_and_name_the_replica() -> None:
    upstream = httpx.Headers(
        [
            ("content-type", "text/event-stream"),
            ("transfer-encoding", "chunked"),
            ("date", "x"),
            ("server", "uvicorn"),
            ("retry-after", "3"),
        ]
    )
    assert downstream_headers(upstream, A) == [
        (b"content-type", b"text/event-stream"),
        (b"retry-after", b"3"),
        (REPLICA_HEADER.encode(), A.encode()),
    ]


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ([], None),
        ([(b"authorization", b"Bearer sk-1")], "sk-1"),
        ([(b"authorization", b"bearer  sk-1 ")], "sk-1"),
        ([(b"authorization", b"Basic abc")], None),
        ([(b"x-api-key", b"sk-2")], "sk-2"),
        ([(b"authorization", b"Bearer sk-1"), (b"x-api-key", b"sk-2")], "sk-2"),
    ],
)
def test_the_clients_key_comes_from_x_api_key_or_bearer(
    raw: list[tuple[bytes, bytes]], key: str | None
) -> None:
    assert client_api_key(Headers(raw=raw)) == key


def _state(url: str, in_flight: int = 0) -> ReplicaState:
    return ReplicaState(url, healthy=True, in_flight=in_flight)


def test_try_order_is_the_picks_healthy_replicas_then_the_rest_least_loaded_first() -> None:
    healthy = [_state(A, 3), _state(B, 1), _state(C, 2)]
    assert try_order([C], healthy) == [C, B, A]
    assert try_order(["http://gone:9", A, A], healthy) == [A, B, C]
    assert try_order([], healthy) == [B, C, A]
    assert try_order([A], []) == []


def test_round_robin_rotates_and_least_loaded_breaks_ties_by_order() -> None:
    rr = RoundRobinPicker()
    states = [_state(A), _state(B), _state(C)]
    orders = [asyncio.run(rr.pick(REQUEST, states)).order for _ in range(4)]
    assert orders == [[A, B, C], [B, C, A], [C, A, B], [A, B, C]]
    least = LeastLoadedPicker()
    pick = asyncio.run(least.pick(REQUEST, [_state(A, 2), _state(B, 1), _state(C, 1)]))
    assert pick.order == [B, C, A] and pick.reason == "least_loaded"


def _sse(*events: dict[str, object]) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


@pytest.mark.parametrize("step", [1, 7, 1000])
def test_the_tap_finds_the_final_usage_of_a_stream_in_any_chunking(step: int) -> None:
    body = _sse(
        {"choices": [{"delta": {"content": "hi"}}], "usage": None},
        {"choices": [], "usage": {"prompt_tokens": 40, "prompt_tokens_details": {"cached_tokens": 32}}},
    )
    tap = CachedTokensTap("text/event-stream; charset=utf-8")
    for i in range(0, len(body), step):
        tap.feed(body[i : i + step])
    assert tap.result() == 32


def test_the_tap_takes_anthropics_last_usage_and_json_bodies() -> None:
    stream = (
        b'event: message_start\ndata: {"type": "message_start", "message": {"usage": '
        b'{"input_tokens": 9, "cache_read_input_tokens": 0}}}\r\n\r\n'
        b'event: message_delta\ndata: {"type": "message_delta", "usage": '
        b'{"input_tokens": 9, "cache_read_input_tokens": 48}}\r\n\r\n'
    )
    tap = CachedTokensTap("text/event-stream")
    tap.feed(stream)
    assert tap.result() == 48
    tap = CachedTokensTap("application/json")
    tap.feed(b'{"usage": {"cache_read_input_tokens": 16, "input_tokens": 3}}')
    assert tap.result() == 16
    too_big = CachedTokensTap("application/json", max_json_bytes=10)
    too_big.feed(b'{"usage": {"prompt_tokens_details": {"cached_tokens": 16}}}')
    assert too_big.result() is None
    assert cached_tokens({"prompt_tokens_details": None, "cache_read_input_tokens": 5}) == 5
    assert cached_tokens({"cache_read_input_tokens": True}) is None


def test_an_overlong_sse_line_is_skipped_and_the_next_one_read() -> None:
    tap = CachedTokensTap("text/event-stream", max_json_bytes=64)
    tap.feed(b'data: {"usage": {"cache_read_input_tokens": 1, "pad": "' + b"x" * 100)
    tap.feed(b'x"}}\n\ndata: {"usage": {"cache_read_input_tokens": 7}}\n\n')
    assert tap.result() == 7


def test_no_replica_answers_503_with_retry_after_in_each_apis_shape() -> None:
    openai = no_replica_response("/v1/chat/completions")
    assert openai.status_code == 503 and openai.headers["retry-after"] == "1"
    error = json.loads(openai.body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "no_replica_available"
    anthropic = no_replica_response("/v1/messages/count_tokens")
    assert anthropic.status_code == 503 and anthropic.headers["retry-after"] == "1"
    assert json.loads(anthropic.body)["type"] == "error"
    assert json.loads(anthropic.body)["error"]["type"] == "overloaded_error"


def test_replica_urls_are_normalized_and_checked() -> None:
    assert normalize_url(" http://a:1/ ") == A
    with pytest.raises(ValueError, match="http"):
        normalize_url("a:1")
    with pytest.raises(ValueError, match="twice"):
        Replicas([A, A + "/"])
    with pytest.raises(ValueError):
        Replicas([])


Answer = Callable[[str], httpx.Response]


def _client(answer: Answer) -> httpx.AsyncClient:
    def handler(request: httpx.Request) -> httpx.Response:
        return answer(f"{request.url.scheme}://{request.url.netloc.decode()}")

    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


def _health(epoch: str, waiting: int = 0, running: int = 0) -> httpx.Response:
    queue = {"waiting": waiting, "running": running}
    return httpx.Response(200, json={"status": "ok", "epoch": epoch, "queue": queue})


def test_probes_make_replicas_healthy_and_report_the_queue_and_epoch() -> None:
    async def scenario() -> None:
        answers: dict[str, httpx.Response] = {A: _health("e1", waiting=2, running=1), B: httpx.Response(503)}
        replicas = Replicas([A, B])
        down: list[str] = []
        replicas.on_down(down.append)
        async with _client(lambda url: answers[url]) as client:
            await replicas.start(client)
            a, b = replicas.get(A), replicas.get(B)
            assert a is not None and b is not None
            assert (a.healthy, a.epoch, a.waiting, a.running) == (True, "e1", 2, 1)
            assert not b.healthy and down == []  # never healthy, so never "went down"
            answers[A] = _health("e2")  # restarted between two probes: its cache is gone
            await replicas.probe(A)
            assert a.healthy and down == [A]
            answers[A] = httpx.Response(503, json={"status": "loading"})
            await replicas.probe(A)
            assert not a.healthy and down == [A, A] and a.health == {"status": "loading"}
            answers[B] = _health("b1")
            await replicas.probe_all()
            assert [s.url for s in replicas.healthy()] == [B]
            await replicas.stop()

    asyncio.run(scenario())


def test_consecutive_failures_take_a_replica_out_until_a_probe_succeeds() -> None:
    async def scenario() -> None:
        replicas = Replicas([A, B], fail_threshold=2)
        down: list[str] = []
        replicas.on_down(down.append)
        async with _client(lambda url: _health("e")) as client:
            await replicas.start(client)
            replicas.failed(A)
            replicas.succeeded(A)  # an answer in between resets the count
            replicas.failed(A)
            assert replicas.get(A).healthy  # type: ignore[union-attr]
            replicas.failed(A)
            assert not replicas.get(A).healthy and down == [A]  # type: ignore[union-attr]
            await replicas.probe(A)
            assert replicas.get(A).healthy and replicas.get(A).failures == 0  # type: ignore[union-attr]
            await replicas.stop()

    asyncio.run(scenario())


def test_the_probe_loop_keeps_probing_and_stops() -> None:
    async def scenario() -> None:
        seen: list[str] = []

        def answer(url: str) -> httpx.Response:
            seen.append(url)
            return _health("e") if len(seen) < 3 else httpx.Response(503)

        replicas = Replicas([A], health_interval_s=0.01)
        async with _client(answer) as client:
            await replicas.start(client)
            for _ in range(200):
                if not replicas.healthy():
                    break
                await asyncio.sleep(0.01)
            await replicas.stop()
            assert replicas.healthy() == [] and len(seen) >= 3
            count = len(seen)
            await asyncio.sleep(0.05)
            assert len(seen) == count

    asyncio.run(scenario())


def test_in_flight_counts_never_go_negative() -> None:
    replicas = Replicas([A])
    assert replicas.opened(A) == 1 and replicas.opened(A) == 2
    assert replicas.closed(A) == 1 and replicas.closed(A) == 0 and replicas.closed(A) == 0


def _route_app_scenario(answers: dict[str, list[int]], order: list[str]) -> tuple[list[httpx.Response], str]:
    """Chat requests through a router app whose replicas answer from ``answers`` (statuses, in
    turn; /health always 200); returns the responses and the router's /metrics text."""
    from proxy.route.app import create_route_app
    from tests.proxy.route.harness import FixedPicker

    def replica(request: httpx.Request) -> httpx.Response:
        url = f"{request.url.scheme}://{request.url.netloc.decode()}"
        if request.url.path == "/health":
            return _health("e")
        status = answers[url].pop(0)
        return httpx.Response(status, json={"from": url}, headers={"retry-after": "7"})

    async def scenario() -> tuple[list[httpx.Response], str]:
        upstream = httpx.AsyncClient(transport=httpx.MockTransport(replica))
        app = create_route_app(Replicas(list(answers), fail_threshold=5), FixedPicker(order), client=upstream)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router") as client,
        ):
            responses = []
            while any(answers.values()):
                responses.append(await client.post("/v1/chat/completions", json={"messages": []}))
            metrics = (await client.get("/metrics")).text
        await upstream.aclose()
        return responses, metrics

    return asyncio.run(scenario())


def test_a_busy_replica_is_retried_elsewhere_and_the_last_ones_answer_passed_back() -> None:
    responses, metrics = _route_app_scenario({A: [503, 529, 503], B: [200, 200, 503]}, [A, B])
    assert [(r.status_code, r.headers[REPLICA_HEADER]) for r in responses] == [(200, B), (200, B), (503, B)]
    assert responses[2].json() == {"from": B} and responses[2].headers["retry-after"] == "7"
    assert f'kvproxy_route_retries_total{{replica="{A}"}} 3.0' in metrics
    assert f'kvproxy_route_decisions_total{{reason="retry",replica="{B}"}} 3.0' in metrics
    assert f'kvproxy_route_in_flight{{replica="{B}"}} 0.0' in metrics


def test_an_answer_that_started_is_never_retried() -> None:
    responses, metrics = _route_app_scenario({A: [500, 400], B: []}, [A, B])
    assert [(r.status_code, r.headers[REPLICA_HEADER]) for r in responses] == [(500, A), (400, A)]
    assert f'kvproxy_route_retries_total{{replica="{A}"}} 0.0' in metrics
    assert f'kvproxy_route_decisions_total{{reason="key",replica="{A}"}} 2.0' in metrics
