"""The Redis tier: block records shared by every replica, one key per block.

Key layout: ``<prefix><block hash as lowercase hex>``; the value is the record, untouched. Reads
are one MGET (per hash slot in cluster mode), writes one pipeline. Every call is bounded by
``timeout_ms`` as a whole and goes through a ``CircuitBreaker``: a down, slow or full Redis becomes
misses, counted as errors, and after a few failures no network call is even attempted until the
cooldown has passed.

The socket timeouts alone bound each socket operation, not a call: a server that trickles a reply
(every chunk just inside the timeout) could hold one MGET for seconds. So calls run on a small
pool of threads and the caller waits at most ``timeout_ms`` for the answer; a call that overruns is
a failure, and its connections are closed so the abandoned thread stops soon too.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import ClusterError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry

from cache_store.breaker import CircuitBreaker
from cache_store.store import Buffer, StoreStats

log = logging.getLogger(__name__)

T = TypeVar("T")

_CLEAR_BATCH = 500
_BREAKER_FAILURES = 3
# Threads that run Redis calls. A few calls abandoned at their deadline may still hold one each
# until their connection is closed; past that, new calls wait in the queue and time out too.
_CALL_THREADS = 4

EVENTS_INFIX = "events:"
"""Keys ``<prefix>events:<epoch>`` are replicas' block event streams (``cache_store.events``), not
blocks: a clear leaves them alone (they belong to every replica under the prefix, and expire)."""


class CallDeadlineExceeded(TimeoutError):
    """A Redis call did not complete within ``timeout_ms``."""


def connect(url: str, *, timeout_s: float, cluster: bool) -> redis.Redis | RedisCluster:
    """A client for ``url`` whose every socket operation is bounded by ``timeout_s``. No retry
    that could double the bound: one immediate retry of a dropped pooled connection (standalone),
    none at cluster level. A cluster client talks to the nodes here, so this may raise."""
    if cluster:
        return RedisCluster.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        # One immediate retry on a dropped connection only (a pooled socket the server closed,
        # e.g. after a restart); never on a timeout, which would double the bound.
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        retry_on_timeout=False,
        health_check_interval=0,
    )


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (safe for logs, /health and repr)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable redis url>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class RedisStore:
    """Block records in Redis (standalone or Cluster) under ``prefix``."""

    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "kvp:v1:",
        ttl_s: int | None = None,
        timeout_ms: int = 200,
        breaker_cooldown_s: float = 10.0,
        cluster: bool = False,
    ) -> None:
        if not url.startswith(("redis://", "rediss://")):
            raise ValueError(f"redis url must start with redis:// or rediss://, got {redact_url(url)}")
        if ttl_s is not None and ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        if timeout_ms <= 0:
            raise ValueError(f"timeout_ms must be positive, got {timeout_ms}")
        self._url = url
        self.redacted_url = redact_url(url)
        self._password = urlsplit(url).password
        self.prefix = prefix
        self._prefix_bytes = prefix.encode()
        self.ttl_s = ttl_s
        self.timeout_ms = timeout_ms
        self.cluster = cluster
        self.breaker = CircuitBreaker(failure_threshold=_BREAKER_FAILURES, cooldown_s=breaker_cooldown_s)
        self._lock = threading.Lock()
        self._client: redis.Redis | RedisCluster | None = None
        self._calls = ThreadPoolExecutor(max_workers=_CALL_THREADS, thread_name_prefix="kvproxy-redis")
        self._hits = 0
        self._misses = 0
        self._puts = 0
        self._errors: dict[str, int] = {}
        self._last_ok = True
        self._outage_reported = False  # a warning went out for the current outage

    # -- public API ---------------------------------------------------------------------------

    def key(self, block_hash: bytes) -> bytes:
        """The Redis key of a block."""
        return self._prefix_bytes + block_hash.hex().encode()

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | bytearray | None]:
        if not keys:
            return []
        rkeys = [self.key(k) for k in keys]
        values = self._call("get", lambda client: self._mget(client, rkeys))
        if values is None:
            values = [None] * len(keys)
        hit_keys = [rk for rk, v in zip(rkeys, values, strict=True) if v is not None]
        with self._lock:
            self._hits += len(hit_keys)
            self._misses += len(keys) - len(hit_keys)
        if hit_keys and self.ttl_s is not None:
            # Best effort, after the read: a failed refresh never turns a hit into a miss.
            self._call("expire", lambda client: self._expire(client, hit_keys))
        return values

    def put_many(self, items: Sequence[tuple[bytes, Buffer]]) -> int:
        if not items:
            return 0

        def write(client: Any) -> int:
            pipe = client.pipeline(transaction=False)
            for key, value in items:
                pipe.set(self.key(key), value, ex=self.ttl_s)
            # Per-command errors (a full server's OOM) come back in place, so the SETs that did
            # succeed still count; an outage still raises.
            results = pipe.execute(raise_on_error=False)
            refused = [r for r in results if isinstance(r, Exception)]
            if refused:
                self._count_error("put")
                log.debug("redis refused %d of %d writes: %s", len(refused), len(results), refused[0])
            return sum(1 for r in results if r is True)

        stored = self._call("put", write) or 0
        with self._lock:
            self._puts += stored
        return stored

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        if not keys:
            return []

        def exists(client: Any) -> list[bool]:
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.exists(self.key(key))
            return [bool(n) for n in pipe.execute()]

        found = self._call("contains", exists)
        return found if found is not None else [False] * len(keys)

    def delete(self, keys: Sequence[bytes]) -> int:
        if not keys:
            return 0
        rkeys = [self.key(k) for k in keys]
        return self._call("delete", lambda client: int(client.unlink(*rkeys))) or 0

    def clear(self) -> int:
        """Delete every key under this store's prefix (SCAN + UNLINK; never FLUSHDB), except the
        replicas' event streams (``EVENTS_INFIX``)."""
        pattern = _glob_escape(self.prefix) + "*"
        streams = self._prefix_bytes + EVENTS_INFIX.encode()

        def scan_and_unlink(client: Any) -> int:
            removed = 0
            batch: list[bytes] = []
            for rkey in client.scan_iter(match=pattern, count=1000):
                if rkey.startswith(streams):
                    continue
                batch.append(rkey)
                if len(batch) >= _CLEAR_BATCH:
                    removed += int(client.unlink(*batch))
                    batch = []
            if batch:
                removed += int(client.unlink(*batch))
            return removed

        # Not bounded as a whole: a large prefix takes many SCAN pages (each page still is, by the
        # socket timeout), and flushing is an admin action, never on a request's path.
        return self._call("clear", scan_and_unlink, bounded=False) or 0

    def stats(self) -> StoreStats:
        """Counters of this process's calls; block and byte counts are not tracked for a shared
        server (0), since counting keys under a prefix would cost a full SCAN."""
        state = self.breaker.state
        with self._lock:
            return StoreStats(
                name=self.name,
                hits=self._hits,
                misses=self._misses,
                puts=self._puts,
                errors=dict(self._errors),
                healthy=self._last_ok and state == "closed",
                breaker=state,
            )

    def close(self) -> None:
        self._calls.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception as exc:  # closing a broken connection must not fail shutdown
                log.debug("redis close failed: %s", self._scrub(exc))

    def __repr__(self) -> str:
        return f"RedisStore(url={self.redacted_url!r}, prefix={self.prefix!r}, cluster={self.cluster})"

    # -- helpers --------------------------------------------------------------------------------

    def _call(self, op: str, fn: Callable[[Any], T], *, bounded: bool = True) -> T | None:
        """Run ``fn(client)`` under the breaker, within ``timeout_ms`` unless not ``bounded``;
        ``None`` when skipped or failed (counted)."""
        if not self.breaker.allow():
            return None
        try:
            result = self._run_bounded(fn) if bounded else fn(self._get_client())
        except ResponseError as exc:
            if isinstance(exc, ClusterError):
                return self._failed(op, exc)
            # The server answered, with a command error (OOM, ACL, ...): count it, but it is no
            # outage: the breaker counts it as a sign of life, and reads keep working.
            self.breaker.record_success()
            self._outage_over()
            self._count_error(op)
            log.debug("redis %s refused: %s", op, self._scrub(exc))
            return None
        except Exception as exc:  # any fault of a remote cache is a miss, never the caller's error
            return self._failed(op, exc)
        self.breaker.record_success()
        with self._lock:
            self._last_ok = True
        self._outage_over()
        return result

    def _outage_over(self) -> None:
        with self._lock:
            reported, self._outage_reported = self._outage_reported, False
        if reported:
            log.info("redis %s available again; circuit closed", self.redacted_url)

    def _run_bounded(self, fn: Callable[[Any], T]) -> T:
        """``fn(client)`` on the call threads; raises ``CallDeadlineExceeded`` after ``timeout_ms``
        (or whatever ``fn`` raised)."""
        future = self._calls.submit(lambda: fn(self._get_client()))
        try:
            return future.result(timeout=self.timeout_ms / 1000.0)
        except FutureTimeout:
            if not future.cancel():
                # Running and stuck on a slow socket: closing the connections ends its read now
                # rather than after a trickle of chunks, so the thread is free for the next call.
                self._disconnect()
            raise CallDeadlineExceeded(f"no complete answer within {self.timeout_ms} ms") from None

    def _disconnect(self) -> None:
        with self._lock:
            client = self._client
        if client is None:
            return
        try:
            if isinstance(client, RedisCluster):
                client.disconnect_connection_pools()
            else:
                client.connection_pool.disconnect()
        except Exception as exc:  # best effort: the call has failed already either way
            log.debug("redis disconnect failed: %s", self._scrub(exc))

    def _failed(self, op: str, exc: Exception) -> None:
        """Count an outage-like failure and feed the breaker. An outage is logged once, when the
        breaker first opens: every failed half-open trial reopens it, and a warning per cooldown
        for as long as Redis stays down would bury everything else in the log."""
        self.breaker.record_failure()
        opened = self.breaker.state == "open"
        with self._lock:
            self._errors[op] = self._errors.get(op, 0) + 1
            self._last_ok = False
            first = opened and not self._outage_reported
            if first:
                self._outage_reported = True
        if first:
            log.warning(
                "redis %s unavailable (%s); circuit open for %.1fs",
                self.redacted_url,
                self._scrub(exc),
                self.breaker.cooldown_s,
            )
        else:
            log.debug("redis %s failed: %s", op, self._scrub(exc))

    def _get_client(self) -> redis.Redis | RedisCluster:
        with self._lock:
            if self._client is not None:
                return self._client
        # Built lazily: RedisCluster talks to the nodes in its constructor, which must not raise
        # out of ours.
        client = connect(self._url, timeout_s=self.timeout_ms / 1000.0, cluster=self.cluster)
        with self._lock:
            if self._client is None:
                self._client = client
                return client
            winner = self._client
        client.close()
        return winner

    def _mget(self, client: Any, rkeys: list[bytes]) -> list[bytes | None]:
        if self.cluster:
            return client.mget_nonatomic(rkeys)
        return client.mget(rkeys)

    def _expire(self, client: Any, rkeys: list[bytes]) -> None:
        pipe = client.pipeline(transaction=False)
        for rkey in rkeys:
            pipe.expire(rkey, self.ttl_s)
        pipe.execute(raise_on_error=False)

    def _count_error(self, op: str) -> None:
        with self._lock:
            self._errors[op] = self._errors.get(op, 0) + 1

    def _scrub(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}"
        if self._password:
            text = text.replace(self._password, "***")
        return text


def _glob_escape(text: str) -> str:
    """Escape Redis glob metacharacters so a prefix matches only itself."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)
