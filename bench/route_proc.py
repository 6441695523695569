"""Router processes for the router bench, every arm alike in its own process on loopback.

- ``cache``: ``kvproxy route`` itself (``python -m proxy.cli route``: the cache-aware picker, its
  event feed and the shared-tier lookups when given a Redis URL);
- ``round_robin`` / ``least_loaded``: the same router app (``proxy.route.app.create_route_app``)
  with the plain pickers of ``proxy.route.picking``, which ``kvproxy route`` has no flag for:
  ``python -m bench.route_proc --picker round_robin --replica URL ... --port N``.

Each has the same health probe interval (1 s) and runs under uvicorn with access logs off.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.server_proc import free_port

START_TIMEOUT_S = 120.0
PICKERS = ("round_robin", "least_loaded", "cache")


class Router:
    """One router process in front of ``replicas`` (launched, then waited for)."""

    def __init__(
        self,
        name: str,
        picker: str,
        replicas: Sequence[str],
        *,
        log_path: Path,
        redis_url: str | None = None,
        redis_prefix: str | None = None,
        extra: Sequence[str] = (),
    ) -> None:
        """``extra``: more ``kvproxy route`` options (the cache picker's weights)."""
        if picker not in PICKERS:
            raise ValueError(f"picker must be one of {PICKERS}")
        self.name = name
        self.picker = picker
        self.replicas = list(replicas)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        replica_args = [a for url in self.replicas for a in ("--replica", url)]
        if picker == "cache":
            args = [
                "-m",
                "proxy.cli",
                "route",
                *replica_args,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ]
            if redis_url:
                args += ["--redis-url", redis_url, "--redis-prefix", redis_prefix or "kvp:v1:"]
                args += ["--store-timeout-ms", "2000"]
            args += list(extra)
        else:
            args = ["-m", "bench.route_proc", "--picker", picker, *replica_args, "--port", str(self.port)]
        self.argv = [sys.executable, *args]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("KVPROXY_")}
        self.env["TOKENIZERS_PARALLELISM"] = "false"
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s = 0.0

    def launch(self) -> Router:
        self._launched = time.perf_counter()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        return self

    def wait_ready(self) -> Router:
        """Until ``/health`` says every replica is healthy."""
        if self.proc is None:
            self.launch()
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: router exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                health = httpx.get(self.url + "/health", timeout=2.0)
                if health.status_code == 200 and health.json().get("status") == "ok":
                    self.startup_s = time.perf_counter() - self._launched
                    return self
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name}: not ready after {START_TIMEOUT_S:.0f}s:\n{self.log_tail()}")

    def decisions(self) -> dict[str, dict[str, float]]:
        """``kvproxy_route_decisions_total`` as {replica: {reason: count}} (and the other
        per-replica counters under their own names)."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        out: dict[str, dict[str, float]] = {}
        wanted = {
            "kvproxy_route_decisions_total": None,
            "kvproxy_route_expected_cached_tokens_total": "expected_cached_tokens",
            "kvproxy_route_cached_tokens_total": "cached_tokens",
            "kvproxy_route_retries_total": "retries",
        }
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name not in wanted:
                    continue
                replica = sample.labels.get("replica", "")
                key = wanted[sample.name] or sample.labels.get("reason", "")
                row = out.setdefault(replica, {})
                row[key] = row.get(key, 0.0) + sample.value
        return out

    def stop(self, timeout_s: float = 20.0) -> None:
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


def main(argv: list[str] | None = None) -> None:
    """A baseline router (round-robin or least-loaded picker) on ``--port``."""
    import uvicorn

    from proxy.route.app import create_route_app
    from proxy.route.picking import LeastLoadedPicker, RoundRobinPicker
    from proxy.route.replicas import Replicas

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--picker", choices=("round_robin", "least_loaded"), required=True)
    parser.add_argument("--replica", action="append", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    picker = RoundRobinPicker() if args.picker == "round_robin" else LeastLoadedPicker()
    app = create_route_app(Replicas(args.replica, health_interval_s=1.0), picker)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
