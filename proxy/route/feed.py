"""Keeps each replica's ``Holdings`` in step with the block events it appends to Redis.

One daemon thread reads every replica's stream (``XREAD`` from the last id read, one stream per
call so it works on a Redis Cluster), applies the events in order, and reloads a snapshot
(``GET /v1/cache/blocks``) when it sees a gap or a new epoch. Whatever goes wrong (Redis down, a
replica that does not answer) only makes that replica's holdings stale: the picker then falls
back to its own recent routing.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import redis

from cache_store.hashing import HASH_BYTES
from cache_store.redis_store import connect
from proxy.route.holdings import Holdings
from proxy.route.prompts import ReplicaInfo

log = logging.getLogger("kvproxy.route")

POLL_S = 0.05
"""Between rounds over the streams when nothing new came."""
RETRY_S = 1.0
"""After a failure, how long a replica's feed waits before it tries again."""
READ_COUNT = 1000
"""Stream entries per XREAD."""


@dataclass
class _Feed:
    replica: str
    holdings: Holdings = field(default_factory=Holdings)
    stream: str | None = None
    epoch: str | None = None
    """The stream and epoch its info answer gave when it was last checked."""
    last_id: bytes = b"0-0"
    lock: threading.Lock = field(default_factory=threading.Lock)
    retry_at: float = 0.0
    verified: bool = False
    """Its info answer was checked against the router's (same fingerprint and block size)."""
    refused: str | None = None
    """Why it serves other blocks than the router hashes (then it is never routed to)."""


class EventFeed:
    """Replica URL -> ``Holdings``, read from their event streams on a background thread."""

    def __init__(
        self,
        replicas: list[str],
        redis_url: str | None,
        *,
        cluster: bool = False,
        admin_headers: dict[str, str] | None = None,
        timeout_s: float = 2.0,
        http: Callable[[], httpx.Client] | None = None,
        reference: ReplicaInfo | None = None,
    ) -> None:
        self._feeds = {url: _Feed(url) for url in replicas}
        self._reference = reference
        self._refuse: Callable[[str, str], None] | None = None
        self._redis_url = redis_url
        self._cluster = cluster
        self._headers = dict(admin_headers or {})
        self._timeout_s = timeout_s
        self._http = (http or (lambda: httpx.Client(timeout=timeout_s)))()
        self._client: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.resyncs = 0

    # -- what the picker reads --------------------------------------------------------------

    def holdings(self, replica: str) -> Holdings | None:
        """The replica's holdings when they are exact right now, else ``None``."""
        feed = self._feeds.get(replica)
        if feed is None:
            return None
        with feed.lock:
            return feed.holdings if feed.holdings.exact else None

    def forget(self, replica: str) -> None:
        """The replica went down or restarted (a new epoch): check it again and reload its
        snapshot when it is back."""
        feed = self._feeds.get(replica)
        if feed is not None:
            with feed.lock:
                feed.holdings.forget()
                feed.verified = False

    # -- lifecycle ----------------------------------------------------------------------------

    def refuse_with(self, callback: Callable[[str, str], None]) -> None:
        """``callback(url, reason)`` hears of every replica whose blocks differ from the router's."""
        self._refuse = callback

    def start(self) -> None:
        """Start (or restart) reading; what is known so far is kept."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="kvproxy-route-feed", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop reading (the holdings stay as they are; ``start`` goes on from there)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None

    def close(self) -> None:
        self.stop()
        self._http.close()
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()

    # -- the loop -----------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            progressed = False
            for feed in list(self._feeds.values()):
                if time.monotonic() < feed.retry_at:
                    continue
                try:
                    progressed |= self._step(feed)
                except Exception as exc:  # one replica's trouble never stops the others
                    log.debug("block events of %s: %s", feed.replica, exc)
                    with feed.lock:
                        feed.holdings.exact = False
                    feed.retry_at = time.monotonic() + RETRY_S
                    self._drop_client_on(exc)
            if not progressed:
                self._stop.wait(POLL_S)

    def _step(self, feed: _Feed) -> bool:
        if feed.refused is not None:
            return False
        if not feed.verified:
            self._verify(feed)
            return True
        if self._redis_url is None:
            return False
        with feed.lock:
            exact = feed.holdings.exact
        if not exact:
            self._resync(feed)
            return True
        assert feed.stream is not None
        answer = self._redis().xread({feed.stream: feed.last_id}, count=READ_COUNT)
        if not answer:
            return False
        entries = answer[0][1]
        with feed.lock:
            for entry_id, fields in entries:
                seq = int(fields[b"seq"])
                raw = fields.get(b"hashes", b"")
                hashes = [raw[i : i + HASH_BYTES] for i in range(0, len(raw), HASH_BYTES)]
                op, tier = fields[b"op"].decode(), fields[b"tier"].decode()
                if not feed.holdings.apply(seq, op, tier, hashes):
                    log.info(
                        "block events of %s: a gap after event %d; reloading", feed.replica, feed.holdings.seq
                    )
                    return True
                feed.last_id = entry_id
        return bool(entries)

    def _verify(self, feed: _Feed) -> None:
        """Check the replica's info against the router's and note its event stream (once per
        start of the replica; the tokenizer files are not fetched again)."""
        info = ReplicaInfo.from_json(self._get(feed.replica, "/v1/cache/info?tokenizer=false"))
        why = self._reference.same_cache(info) if self._reference is not None else None
        if why is not None:
            feed.refused = why
            log.error("replica %s refused: %s; it gets no requests from this router", feed.replica, why)
            if self._refuse is not None:
                self._refuse(feed.replica, why)
            return
        with feed.lock:
            feed.stream, feed.epoch = info.events_stream, info.epoch
        feed.verified = True

    def _resync(self, feed: _Feed) -> None:
        """Snapshot, then replay the stream from its start (events the snapshot covers are
        skipped by their seq)."""
        stream, epoch = feed.stream, feed.epoch
        if not stream or not epoch:
            raise RuntimeError("the replica publishes no block events")
        snap = self._get(feed.replica, "/v1/cache/blocks")
        if snap.get("epoch") != epoch:
            feed.verified = False  # it restarted since it was checked: check it again
            raise RuntimeError("the replica restarted since its info was read")
        blocks = {tier: [bytes.fromhex(h) for h in snap.get(tier, [])] for tier in ("memory", "disk")}
        with feed.lock:
            feed.holdings.reset(epoch, int(snap["seq"]), blocks)
            feed.last_id = b"0-0"
        self.resyncs += 1
        log.info(
            "block index of %s: epoch %s, %d memory and %d disk blocks from its snapshot",
            feed.replica,
            epoch[:8],
            len(blocks["memory"]),
            len(blocks["disk"]),
        )

    def _get(self, replica: str, path: str) -> dict[str, Any]:
        response = self._http.get(replica.rstrip("/") + path, headers=self._headers)
        response.raise_for_status()
        data = response.json()
        if not isinstance(data, dict):
            raise RuntimeError(f"{path} answered no JSON object")
        return data

    def _redis(self) -> Any:
        if self._client is None:
            assert self._redis_url is not None
            self._client = connect(self._redis_url, timeout_s=self._timeout_s, cluster=self._cluster)
        return self._client

    def _drop_client_on(self, exc: Exception) -> None:
        if isinstance(exc, redis.RedisError) and self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None
