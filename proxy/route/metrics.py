"""The router's Prometheus metrics, in a registry of its own, and the tap that reads the actual
cached tokens out of an answer as its bytes pass through (the router never re-encodes a body).

Expected vs. actual cached tokens per replica is the figure that says whether cache-aware
routing works: ``kvproxy_route_expected_cached_tokens_total`` is what the picker promised,
``kvproxy_route_cached_tokens_total`` what the replicas reported in ``usage``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.metrics import MetricWrapperBase

METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST


class RouteMetrics:
    """The ``kvproxy_route_*`` series; one instance per router app."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._replicas: list[str] = []
        self._decisions = Counter(
            "kvproxy_route_decisions_total",
            "Requests routed, by the replica that answered and why it was chosen.",
            ["replica", "reason"],
            registry=self.registry,
        )
        self._in_flight = Gauge(
            "kvproxy_route_in_flight",
            "Requests the router has open at each replica.",
            ["replica"],
            registry=self.registry,
        )
        self._retries = Counter(
            "kvproxy_route_retries_total",
            "Requests sent again elsewhere because this replica failed before answering.",
            ["replica"],
            registry=self.registry,
        )
        self._expected = Counter(
            "kvproxy_route_expected_cached_tokens_total",
            "Prompt tokens the picker expected the replica to restore from its cache.",
            ["replica"],
            registry=self.registry,
        )
        self._cached = Counter(
            "kvproxy_route_cached_tokens_total",
            "Prompt tokens the replica reported as restored from its cache (usage).",
            ["replica"],
            registry=self.registry,
        )

    def add_replicas(self, urls: Iterable[str]) -> None:
        """Create every per-replica series at zero, so a dashboard sees idle replicas too."""
        for url in urls:
            if url not in self._replicas:
                self._replicas.append(url)
            self._in_flight.labels(replica=url).set(0)
            self._retries.labels(replica=url)
            self._expected.labels(replica=url)
            self._cached.labels(replica=url)

    def decided(self, replica: str, reason: str) -> None:
        self._decisions.labels(replica=replica, reason=reason).inc()

    def set_in_flight(self, replica: str, count: int) -> None:
        self._in_flight.labels(replica=replica).set(count)

    def retried(self, replica: str) -> None:
        self._retries.labels(replica=replica).inc()

    def expected_cached(self, replica: str, tokens: int) -> None:
        if tokens > 0:
            self._expected.labels(replica=replica).inc(tokens)

    def cached(self, replica: str, tokens: int) -> None:
        if tokens > 0:
            self._cached.labels(replica=replica).inc(tokens)

    def render(self) -> bytes:
        """The Prometheus text format of every series."""
        return generate_latest(self.registry)

    def snapshot(self) -> dict[str, Any]:
        """The same figures as JSON (``GET /v1/route/stats``): per replica (in the order added,
        then any other that has a figure) and summed in ``total``: ``decisions`` by reason,
        ``routed`` (their sum), ``in_flight``, ``retries``, ``expected_cached_tokens`` (what the
        picker promised) and ``cached_tokens`` (what the replicas reported)."""
        decisions = _samples(self._decisions, "_total")
        figures = {
            "in_flight": _samples(self._in_flight, ""),
            "retries": _samples(self._retries, "_total"),
            "expected_cached_tokens": _samples(self._expected, "_total"),
            "cached_tokens": _samples(self._cached, "_total"),
        }
        seen = [labels["replica"] for labels, _ in decisions]
        seen += [labels["replica"] for series in figures.values() for labels, _ in series]
        replicas = {url: _empty_figures() for url in dict.fromkeys([*self._replicas, *seen])}
        for labels, value in decisions:
            entry = replicas[labels["replica"]]
            entry["decisions"][labels["reason"]] = entry["decisions"].get(labels["reason"], 0) + value
            entry["routed"] += value
        for name, series in figures.items():
            for labels, value in series:
                replicas[labels["replica"]][name] += value
        total = _empty_figures()
        for entry in replicas.values():
            for reason, value in entry["decisions"].items():
                total["decisions"][reason] = total["decisions"].get(reason, 0) + value
            for name in ("routed", *figures):
                total[name] += entry[name]
        return {"replicas": replicas, "total": total}


class CachedTokensTap:
    """Finds the cached prompt tokens in a response body fed to it chunk by chunk.

    A JSON body (OpenAI ``usage.prompt_tokens_details.cached_tokens``, Anthropic
    ``usage.cache_read_input_tokens``) is kept up to ``max_json_bytes`` and parsed at the end; an
    SSE body is scanned line by line for ``data:`` lines that carry a ``usage`` (the last one wins:
    Anthropic's ``message_delta`` repeats and completes ``message_start``'s)."""

    def __init__(self, content_type: str, *, max_json_bytes: int = 1 << 20) -> None:
        kind = content_type.split(";", 1)[0].strip().lower()
        self._sse = kind == "text/event-stream"
        self._json = kind == "application/json"
        self._limit = max_json_bytes
        self._parts: list[bytes] = []
        self._size = 0
        self._skipping = False  # inside an SSE line too long to keep
        self._found: int | None = None

    def feed(self, chunk: bytes) -> None:
        if self._sse:
            self._feed_sse(chunk)
        elif self._json and self._size <= self._limit:
            self._size += len(chunk)
            if self._size <= self._limit:
                self._parts.append(chunk)
            else:
                self._parts.clear()

    def result(self) -> int | None:
        """The cached tokens the body reported, or ``None`` when it reported none."""
        if self._json and self._parts:
            data = _loads(b"".join(self._parts))
            self._parts.clear()
            if isinstance(data, dict):
                self._found = cached_tokens(data.get("usage"))
        return self._found

    def _feed_sse(self, chunk: bytes) -> None:
        lines = chunk.split(b"\n")
        for i, piece in enumerate(lines):
            last = i == len(lines) - 1
            if self._skipping:
                self._skipping = last  # a line too long to keep ends at the next newline
                continue
            self._parts.append(piece)
            self._size += len(piece)
            if last:
                if self._size > self._limit:
                    self._parts.clear()
                    self._size = 0
                    self._skipping = True
                break
            line = b"".join(self._parts)
            self._parts.clear()
            self._size = 0
            self._read_line(line)

    def _read_line(self, line: bytes) -> None:
        if not line.startswith(b"data:") or b'"usage"' not in line:
            return
        event = _loads(line[5:])
        if not isinstance(event, dict):
            return
        message = event.get("message")
        usage = event.get("usage") or (message.get("usage") if isinstance(message, dict) else None)
        found = cached_tokens(usage)
        if found is not None:
            self._found = found


def _samples(metric: MetricWrapperBase, suffix: str) -> list[tuple[dict[str, str], int]]:
    """(labels, value) of every series of ``metric``; ``suffix`` picks the counter's ``_total``
    samples over its ``_created`` ones."""
    return [
        (sample.labels, int(sample.value))
        for family in metric.collect()
        for sample in family.samples
        if sample.name == family.name + suffix
    ]


def _empty_figures() -> dict[str, Any]:
    return {
        "decisions": {},
        "routed": 0,
        "in_flight": 0,
        "retries": 0,
        "expected_cached_tokens": 0,
        "cached_tokens": 0,
    }


def cached_tokens(usage: Any) -> int | None:
    """The cached prompt tokens of a ``usage`` object in either API's shape."""
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict):
        value = details.get("cached_tokens")
    else:
        value = usage.get("cache_read_input_tokens")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _loads(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None
