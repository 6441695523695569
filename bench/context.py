"""What every section of the server bench shares: the model, its tokenizer, the in-process arms,
and the servers it starts (each with its own disk directory or Redis prefix, cleaned up after)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path

import redis

from bench.arms import Baseline, Recipe, Tokens
from bench.server_proc import Server
from model_runner.loading import LoadedModel


@dataclass
class BenchContext:
    loaded: LoadedModel
    tokens: Tokens
    model_dir: Path
    workdir: Path
    redis_url: str | None
    block: int
    store_timeout_ms: int
    quick: bool
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    servers: list[Server] = field(default_factory=list)
    baseline: Baseline = field(init=False)
    recipe: Recipe = field(init=False)

    def __post_init__(self) -> None:
        self.baseline = Baseline(self.loaded)
        self.recipe = Recipe(self.loaded)

    def redis_prefix(self, name: str) -> str:
        """A prefix owned by this run (deleted at the end, never anyone else's keys)."""
        return f"kvpbench:{self.run_id}:{name}:"

    def disk_dir(self, name: str) -> Path:
        return self.workdir / "disk" / name

    def server(
        self,
        name: str,
        *,
        disk: str | None = None,
        redis_name: str | None = None,
        block: int | None = None,
        memory_bytes: int | None = None,
    ) -> Server:
        """A server (launched, not yet waited for) with memory plus the named disk dir and/or
        Redis prefix; the same names on a later server mean the same stores (a restart)."""
        args = [
            "--model",
            str(self.model_dir),
            "--block-size",
            str(block or self.block),
            "--store-timeout-ms",
            str(self.store_timeout_ms),
        ]
        args += ["--disk-dir", str(self.disk_dir(disk))] if disk else ["--no-disk"]
        if redis_name:
            if self.redis_url is None:
                raise RuntimeError("no Redis at REDIS_URL")
            args += ["--redis-url", self.redis_url, "--redis-prefix", self.redis_prefix(redis_name)]
        if memory_bytes is not None:
            args += ["--memory-bytes", str(memory_bytes)]
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        server = Server(
            name, args, log_path=logs / f"{name}-{len(self.servers)}.log", cache_dir=self.workdir / "cache"
        )
        self.servers.append(server)
        return server.launch()

    def start(self, **servers: Server) -> dict[str, Server]:
        """Wait until every given (launched) server answers."""
        for server in servers.values():
            server.wait_ready()
        return servers

    def close(self) -> None:
        for server in self.servers:
            server.stop()
        if self.redis_url is not None:
            with redis.Redis.from_url(self.redis_url, socket_timeout=10) as client:
                keys = list(client.scan_iter(match=f"kvpbench:{self.run_id}:*", count=1000))
                for i in range(0, len(keys), 500):
                    client.unlink(*keys[i : i + 500])
