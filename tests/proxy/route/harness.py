"""A router app served on a loopback port by uvicorn on a thread of the test process, in front of
in-process replicas, and a picker that returns whatever order the test sets."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import httpx
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from proxy.route.app import create_route_app
from proxy.route.picking import Pick, RouteRequest
from proxy.route.replicas import Replicas, ReplicaState
from proxy.settings import ServeSettings
from tests.support.inprocess_server import FakeClock, InProcessServer
from tests.support.redis_fixtures import free_port

START_TIMEOUT_S = 30.0
ADMIN_KEY = "sk-route-admin"
USER_KEY = "sk-route-user"


def write_api_keys(path: Path) -> Path:
    path.write_text(f"{ADMIN_KEY} team admin\n{USER_KEY} team\n")
    return path


def start_replica(model: Path, tmp: Path, api_keys: Path | None = None) -> InProcessServer:
    """A real replica on the tiny model: small blocks, short answers, its own disk dir."""
    settings = ServeSettings(
        model=str(model),
        disk_dir=tmp / "blocks",
        block_size=16,
        max_context=512,
        default_max_tokens=8,
        api_keys=api_keys,
    )
    return InProcessServer(settings, FakeClock()).start()


class FixedPicker:
    """Returns ``order`` (set by the test) and records what the router tells it."""

    def __init__(self, order: Sequence[str] = (), reason: str = "key", expected: int = 0) -> None:
        self.reason = reason
        self.expected = expected
        self.reset(order)

    def reset(self, order: Sequence[str] = ()) -> None:
        """A clean record (tests share one router)."""
        self.order = list(order)
        self.requests: list[RouteRequest] = []
        self.offered: list[list[str]] = []
        self.routed_to: list[str] = []
        self.down: list[str] = []

    async def pick(self, request: RouteRequest, replicas: Sequence[ReplicaState]) -> Pick:
        self.requests.append(request)
        self.offered.append([r.url for r in replicas])
        return Pick(order=list(self.order), reason=self.reason, expected_cached_tokens=self.expected)

    def routed(self, request: RouteRequest, replica: str, pick: Pick) -> None:
        self.routed_to.append(replica)

    def replica_down(self, replica: str) -> None:
        self.down.append(replica)


class RouterServer:
    """``create_route_app(replicas, picker)`` on a free port."""

    def __init__(self, replicas: Replicas, picker: FixedPicker) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.replicas = replicas
        self.picker = picker
        config = uvicorn.Config(
            create_route_app(replicas, picker), host="127.0.0.1", port=self.port, log_level="warning"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="kvproxy-test-router", daemon=True)

    def start(self) -> RouterServer:
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the router did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(30)

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample of the router's /metrics (0 when absent)."""
        text = httpx.get(self.url + "/metrics", timeout=5).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0

    def __enter__(self) -> RouterServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
