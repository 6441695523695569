"""Live servers for the proxy's end-to-end tests.

Every server runs the real engine on the offline ``demo`` model (built once per session into a
temp cache dir), with small blocks so short prompts span several, and a 1024-token context so
"over the context" cases stay cheap. Session-scoped where tests can share a server.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from model_runner.demo import ensure_demo_model
from tests.support.browser import browser  # noqa: F401 (the dashboard tests' fixture, here and in route/)
from tests.support.live_server import LiveServer

BLOCK_SIZE = 16
MAX_CONTEXT = 1024
# A generous store timeout: on a busy 2-core CI machine a 200 ms Redis call can time out, which
# (by design) turns a hit into a miss; the tiers' own tests cover timeouts.
BASE_ARGS = ["--block-size", str(BLOCK_SIZE), "--max-context", str(MAX_CONTEXT), "--store-timeout-ms", "2000"]

ServerFactory = Callable[..., LiveServer]


@pytest.fixture(scope="session")
def kvp_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache_dir = tmp_path_factory.mktemp("kvproxy-cache")
    ensure_demo_model(cache_dir)  # once, before any server races to build it
    return cache_dir


@pytest.fixture(scope="session")
def session_redis_prefix(redis_url: str) -> Iterator[str]:
    """A Redis prefix for the session's shared servers; its keys (only) are deleted at the end."""
    prefix = f"kvptest:{uuid.uuid4().hex}:"
    yield prefix
    delete_prefix(redis_url, prefix)


def delete_prefix(redis_url: str, prefix: str) -> None:
    with redis.Redis.from_url(redis_url, socket_timeout=5) as client:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        for i in range(0, len(keys), 500):
            client.unlink(*keys[i : i + 500])


def _factory(tmp: Path, cache_dir: Path, started: list[LiveServer]) -> ServerFactory:
    def make(*args: str, env: dict[str, str] | None = None, start: bool = True) -> LiveServer:
        server = LiveServer(
            [*BASE_ARGS, *args],
            log_path=tmp / f"server-{len(started)}.log",
            cache_dir=cache_dir,
            env=env,
        )
        started.append(server)
        return server.start() if start else server

    return make


def _shared_servers(tmp: Path, cache_dir: Path) -> Iterator[ServerFactory]:
    started: list[LiveServer] = []
    yield _factory(tmp, cache_dir, started)
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def session_server_factory(
    tmp_path_factory: pytest.TempPathFactory, kvp_cache_dir: Path
) -> Iterator[ServerFactory]:
    yield from _shared_servers(tmp_path_factory.mktemp("servers"), kvp_cache_dir)


@pytest.fixture(scope="module")
def module_server_factory(
    tmp_path_factory: pytest.TempPathFactory, kvp_cache_dir: Path
) -> Iterator[ServerFactory]:
    """Servers shared by one test module, stopped afterwards."""
    yield from _shared_servers(tmp_path_factory.mktemp("servers"), kvp_cache_dir)


@pytest.fixture
def server_factory(tmp_path: Path, kvp_cache_dir: Path) -> Iterator[ServerFactory]:
    """Servers for one test (stopped with SIGTERM afterwards)."""
    started: list[LiveServer] = []
    yield _factory(tmp_path, kvp_cache_dir, started)
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def disk_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("disk-tier")


@pytest.fixture(scope="session")
def server(
    session_server_factory: ServerFactory, redis_url: str, session_redis_prefix: str, disk_dir: Path
) -> LiveServer:
    """The shared server: memory + disk + Redis tiers, no auth."""
    return session_server_factory(
        "--disk-dir", str(disk_dir), "--redis-url", redis_url, "--redis-prefix", session_redis_prefix
    )
