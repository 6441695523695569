"""Forwarding one request to a replica and its answer back, unchanged, with retries.

The router is a transparent proxy: the body and headers (minus hop-by-hop ones and ``Host``) go
to the replica as they came, and the replica's status, headers and body come back as they were,
streamed both ways, plus ``x-kvproxy-replica``. A request moves on to the next replica only while
nothing came back yet (connect error, timeout before the headers, a 502/503/529 from the replica):
once a response started, resending could repeat work the client already sees. A client that leaves
closes the upstream connection, so the replica sees the disconnect and cancels its generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.datastructures import Headers
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from proxy.errors import ServiceUnavailable, is_anthropic
from proxy.route.metrics import CachedTokensTap, RouteMetrics
from proxy.route.picking import Pick, Picker, RouteRequest, least_loaded_order
from proxy.route.replicas import Replicas, ReplicaState

log = logging.getLogger("kvproxy.route")

REPLICA_HEADER = "x-kvproxy-replica"
RETRY_STATUSES = frozenset({502, 503, 529})
"""Statuses that mean "this replica cannot take it now" (529: Anthropic's 503); the request goes
to the next replica, unless this was the last one: then the replica's own answer is passed back."""
RETRY_AFTER_S = 1
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# httpx sets Content-Length from the body; uvicorn writes its own Date and Server.
_REQUEST_DROP = HOP_BY_HOP | {"host", "content-length", "expect"}
_RESPONSE_DROP = HOP_BY_HOP | {"date", "server"}


def upstream_headers(headers: Headers) -> list[tuple[str, str]]:
    """The client's headers as the replica gets them (duplicates and order kept)."""
    named = {n.strip().lower() for value in headers.getlist("connection") for n in value.split(",")}
    kept = [(k, v) for k, v in headers.items() if k not in _REQUEST_DROP and k not in named]
    if "accept-encoding" not in headers:
        # Otherwise httpx would ask for gzip on the client's behalf and the client would get an
        # encoding it never asked for.
        kept.append(("accept-encoding", "identity"))
    return kept


def downstream_headers(headers: httpx.Headers, replica: str) -> list[tuple[bytes, bytes]]:
    """The replica's response headers as the client gets them, plus ``x-kvproxy-replica``."""
    named = {n.strip().lower() for value in headers.get_list("connection") for n in value.split(",")}
    raw = [
        (k.lower(), v)
        for k, v in headers.raw
        if k.decode("latin-1").lower() not in _RESPONSE_DROP and k.decode("latin-1").lower() not in named
    ]
    raw.append((REPLICA_HEADER.encode(), replica.encode("latin-1")))
    return raw


def client_api_key(headers: Headers) -> str | None:
    """The key the client authenticates with: ``x-api-key`` wins over ``Authorization: Bearer``,
    as on a replica (`proxy.auth.KeyTable.authenticate`)."""
    key = headers.get("x-api-key")
    if key:
        return key.strip() or None
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def no_replica_response(path: str, message: str = "No replica is available; retry shortly.") -> JSONResponse:
    """503 with Retry-After in the route's own error shape (Anthropic's on /v1/messages*)."""
    headers = {"Retry-After": str(RETRY_AFTER_S)}
    if is_anthropic(path):
        body: dict[str, Any] = {"type": "error", "error": {"type": "overloaded_error", "message": message}}
    else:
        body = ServiceUnavailable(message, code="no_replica_available").body()
    return JSONResponse(body, status_code=503, headers=headers)


def try_order(pick_order: Sequence[str], healthy: Sequence[ReplicaState]) -> list[str]:
    """The pick's healthy replicas in its order, then every other healthy one, least loaded first."""
    healthy_urls = {r.url for r in healthy}
    order = list(dict.fromkeys(u for u in pick_order if u in healthy_urls))
    return order + [u for u in least_loaded_order(healthy) if u not in order]


@dataclass(frozen=True)
class Outgoing:
    """One client request as it will be sent to a replica: ``path`` includes the query string."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes


@dataclass(frozen=True)
class Decision:
    """What the router tells the picker and the metrics once a replica answered."""

    request: RouteRequest
    pick: Pick


class Forwarder:
    """Sends requests to replicas over one shared client and keeps the books (in-flight counts,
    passive failures, metrics, the picker's ``routed``)."""

    def __init__(
        self, client: httpx.AsyncClient, replicas: Replicas, picker: Picker, metrics: RouteMetrics
    ) -> None:
        self.client = client
        self.replicas = replicas
        self.picker = picker
        self.metrics = metrics

    async def route(self, request: RouteRequest, outgoing: Outgoing) -> Response:
        """Pick replicas for a generation request and forward it."""
        healthy = self.replicas.healthy()
        if not healthy:
            return no_replica_response(request.route)
        try:
            pick = await self.picker.pick(request, healthy)
        except Exception:  # a picker fault degrades routing, it never fails the request
            log.exception("the picker failed; routing by load")
            pick = Pick(order=least_loaded_order(healthy), reason="least_loaded")
        return self.forward(outgoing, try_order(pick.order, healthy), Decision(request, pick))

    def forward(self, outgoing: Outgoing, order: list[str], decision: Decision | None = None) -> Response:
        """A response that tries ``order`` in turn when the server sends it."""
        if not order:
            return no_replica_response(outgoing.path.split("?", 1)[0])
        return ForwardedResponse(self, outgoing, order, decision)

    # ---- bookkeeping ---------------------------------------------------------------------------

    def opened(self, url: str) -> None:
        self.metrics.set_in_flight(url, self.replicas.opened(url))

    def closed(self, url: str) -> None:
        self.metrics.set_in_flight(url, self.replicas.closed(url))

    def answered(self, url: str, status: int, decision: Decision | None) -> None:
        if status >= 500:
            self.replicas.failed(url)
        else:
            self.replicas.succeeded(url)
        if decision is None:
            return
        pick = decision.pick
        first = bool(pick.order) and pick.order[0] == url
        # Not the picker's first choice: a fallback after a failure, or (an empty order) by load.
        self.metrics.decided(url, pick.reason if first else "retry" if pick.order else "least_loaded")
        if first:
            self.metrics.expected_cached(url, pick.expected_cached_tokens)
        if 200 <= status < 300:
            try:
                self.picker.routed(decision.request, url, pick)
            except Exception:
                log.exception("the picker's routed() failed")


class ForwardedResponse(Response):
    """An ASGI response that does the forwarding itself when called, so it can watch the client
    for a disconnect from the first byte sent upstream to the last byte relayed back."""

    def __init__(
        self, forwarder: Forwarder, outgoing: Outgoing, order: list[str], decision: Decision | None
    ) -> None:
        super().__init__()
        self._fw = forwarder
        self._out = outgoing
        self._order = order
        self._decision = decision

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gone = asyncio.create_task(_disconnected(receive))
        try:
            answer = await self._first_answer(gone)
            if answer is None:
                if not gone.done():
                    path = self._out.path.split("?", 1)[0]
                    await no_replica_response(path)(scope, receive, send)
                return
            upstream, url = answer
            try:
                self._fw.answered(url, upstream.status_code, self._decision)
                await self._relay(upstream, url, send, gone)
            finally:
                await upstream.aclose()
                self._fw.closed(url)
        finally:
            gone.cancel()

    async def _first_answer(self, gone: asyncio.Task[None]) -> tuple[httpx.Response, str] | None:
        """The first replica's response that may go back to the client (headers read, body not);
        ``None`` when the client left or no replica answered."""
        fw, out = self._fw, self._out
        for i, url in enumerate(self._order):
            last = i == len(self._order) - 1
            fw.opened(url)
            try:
                upstream = await _send_unless_gone(fw.client, out, url, gone)
            except httpx.TransportError as exc:
                log.warning("replica %s: %s before answering %s", url, type(exc).__name__, out.path)
                fw.closed(url)
                fw.replicas.failed(url)
                if not last:
                    fw.metrics.retried(url)
                continue
            except BaseException:
                fw.closed(url)
                raise
            if upstream is None:
                fw.closed(url)
                return None
            if upstream.status_code in RETRY_STATUSES and not last:
                await upstream.aclose()
                fw.closed(url)
                fw.replicas.failed(url)
                fw.metrics.retried(url)
                continue
            return upstream, url
        return None

    async def _relay(self, upstream: httpx.Response, url: str, send: Send, gone: asyncio.Task[None]) -> None:
        encoded = upstream.headers.get("content-encoding", "identity").lower() != "identity"
        tap = None
        if upstream.status_code == 200 and not encoded:
            tap = CachedTokensTap(upstream.headers.get("content-type", ""))

        async def pump() -> None:
            await send(
                {
                    "type": "http.response.start",
                    "status": upstream.status_code,
                    "headers": downstream_headers(upstream.headers, url),
                }
            )
            async with contextlib.aclosing(_raw_chunks(upstream)) as chunks:
                async for chunk in chunks:
                    if tap is not None:
                        tap.feed(chunk)
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        def record() -> None:
            # Also when the client left: many stop reading at the stream's usage chunk or [DONE].
            found = tap.result() if tap is not None else None
            if found is not None:
                self._fw.metrics.cached(url, found)

        relaying = asyncio.create_task(pump())
        await _until_either(relaying, gone)
        if not relaying.done():  # the client left: stop, and closing upstream tells the replica
            relaying.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError, httpx.HTTPError):
                await relaying
            record()
            return
        try:
            relaying.result()
        except OSError:  # the client's connection broke under a send: it left
            record()
            return
        except httpx.TransportError:
            # The replica went away mid-answer: nothing can be resent; the client's connection is
            # cut (raising past the server) so it does not take a truncated body for a whole one.
            self._fw.replicas.failed(url)
            log.warning("replica %s failed mid-answer for %s", url, self._out.path)
            raise
        record()


async def _send_unless_gone(
    client: httpx.AsyncClient, out: Outgoing, url: str, gone: asyncio.Task[None]
) -> httpx.Response | None:
    """Send and wait for the response headers, or give up (``None``) when the client leaves:
    cancelling the send closes its connection, which the replica sees as a disconnect."""
    if gone.done():
        return None
    request = client.build_request(out.method, url + out.path, headers=out.headers, content=out.body)
    sending = asyncio.create_task(client.send(request, stream=True))
    await _until_either(sending, gone)
    if not gone.done():
        return sending.result()
    if sending.done():
        if sending.exception() is None:
            await sending.result().aclose()
        return None
    sending.cancel()
    with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
        await sending
    return None


async def _until_either(work: asyncio.Task[Any], gone: asyncio.Task[None]) -> None:
    """Wait for ``work`` or the client's disconnect; if this wait itself is cancelled (the server
    shuts down), ``work`` is cancelled with it rather than left running."""
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work.cancel()
        raise


async def _raw_chunks(upstream: httpx.Response) -> AsyncIterator[bytes]:
    """The body as it came off the wire; a response its transport had read already (an in-memory
    transport does) is relayed from memory."""
    if upstream.is_stream_consumed:
        yield upstream.content
        return
    async for chunk in upstream.aiter_raw():
        yield chunk


async def _disconnected(receive: Receive) -> None:
    """Returns once the client hung up (the body was read already, so nothing else arrives)."""
    while (await receive())["type"] != "http.disconnect":
        pass
