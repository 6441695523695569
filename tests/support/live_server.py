"""A live ``kvproxy serve`` subprocess on a free loopback port, for end-to-end and fault tests:
its log in a file, a start that waits for /health, graceful stop (SIGTERM) and SIGKILL, a
``preexec_fn`` (to run the server under resource limits) and the server's RSS from ``/proc``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from tests.support.redis_fixtures import free_port

START_TIMEOUT_S = 90.0


class LiveServer:
    """``kvproxy serve ARGS`` (or another ``command``, e.g. ``route``) with its log in ``log_path``;
    ``start()`` waits until /health is 200."""

    def __init__(
        self,
        args: list[str],
        *,
        log_path: Path,
        cache_dir: Path,
        env: dict[str, str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
        command: str = "serve",
    ) -> None:
        self.command = command
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = ["--host", "127.0.0.1", "--port", str(self.port), *args]
        self.log_path = log_path
        self.preexec_fn = preexec_fn
        # The caller's own KVPROXY_* settings must not leak into a test server.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("KVPROXY_")}
        self.env = {
            **inherited,
            "KVPROXY_CACHE_DIR": str(cache_dir),
            "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false",
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("the server was never started")
        return self.proc.pid

    def start(self) -> LiveServer:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "proxy.cli", self.command, *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                # Runs in the child before exec: how a test puts the server under resource limits.
                preexec_fn=self.preexec_fn,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kvproxy serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"kvproxy serve not healthy after {START_TIMEOUT_S:.0f}s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM (graceful: drains the store writer), then SIGKILL if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(
                f"kvproxy serve ignored SIGTERM for {timeout_s}s:\n{self.log_tail()}"
            ) from None

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, whatever was being written stays as it was."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def rss_bytes(self) -> int:
        """Resident set size of the server process now."""
        with open(f"/proc/{self.pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc status")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:]) or "<no log>"

    # -- HTTP shortcuts -------------------------------------------------------------------------

    def get_json(self, path: str, *, headers: dict[str, str] | None = None, timeout: float = 10) -> Any:
        resp = httpx.get(self.url + path, headers=headers, timeout=timeout)
        resp.raise_for_status()
        return resp.json()

    def wait_written(self, timeout_s: float = 15.0, headers: dict[str, str] | None = None) -> None:
        """Wait until the background writer has put every queued block into the lower tiers."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.get_json("/v1/cache/stats", headers=headers)["writer"]["queued"] == 0:
                return
            time.sleep(0.05)
        raise AssertionError(f"the store writer did not drain within {timeout_s}s")

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
