"""Redis fixtures: the shared server at REDIS_URL, private servers, a three-node cluster.

Tests that only read and write use the shared server under a unique prefix (``redis_prefix``) and
delete only their own keys. Tests that stop, fill or break Redis start a private ``redis-server``
(``private_redis`` / ``redis_server_factory``). A missing service is a failure with a how-to,
never a skip.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
_START_HINT = (
    "start one with `redis-server --daemonize yes --port 6379 --save ''` or `bash scripts/services.sh`, "
    "or point REDIS_URL at a running server"
)
_INSTALL_HINT = (
    "redis-server is not installed: `apt-get install redis-server` (or `bash scripts/services.sh`)"
)


def free_port() -> int:
    """A currently free loopback TCP port (racy by nature, but fine for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too; Redis refuses ports > 55535."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randint(20000, 55535)
        if _port_is_free(port) and _port_is_free(port + 10000):
            return port
    pytest.fail("no free loopback port pair for a Redis Cluster node", pytrace=False)


def _redis_server_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        pytest.fail(_INSTALL_HINT, pytrace=False)
    return path


class RedisServer:
    """A private ``redis-server`` on a loopback port, owned by the test (not daemonized)."""

    def __init__(self, workdir: Path, *extra_args: str, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port if port is not None else free_port()
        self.extra_args = extra_args
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kwargs: object) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, **kwargs)  # type: ignore[arg-type]

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        """Start (or restart, on the same port) and wait until it answers PING."""
        if self.running:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [
            _redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--logfile", str(self.workdir / "redis.log"),
            *self.extra_args,
        ]  # fmt: skip
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                log = self._log_tail()
                pytest.fail(f"redis-server on port {self.port} exited at start: {err}{log}", pytrace=False)
            try:
                # No client-side retries: redis-py's default backoff would sleep for seconds
                # while the server is still binding its port.
                with self.client(socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0)) as client:
                    client.ping()
                return self
            except (redis.AuthenticationError, redis.ResponseError):
                return self  # it answers; it just wants a password (--requirepass)
            except redis.RedisError:
                time.sleep(0.02)
        self.kill()
        pytest.fail(f"redis-server on port {self.port} did not answer within {timeout_s}s", pytrace=False)

    def stop(self) -> None:
        """Graceful stop; the port is free when this returns."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        self._close_pipes()

    def kill(self) -> None:
        """SIGKILL: the server vanishes without closing anything cleanly."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait(timeout=5)
        self._close_pipes()

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers (a hung server)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGCONT)

    def _close_pipes(self) -> None:
        if self._proc is not None and self._proc.stderr is not None:
            self._proc.stderr.close()

    def _log_tail(self) -> str:
        try:
            return "\n" + (self.workdir / "redis.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def __repr__(self) -> str:
        return f"RedisServer(port={self.port}, running={self.running})"


class RedisClusterNodes:
    """Three private cluster-enabled servers on loopback holding all 16384 slots."""

    def __init__(self, servers: list[RedisServer]) -> None:
        self.servers = servers

    @property
    def url(self) -> str:
        """A startup node; clients discover the rest."""
        return self.servers[0].url

    def start(self, timeout_s: float = 20.0) -> RedisClusterNodes:
        for server in self.servers:
            server.start()
        clients = [server.client() for server in self.servers]
        try:
            per_node = 16384 // len(self.servers)
            for i, client in enumerate(clients):
                first = i * per_node
                last = 16383 if i == len(clients) - 1 else first + per_node - 1
                try:
                    client.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
                except redis.ResponseError:  # Redis < 7 has only ADDSLOTS
                    client.execute_command("CLUSTER", "ADDSLOTS", *range(first, last + 1))
                client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)
            for client in clients[1:]:
                client.execute_command("CLUSTER", "MEET", "127.0.0.1", self.servers[0].port)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                infos = [client.cluster("info") for client in clients]
                if all(
                    info.get("cluster_state") == "ok" and int(info.get("cluster_known_nodes", 0)) == 3
                    for info in infos
                ):
                    return self
                time.sleep(0.05)
        finally:
            for client in clients:
                client.close()
        self.stop()
        pytest.fail(f"redis cluster did not reach cluster_state:ok within {timeout_s}s", pytrace=False)

    def stop(self) -> None:
        for server in self.servers:
            server.kill()


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The shared Redis (REDIS_URL, default redis://127.0.0.1:6379/0); fails with a how-to if down."""
    url = os.environ.get("REDIS_URL", DEFAULT_REDIS_URL)
    try:
        with redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2) as client:
            client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"no Redis answering at REDIS_URL={url} ({exc}); {_START_HINT}", pytrace=False)
    return url


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A prefix unique to this test; every key under it is deleted afterwards (and nothing else)."""
    prefix = f"kvptest:{uuid.uuid4().hex}:"
    yield prefix
    with redis.Redis.from_url(redis_url, socket_timeout=5) as client:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        for i in range(0, len(keys), 500):
            client.unlink(*keys[i : i + 500])


@pytest.fixture
def redis_server_factory(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """``factory(*extra_args)`` starts a private redis-server, e.g.
    ``factory("--maxmemory", "1mb", "--maxmemory-policy", "noeviction")``; all are killed after."""
    servers: list[RedisServer] = []

    def factory(*extra_args: str) -> RedisServer:
        server = RedisServer(tmp_path / f"redis-{len(servers)}", *extra_args)
        servers.append(server)
        return server.start()

    yield factory
    for server in servers:
        server.resume()
        server.kill()


@pytest.fixture
def private_redis(redis_server_factory: Callable[..., RedisServer]) -> RedisServer:
    """A private redis-server this test may stop, kill, pause or fill."""
    return redis_server_factory()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterNodes]:
    """A three-node Redis Cluster on loopback (shared by the session; use unique prefixes)."""
    root = tmp_path_factory.mktemp("redis-cluster")
    servers = []
    for i in range(3):
        node_dir = root / f"node{i}"
        cluster_args = ["--cluster-enabled", "yes", "--cluster-config-file", str(node_dir / "nodes.conf")]
        servers.append(
            RedisServer(node_dir, *cluster_args, "--cluster-node-timeout", "2000", port=free_cluster_port())
        )
    nodes = RedisClusterNodes(servers).start()
    yield nodes
    nodes.stop()
