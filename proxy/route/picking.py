"""Which replica answers a request: the contract a picker implements, and two plain baselines.

The cache-aware picker (scoring what each replica holds) plugs in through `Picker`; the router
around it only needs an ordered list of replicas to try. `RoundRobinPicker` and
`LeastLoadedPicker` ignore the cache: the benchmarks compare the cache-aware picker against them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from proxy.route.replicas import ReplicaState

REASONS = frozenset(
    {"memory", "shared", "cold_home", "imbalance", "key", "round_robin", "least_loaded", "retry"}
)
"""Why a replica was chosen (the ``reason`` label of ``kvproxy_route_decisions_total``)."""


@dataclass(frozen=True)
class RouteRequest:
    """What a picker may look at: the route, the parsed body and the client's key."""

    route: str
    """The path, e.g. ``/v1/chat/completions``, ``/v1/completions``, ``/v1/messages``,
    ``/v1/messages/count_tokens``."""
    body: dict[str, Any]
    """The parsed JSON body (``{}`` when it is not a JSON object)."""
    api_key: str | None
    """The client's key (``Authorization: Bearer``, or ``x-api-key``), for its tenant."""


@dataclass(frozen=True)
class Pick:
    """A picker's answer."""

    order: list[str]
    """Replica URLs to try, best first; the router appends the other healthy ones as fallbacks."""
    reason: str
    """Why the first: one of `REASONS`."""
    expected_cached_tokens: int = 0
    """The prompt tokens the first replica is expected to restore from its cache."""


class Picker(Protocol):
    """Chooses replicas. Called on the router's event loop: ``pick`` must not block it."""

    async def pick(self, request: RouteRequest, replicas: Sequence[ReplicaState]) -> Pick:
        """The order to try; ``replicas`` are the healthy ones (never empty), in the order given
        on the command line."""
        ...

    def routed(self, request: RouteRequest, replica: str, pick: Pick) -> None:
        """``replica`` answered ``request`` (a 2xx response started), so it now holds its prefix."""
        ...

    def replica_down(self, replica: str) -> None:
        """``replica`` became unhealthy or restarted: forget what is known of its cache."""
        ...


class RoundRobinPicker:
    """Each request to the next healthy replica in turn (a baseline: no cache awareness)."""

    def __init__(self) -> None:
        self._turn = 0

    async def pick(self, request: RouteRequest, replicas: Sequence[ReplicaState]) -> Pick:
        urls = [r.url for r in replicas]
        if not urls:
            return Pick(order=[], reason="round_robin")
        start = self._turn % len(urls)
        self._turn += 1
        return Pick(order=urls[start:] + urls[:start], reason="round_robin")

    def routed(self, request: RouteRequest, replica: str, pick: Pick) -> None:
        pass

    def replica_down(self, replica: str) -> None:
        pass


class LeastLoadedPicker:
    """The replica with the fewest requests in flight from this router, ties by order (a baseline)."""

    async def pick(self, request: RouteRequest, replicas: Sequence[ReplicaState]) -> Pick:
        return Pick(order=least_loaded_order(replicas), reason="least_loaded")

    def routed(self, request: RouteRequest, replica: str, pick: Pick) -> None:
        pass

    def replica_down(self, replica: str) -> None:
        pass


def least_loaded_order(replicas: Sequence[ReplicaState]) -> list[str]:
    """URLs by in-flight count, ascending; the sort is stable, so ties keep the given order."""
    return [r.url for r in sorted(replicas, key=lambda r: r.in_flight)]
