"""Block events: what this replica's memory and disk tiers gain and lose, as a Redis Stream.

A cache-aware router (``kvproxy route``) sends a prompt to the replica that holds its blocks. It
takes a snapshot of each replica (``GET /v1/cache/blocks``: the hashes held and the last ``seq``
given before the listing) and then applies the replica's stream of changes after that ``seq``.

The stream is ``<redis prefix>events:<epoch>``. The epoch is a random id made at every start: a
restarted replica (its memory empty again) writes a new stream, and its old one is no longer read.
Each stream has an EXPIRE (``ttl_s``) that the publisher refreshes while the replica lives, so the
streams of dead replicas go away by themselves. One entry per event, with the fields:

- ``seq``: a decimal integer, 1, 2, 3, ... per epoch, given when the event is queued, so an event
  that is lost (queue full, Redis down or refusing) leaves a gap the router sees.
- ``op``: ``stored``, ``evicted``, ``deleted`` or ``cleared`` (``cache_store.listener``).
- ``tier``: ``memory`` or ``disk``. The Redis tier is shared: a router asks Redis itself (EXISTS).
- ``hashes``: the 16-byte block hashes concatenated as raw bytes; empty for ``cleared``.

The request path only appends to a bounded in-process queue; consecutive events of one op and tier
join the queue's last entry (up to ``entry_hashes``), so a burst of disk writes is one entry. A
daemon thread sends what is queued every ``interval_s`` as one pipeline of ``XADD ... MAXLEN ~``.
When Redis is down or slow the batch is dropped and counted, the publisher backs off and keeps
going; nothing is ever raised into a store or blocks one.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from cache_store.redis_store import EVENTS_INFIX, connect, redact_url

log = logging.getLogger(__name__)

_BACKOFF_MIN_S = 0.25
_BACKOFF_MAX_S = 2.0


@dataclass(frozen=True)
class EventStats:
    """The publisher's figures since start. ``published``: events now in the stream; ``dropped``:
    events lost (queue full, Redis down or refusing, or emitted after close); ``queued``: events
    waiting to be sent."""

    epoch: str
    stream: str
    last_seq: int
    published: int
    dropped: int
    queued: int


@dataclass
class _Event:
    seq: int
    op: str
    tier: str
    hashes: bytearray
    count: int
    open: bool = True
    """May still take more hashes of its op and tier (it is the queue's tail and not sealed)."""


class BlockEvents:
    """Publishes the block events of one replica start (``epoch``) to ``stream`` on ``url``.

    ``emit`` is a ``cache_store.listener.BlockListener``: give it to ``MemoryStore`` and
    ``DiskStore``. ``timeout_ms`` bounds every socket operation (``--store-timeout-ms``);
    ``maxlen`` bounds the stream (approximately, as Redis trims whole nodes); ``queue_hashes``
    bounds what waits in this process (a ``cleared`` counts as one).
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "kvp:v1:",
        cluster: bool = False,
        timeout_ms: int = 200,
        maxlen: int = 100_000,
        queue_hashes: int = 65_536,
        entry_hashes: int = 1024,
        interval_s: float = 0.025,
        ttl_s: int = 24 * 3600,
        refresh_s: float = 300.0,
    ) -> None:
        if not url.startswith(("redis://", "rediss://")):
            raise ValueError(f"redis url must start with redis:// or rediss://, got {redact_url(url)}")
        if timeout_ms <= 0 or maxlen < 1 or queue_hashes < 1 or entry_hashes < 1 or ttl_s < 1:
            raise ValueError("timeout_ms, maxlen, queue_hashes, entry_hashes and ttl_s must be positive")
        self.epoch = uuid.uuid4().hex
        self.stream = f"{prefix}{EVENTS_INFIX}{self.epoch}"
        self._url = url
        self._password = urlsplit(url).password
        self._cluster = cluster
        self._timeout_s = timeout_ms / 1000.0
        self._maxlen = maxlen
        self._queue_hashes = queue_hashes
        self._entry_hashes = entry_hashes
        self._interval_s = interval_s
        self._ttl_s = ttl_s
        self._refresh_s = refresh_s
        self._cond = threading.Condition()
        self._queue: deque[_Event] = deque()
        self._queued_hashes = 0
        self._sending = False
        self._seq = 0
        self._published = 0
        self._dropped = 0
        self._closed = False
        self._client: Any = None
        self._expire_at = time.monotonic() + refresh_s  # when an idle stream's EXPIRE is due
        self._retry_at = 0.0  # no send before this (backing off after a failure)
        self._backoff_s = 0.0
        self._wake = threading.Event()  # events wait (or flush/close want the publisher)
        self._hurry = threading.Event()  # flush/close: send now, do not wait for a batch to gather
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvproxy-block-events", daemon=True)
        self._thread.start()

    # -- the store side (any thread, cheap, never raises) ---------------------------------------

    def emit(self, op: str, tier: str, keys: Sequence[bytes]) -> None:
        """Queue one event; ``keys`` are the block hashes (ignored for ``cleared``)."""
        if op == "cleared":
            count, data = 0, b""
        elif keys:
            count, data = len(keys), b"".join(keys)
        else:
            return
        with self._cond:
            self._queue_locked(op, tier, count, data)
            first = len(self._queue) == 1
        if first:
            self._wake.set()

    def last_seq(self) -> int:
        """The last seq given so far. Seals the queued tail, so every event after this call gets a
        higher seq: a snapshot listed after this call misses nothing that replaying the events
        after it would not bring."""
        with self._cond:
            if self._queue:
                self._queue[-1].open = False
            return self._seq

    def stats(self) -> EventStats:
        with self._cond:
            return EventStats(
                epoch=self.epoch,
                stream=self.stream,
                last_seq=self._seq,
                published=self._published,
                dropped=self._dropped,
                queued=len(self._queue),
            )

    def flush(self, timeout_s: float) -> bool:
        """Send what is queued now (not after the batching interval) and wait until it was sent
        or dropped; False on timeout (e.g. still backing off after a failure)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._queue or self._sending:
                self._hurry.set()
                self._wake.set()
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def close(self, timeout_s: float = 5.0) -> None:
        """Send what is queued (one try, whatever the backoff), stop the thread, close the
        connection. Events emitted afterwards are dropped. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
        self._stopping.set()
        self._hurry.set()
        self._wake.set()
        self._thread.join(timeout=max(timeout_s, 0.0))
        if self._thread.is_alive():
            log.warning("block events publisher still busy after %.1fs at close", timeout_s)
            return
        self._drop_client()

    def __repr__(self) -> str:
        return f"BlockEvents(stream={self.stream!r})"

    def _queue_locked(self, op: str, tier: str, count: int, data: bytes) -> None:
        if self._closed:
            self._dropped += 1
            return
        weight = max(count, 1)
        tail = self._queue[-1] if self._queue else None
        if self._queued_hashes + weight > self._queue_hashes:
            self._seq += 1  # given and lost: a gap the router will see
            self._dropped += 1
            if tail is not None:
                tail.open = False  # later events must not join an entry before the lost one
            return
        if tail is not None and self._joins(tail, op, tier, count):
            tail.hashes += data
            tail.count += count
        else:
            self._seq += 1
            self._queue.append(_Event(self._seq, op, tier, bytearray(data), count))
        self._queued_hashes += weight

    def _joins(self, tail: _Event, op: str, tier: str, count: int) -> bool:
        """Whether an event may join the queue's tail instead of taking a seq of its own."""
        return (
            tail.open
            and count > 0
            and tail.op == op
            and tail.tier == tier
            and tail.count + count <= self._entry_hashes
        )

    # -- the publisher thread -------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self._idle_wait())
            # Let a batch gather: an event that wakes the publisher is rarely alone.
            self._hurry.wait(self._interval_s)
            self._wake.clear()
            self._hurry.clear()
            if time.monotonic() >= self._retry_at:
                self._send()
        self._send()

    def _idle_wait(self) -> float:
        """Until the next send is due: at once when events wait (after any backoff), else at the
        next EXPIRE refresh."""
        now = time.monotonic()
        with self._cond:
            waiting = bool(self._queue)
        if waiting:
            return max(self._retry_at - now, 0.0)
        return max(self._expire_at - now, self._interval_s)

    def _take(self) -> list[_Event]:
        with self._cond:
            batch = list(self._queue)
            self._queue.clear()
            self._queued_hashes = 0
            self._sending = True
            return batch

    def _send(self) -> None:
        batch = self._take()
        # EXPIRE goes with every batch (the XADD may have created the stream: a first event, or a
        # Redis that restarted empty), and every ``refresh_s`` while the replica stays idle.
        refresh = bool(batch) or time.monotonic() >= self._expire_at
        try:
            if batch or refresh:
                results = self._pipeline(batch, refresh)
                self._succeeded(batch, results, refresh)
        except Exception as exc:  # Redis down, slow or gone: the events are lost, never raised
            self._failed(len(batch), exc)
        finally:
            with self._cond:
                self._sending = False
                self._cond.notify_all()

    def _pipeline(self, batch: list[_Event], refresh: bool) -> list[Any]:
        if self._client is None:
            self._client = connect(self._url, timeout_s=self._timeout_s, cluster=self._cluster)
        pipe = self._client.pipeline(transaction=False)
        for event in batch:
            fields = {"seq": event.seq, "op": event.op, "tier": event.tier, "hashes": bytes(event.hashes)}
            pipe.xadd(self.stream, fields, maxlen=self._maxlen, approximate=True)
        if refresh:
            pipe.expire(self.stream, self._ttl_s)
        # Per-command errors (a full server's OOM) come back in place; an outage raises.
        return list(pipe.execute(raise_on_error=False))

    def _succeeded(self, batch: list[_Event], results: list[Any], refresh: bool) -> None:
        refused = [r for r in results if isinstance(r, Exception)]
        added = sum(1 for r in results[: len(batch)] if not isinstance(r, Exception))
        if refresh:
            self._expire_at = time.monotonic() + self._refresh_s
        if self._backoff_s:
            log.info("block events: redis available again, publishing to %s", self.stream)
        self._backoff_s = 0.0
        self._retry_at = 0.0
        with self._cond:
            self._published += added
            self._dropped += len(batch) - added
        if refused:
            log.debug("block events: redis refused %d commands: %s", len(refused), self._scrub(refused[0]))

    def _failed(self, lost: int, exc: Exception) -> None:
        """Count the lost batch and back off. The outage is logged once, at its start, at INFO:
        the Redis tier's own warning already tells the operator (one outage, one warning)."""
        with self._cond:
            self._dropped += lost
        if not self._backoff_s:
            log.info("block events: redis unavailable (%s); events are dropped", self._scrub(exc))
        else:
            log.debug("block events: redis still unavailable: %s", self._scrub(exc))
        self._backoff_s = min(max(self._backoff_s * 2, _BACKOFF_MIN_S), _BACKOFF_MAX_S)
        self._retry_at = time.monotonic() + self._backoff_s
        self._drop_client()  # the next try starts afresh (a cluster's nodes may have moved)

    def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        try:
            client.close()
        except Exception as exc:  # closing a broken connection must not fail anything
            log.debug("block events: redis close failed: %s", self._scrub(exc))

    def _scrub(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}"
        return text.replace(self._password, "***") if self._password else text
