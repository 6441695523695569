"""A real kvproxy server on a loopback port, run by uvicorn on a thread of the test process, so a
test can reach inside it: its pins run on a ``FakeClock`` the test advances (TTLs expire without
sleeping)."""

from __future__ import annotations

import threading
import time
from types import TracebackType

import httpx
import uvicorn

from proxy.app import create_app
from proxy.services import Services
from proxy.settings import ServeSettings
from tests.support.redis_fixtures import free_port

START_TIMEOUT_S = 60.0


class FakeClock:
    """A monotonic clock that moves only when told."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


class InProcessServer:
    def __init__(self, settings: ServeSettings, clock: FakeClock, port: int | None = None) -> None:
        self.port = port or free_port()
        self.settings = settings.model_copy(update={"host": "127.0.0.1", "port": self.port})
        self.url = f"http://127.0.0.1:{self.port}"
        self.clock = clock
        self.services = Services.create(self.settings)
        self.services.clock = clock
        config = uvicorn.Config(
            create_app(self.settings, self.services), host="127.0.0.1", port=self.port, log_level="warning"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="kvproxy-test-server", daemon=True)

    def start(self) -> InProcessServer:
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if not self._thread.is_alive():
                raise RuntimeError("the in-process server stopped while starting")
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the in-process server was not healthy after {START_TIMEOUT_S:.0f}s")

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(30)

    def __enter__(self) -> InProcessServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
