"""``kvproxy serve`` subprocesses on loopback and a minimal streaming client for them.

The client is raw httpx (keep-alive, one connection per server) rather than the openai package, so
the client's own parsing costs as little as possible and the HTTP overhead row is the server's.
TTFT over HTTP is taken on the client: from sending the request to the first streamed chunk that
carries content or a finish reason (the chat route's first chunk, the bare ``role`` one, is sent
before any work and does not count). The server's own figure, ``usage.kvproxy.ttft_ms`` (lookup,
restore, suffix prefill, first sample; no HTTP, no tokenization), comes with every sample.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

START_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Sample:
    """One request as the client saw it."""

    ttft_s: float
    """Client: request sent -> first content chunk."""
    total_s: float
    """Client: request sent -> ``[DONE]``."""
    server_ttft_s: float
    prompt_tokens: int
    cached_tokens: int
    cached_by_tier: dict[str, int] = field(default_factory=dict)
    miss_reason: str | None = None
    text: str = ""
    phases_s: dict[str, float] = field(default_factory=dict)
    """Where the time to the first token went: the server's ``lookup``/``restore``/``prefill``
    (``usage.kvproxy``); for the recipe ``restore`` is its deepcopy and ``prefill`` its forward."""


class Server:
    """One ``kvproxy serve`` process (``args`` after ``serve``), its log in ``log_path``."""

    def __init__(self, name: str, args: list[str], *, log_path: Path, cache_dir: Path) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = ["--host", "127.0.0.1", "--port", str(self.port), *args]
        self.log_path = log_path
        # The caller's own KVPROXY_* settings must not change what is measured.
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVPROXY_")}
        self.env = {**env, "KVPROXY_CACHE_DIR": str(cache_dir), "TOKENIZERS_PARALLELISM": "false"}
        self.proc: subprocess.Popen[bytes] | None = None
        self._client: httpx.Client | None = None
        self.model = ""
        self.startup_s = 0.0

    def launch(self) -> Server:
        """Start the process without waiting (several servers load in parallel)."""
        self._launched = time.perf_counter()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "proxy.cli", "serve", *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        return self

    def wait_ready(self) -> Server:
        if self.proc is None:
            self.launch()
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name}: kvproxy serve exited {self.proc.returncode}:\n{self.log_tail()}"
                )
            try:
                health = httpx.get(self.url + "/health", timeout=2.0)
                if health.status_code == 200:
                    self.startup_s = time.perf_counter() - self._launched
                    self._client = httpx.Client(base_url=self.url, timeout=600.0)
                    self.model = self._client.get("/v1/models").json()["data"][0]["id"]
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name}: not healthy after {START_TIMEOUT_S:.0f}s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM: the server drains its background writer before it exits."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"

    @property
    def client(self) -> httpx.Client:
        if self._client is None:
            raise RuntimeError(f"{self.name} is not running")
        return self._client

    # -- requests --------------------------------------------------------------------------

    def complete(
        self,
        *,
        prompt: str | None = None,
        messages: list[dict[str, str]] | None = None,
        max_tokens: int = 1,
        cache_salt: str | None = None,
    ) -> Sample:
        """One streamed greedy request (chat when ``messages`` is given); timed on the client."""
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if cache_salt:
            body["cache_salt"] = cache_salt
        chat = messages is not None
        if chat:
            body["messages"] = messages
        else:
            body["prompt"] = prompt
        path = "/v1/chat/completions" if chat else "/v1/completions"
        parts: list[str] = []
        usage: dict[str, Any] | None = None
        first: float | None = None
        start = time.perf_counter()
        with self.client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"{self.name}: HTTP {response.status_code}: {response.read()[:300]!r}")
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    raise RuntimeError(f"{self.name}: in-stream error {event['error']}")
                usage = event.get("usage") or usage
                for choice in event.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if first is None and (text or choice.get("finish_reason")):
                        first = time.perf_counter()
                    parts.append(text or "")
        end = time.perf_counter()
        if usage is None or first is None:
            raise RuntimeError(f"{self.name}: stream ended without content or usage")
        extra = usage.get("kvproxy") or {}
        return Sample(
            ttft_s=first - start,
            total_s=end - start,
            server_ttft_s=float(extra.get("ttft_ms") or 0.0) / 1000.0,
            prompt_tokens=int(usage["prompt_tokens"]),
            cached_tokens=int(usage["prompt_tokens_details"]["cached_tokens"]),
            cached_by_tier=dict(extra.get("cached_by_tier") or {}),
            miss_reason=extra.get("miss_reason"),
            text="".join(parts),
            phases_s={
                phase: float(extra[f"{phase}_ms"]) / 1000.0
                for phase in ("lookup", "restore", "prefill")
                if extra.get(f"{phase}_ms") is not None
            },
        )

    def warmup(self, prompts: list[str], cache_salt: str | None = None) -> dict[str, Any]:
        """Prefill and store ``prompts``; answers once every tier holds them."""
        body: dict[str, Any] = {"items": [{"prompt": p} for p in prompts]}
        if cache_salt:
            body["cache_salt"] = cache_salt
        response = self.client.post("/v1/cache/warmup", json=body)
        response.raise_for_status()
        return dict(response.json())

    def quiesce(self) -> None:
        """Wait for the background writer: a warmup of a sub-block prompt stores nothing but
        drains the queue, so one arm's lower-tier writes never land inside another arm's timing."""
        self.warmup(["hi"])

    def stats(self) -> dict[str, Any]:
        return dict(self.client.get("/v1/cache/stats").json())
