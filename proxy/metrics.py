"""Prometheus metrics on a per-app registry (no global prometheus state, so two apps in one
process -- as in tests -- never collide).

Request figures are counted as requests finish. Tier sizes and evictions are read from the stores'
own counters at scrape time (a custom collector) so they can never drift from the stores.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_STORE_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_BATCH_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class TierFigures:
    """What the scrape-time collector needs from one tier."""

    __slots__ = ("blocks", "bytes", "evictions")

    def __init__(self, blocks: int, nbytes: int, evictions: int) -> None:
        self.blocks = blocks
        self.bytes = nbytes
        self.evictions = evictions


class _TierCollector(Collector):
    def __init__(self, read: Callable[[], Mapping[str, TierFigures]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        figures = self._read()
        blocks = GaugeMetricFamily("kvproxy_cache_blocks", "Blocks held per tier", labels=["tier"])
        nbytes = GaugeMetricFamily("kvproxy_cache_bytes", "Bytes held per tier", labels=["tier"])
        evictions = CounterMetricFamily("kvproxy_cache_evictions", "Blocks evicted per tier", labels=["tier"])
        for tier, fig in figures.items():
            blocks.add_metric([tier], fig.blocks)
            nbytes.add_metric([tier], fig.bytes)
            evictions.add_metric([tier], fig.evictions)
        yield blocks
        yield nbytes
        yield evictions

    def describe(self) -> Iterator[Metric]:
        # Described lazily (empty) so registering does not call into the stores.
        return iter(())


class _EngineCollector(Collector):
    """Running and waiting requests, read from the engine at scrape time."""

    def __init__(self, read: Callable[[], tuple[int, int]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        running, waiting = self._read()
        yield GaugeMetricFamily("kvproxy_running_requests", "Requests in the batch", value=running)
        yield GaugeMetricFamily(
            "kvproxy_waiting_requests", "Requests waiting to join the batch", value=waiting
        )

    def describe(self) -> Iterator[Metric]:
        return iter(())


class _PinCollector(Collector):
    """Bytes held in memory by pins (cache breakpoints), read at scrape time."""

    def __init__(self, read: Callable[[], int]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "kvproxy_pinned_bytes", "Memory-tier bytes kept by pins until their TTL", value=self._read()
        )

    def describe(self) -> Iterator[Metric]:
        return iter(())


class Metrics:
    """Every kvproxy metric, on its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter(
            "kvproxy_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.prompt_tokens = Counter("kvproxy_prompt_tokens", "Prompt tokens received", registry=r)
        self.cached_tokens = Counter(
            "kvproxy_cached_tokens", "Prompt tokens restored from cache, by tier", ["tier"], registry=r
        )
        self.ttft = Histogram(
            "kvproxy_ttft_seconds",
            "Time to first token; cache=hit (every full block restored), partial, miss",
            ["cache"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.store_errors = Counter(
            "kvproxy_store_errors", "Failed store calls by tier and op", ["tier", "op"], registry=r
        )
        self.store_seconds = Histogram(
            "kvproxy_store_seconds",
            "Store call latency by tier and op",
            ["tier", "op"],
            buckets=_STORE_BUCKETS,
            registry=r,
        )

        self.batch_tokens = Histogram(
            "kvproxy_batch_tokens",
            "Tokens per forward step (decode tokens + prefill chunks)",
            buckets=_BATCH_TOKEN_BUCKETS,
            registry=r,
        )
        self.step_seconds = Histogram(
            "kvproxy_step_seconds", "Duration of one forward step", buckets=_STEP_BUCKETS, registry=r
        )

    def watch_engine(self, read: Callable[[], tuple[int, int]]) -> None:
        """Report ``(running, waiting)`` from ``read()`` at every scrape."""
        self.registry.register(_EngineCollector(read))

    def watch_pins(self, read: Callable[[], int]) -> None:
        """Report ``kvproxy_pinned_bytes`` from ``read()`` at every scrape."""
        self.registry.register(_PinCollector(read))

    def observe_step(self, tokens: int, seconds: float) -> None:
        """One forward step (called from the engine's thread; prometheus is thread-safe)."""
        self.batch_tokens.observe(tokens)
        self.step_seconds.observe(seconds)

    def watch_tiers(self, read: Callable[[], Mapping[str, TierFigures]]) -> None:
        """Report tier sizes and evictions from ``read()`` at every scrape."""
        self.registry.register(_TierCollector(read))

    def observe_store(self, tier: str, op: str, seconds: float, ok: bool) -> None:
        """The TieredStore observer callback (called from store threads; prometheus is thread-safe)."""
        self.store_seconds.labels(tier, op).observe(seconds)
        if not ok:
            self.store_errors.labels(tier, op).inc()

    def observe_request(self, route: str, status: int) -> None:
        self.requests.labels(route, str(status)).inc()

    def observe_generation(
        self, *, prompt_tokens: int, cached_by_tier: Mapping[str, int], cache: str, ttft_s: float | None
    ) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        for tier, tokens in cached_by_tier.items():
            if tokens:
                self.cached_tokens.labels(tier).inc(tokens)
        if ttft_s is not None:
            self.ttft.labels(cache).observe(ttft_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
