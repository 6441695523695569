"""The replicas behind the router and what it knows of each: health, load, failures, epoch.

Health is learned two ways. An active probe (``GET /health`` every ``health_interval_s``) makes a
replica healthy (200) or unhealthy (a 503 at once; ``PROBE_MISSES`` errors or timeouts in a row).
Forwarded requests count passively: ``fail_threshold`` consecutive failures (a connect error, a
5xx) take a replica out before the next probe notices, and only a successful probe brings it back.
Whoever keeps per-replica knowledge (the picker's view of what each replica has cached) subscribes
with ``on_down``: it hears when a replica becomes unhealthy or restarts (its ``/health`` ``epoch``
changed), since either loses its cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

log = logging.getLogger("kvproxy.route")

DownListener = Callable[[str], None]

PROBE_MISSES = 2
"""Health probes in a row that must go unanswered (error or timeout) before a replica is out."""


@dataclass
class ReplicaState:
    """One replica as the router sees it; owned and updated by `Replicas` (pickers only read)."""

    url: str
    healthy: bool = False
    in_flight: int = 0
    """Requests the router has open there now (its own count, not the replica's)."""
    failures: int = 0
    """Consecutive failed forwards; reset by any answer below 500."""
    health: dict[str, Any] | None = None
    """The last ``/health`` JSON (also kept from a 503, which says why)."""
    epoch: str | int | None = None
    """The replica's per-start epoch from ``/health``: a change means it restarted, cache empty."""
    checked_at: float | None = field(default=None, repr=False)
    probe_misses: int = 0
    """Consecutive health probes that failed."""
    refused: str | None = None
    """Why the router never sends it a request (it serves another model or block size)."""

    @property
    def waiting(self) -> int:
        """Requests queued at the replica as of the last probe (0 when unknown)."""
        return _queue_figure(self.health, "waiting")

    @property
    def running(self) -> int:
        """Requests running at the replica as of the last probe (0 when unknown)."""
        return _queue_figure(self.health, "running")


def _queue_figure(health: dict[str, Any] | None, name: str) -> int:
    queue = (health or {}).get("queue")
    value = queue.get(name) if isinstance(queue, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def normalize_url(url: str) -> str:
    """``http://host:port`` with no trailing slash: the one spelling used in keys and headers."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"replica URL {url!r} must start with http:// or https://")
    return url


class Replicas:
    """The set of replicas, their probe loop and failure counting (one event loop only)."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        health_interval_s: float = 1.0,
        health_timeout_s: float = 1.0,
        fail_threshold: int = 3,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not urls:
            raise ValueError("the router needs at least one replica")
        if health_interval_s <= 0 or health_timeout_s <= 0:
            raise ValueError("health_interval_s and health_timeout_s must be positive")
        if fail_threshold < 1:
            raise ValueError("fail_threshold must be at least 1")
        self._states: dict[str, ReplicaState] = {}
        for url in urls:
            key = normalize_url(url)
            if key in self._states:
                raise ValueError(f"replica {key} is listed twice")
            self._states[key] = ReplicaState(key)
        self.health_interval_s = health_interval_s
        self.health_timeout_s = health_timeout_s
        self.fail_threshold = fail_threshold
        self._clock = clock
        self._listeners: list[DownListener] = []
        self._client: httpx.AsyncClient | None = None
        self._loop_task: asyncio.Task[None] | None = None

    # ---- reading -------------------------------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        return list(self._states)

    def all(self) -> list[ReplicaState]:
        """Every replica, in the order given."""
        return list(self._states.values())

    def healthy(self) -> list[ReplicaState]:
        """The healthy replicas, in the order given."""
        return [s for s in self._states.values() if s.healthy]

    def get(self, url: str) -> ReplicaState | None:
        return self._states.get(url)

    def on_down(self, listener: DownListener) -> None:
        """Call ``listener(url)`` whenever a replica becomes unhealthy or its epoch changes."""
        self._listeners.append(listener)

    # ---- passive accounting (the forwarder) ----------------------------------------------------

    def opened(self, url: str) -> int:
        """A request was sent there; returns the new in-flight count."""
        state = self._states[url]
        state.in_flight += 1
        return state.in_flight

    def closed(self, url: str) -> int:
        """A request there finished or was abandoned; returns the new in-flight count."""
        state = self._states[url]
        state.in_flight = max(0, state.in_flight - 1)
        return state.in_flight

    def succeeded(self, url: str) -> None:
        self._states[url].failures = 0

    def failed(self, url: str) -> None:
        """A forward failed (no answer, or a 5xx); enough in a row take the replica out."""
        state = self._states[url]
        state.failures += 1
        if state.healthy and state.failures >= self.fail_threshold:
            log.warning("replica %s: %d failures in a row, marked unhealthy", url, state.failures)
            self._set_unhealthy(state)

    def refuse(self, url: str, reason: str) -> None:
        """Never route to ``url`` again (its blocks are not the ones the router hashes). Safe to
        call from another thread: it only sets flags the event loop reads."""
        state = self._states.get(url)
        if state is None or state.refused is not None:
            return
        state.refused = reason
        state.healthy = False
        self._notify(url)

    # ---- active probing ------------------------------------------------------------------------

    async def start(self, client: httpx.AsyncClient) -> None:
        """Probe every replica once (so the first request sees real health), then keep probing."""
        self._client = client
        await self.probe_all()
        self._loop_task = asyncio.create_task(self._probe_loop(), name="kvproxy-route-health")

    async def stop(self) -> None:
        task, self._loop_task = self._loop_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def probe_all(self) -> None:
        await asyncio.gather(*(self.probe(url) for url in self._states))

    async def probe(self, url: str) -> bool:
        """One ``GET /health``: 200 makes the replica healthy, anything else unhealthy."""
        if self._client is None:
            raise RuntimeError("Replicas.start() was not called")
        state = self._states[url]
        if state.refused is not None:
            return False
        health: dict[str, Any] | None = None
        ok = False
        try:
            resp = await self._client.get(url + "/health", timeout=self.health_timeout_s)
            ok = resp.status_code == 200
            health = _json_object(resp)
        except httpx.HTTPError as exc:
            if state.healthy:
                log.warning("replica %s: health probe failed (%s)", url, type(exc).__name__)
        state.checked_at = self._clock()
        if health is not None:
            state.health = health
            self._see_epoch(state, health.get("epoch"))
        if ok:
            if not state.healthy:
                log.info("replica %s is healthy", url)
            state.healthy = True
            state.failures = 0
            state.probe_misses = 0
            return True
        # A replica that answers "not ready" (503) is out at once; one that did not answer in time
        # only after PROBE_MISSES in a row (a busy machine can delay one probe).
        state.probe_misses += 1
        if state.healthy and (health is not None or state.probe_misses >= PROBE_MISSES):
            self._set_unhealthy(state)
        return False

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            try:
                await self.probe_all()
            except Exception:  # a bug here must not stop probing for good
                log.exception("health probe round failed")

    # ---- transitions ---------------------------------------------------------------------------

    def _see_epoch(self, state: ReplicaState, epoch: object) -> None:
        if not isinstance(epoch, str | int) or isinstance(epoch, bool):
            return
        previous, state.epoch = state.epoch, epoch
        if previous is not None and previous != epoch:
            log.info("replica %s restarted (epoch %s -> %s)", state.url, previous, epoch)
            self._notify(state.url)

    def _set_unhealthy(self, state: ReplicaState) -> None:
        state.healthy = False
        self._notify(state.url)

    def _notify(self, url: str) -> None:
        for listener in self._listeners:
            try:
                listener(url)
            except Exception:  # one listener's bug must not hide the event from the others
                log.exception("replica_down listener failed for %s", url)


def _json_object(resp: httpx.Response) -> dict[str, Any] | None:
    try:
        data = resp.json()
    except ValueError:
        return None
    return data if isinstance(data, dict) else None
