"""Live servers for the reliability tests: the real ``kvproxy serve`` on the offline ``demo`` model,
with small blocks so short prompts span several, broken on purpose by the tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from model_runner.demo import ensure_demo_model
from tests.support.live_server import LiveServer

BLOCK_SIZE = 16
MAX_CONTEXT = 1024
BASE_ARGS = ["--block-size", str(BLOCK_SIZE), "--max-context", str(MAX_CONTEXT)]
# One intra-op thread: the demo model is tiny, and on a loaded 2-core machine (the test process,
# Redis and sometimes two servers share it) torch's thread barriers make every forward much slower.
SERVER_ENV = {"OMP_NUM_THREADS": "1"}

ServerFactory = Callable[..., LiveServer]


@pytest.fixture(scope="session")
def demo_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache_dir = tmp_path_factory.mktemp("kvproxy-cache")
    ensure_demo_model(cache_dir)  # once, before any server races to build it
    return cache_dir


def _factory(tmp: Path, cache_dir: Path, started: list[LiveServer]) -> ServerFactory:
    def make(
        *args: str,
        env: dict[str, str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
        start: bool = True,
    ) -> LiveServer:
        server = LiveServer(
            [*BASE_ARGS, *args],
            log_path=tmp / f"server-{len(started)}.log",
            cache_dir=cache_dir,
            env={**SERVER_ENV, **(env or {})},
            preexec_fn=preexec_fn,
        )
        started.append(server)
        return server.start() if start else server

    return make


def _stop_all(started: list[LiveServer]) -> None:
    for server in started:
        try:
            server.stop()
        except RuntimeError:
            server.kill()


@pytest.fixture
def server_factory(tmp_path: Path, demo_cache_dir: Path) -> Iterator[ServerFactory]:
    """Servers for one test, stopped (SIGTERM) afterwards."""
    started: list[LiveServer] = []
    yield _factory(tmp_path, demo_cache_dir, started)
    _stop_all(started)


@pytest.fixture(scope="module")
def module_server_factory(
    tmp_path_factory: pytest.TempPathFactory, demo_cache_dir: Path
) -> Iterator[ServerFactory]:
    """Servers shared by one test module, stopped afterwards."""
    started: list[LiveServer] = []
    yield _factory(tmp_path_factory.mktemp("servers"), demo_cache_dir, started)
    _stop_all(started)
