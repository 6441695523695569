"""The multi-user section of the batching bench: N users at once, over HTTP, per server arm.

Every user runs ``rounds`` streamed chat completions one after another (greedy, ``max_tokens``
new tokens each, never stopping early: the bench model's EOS never wins); all users start
together. Arms, every one a server process on loopback with the same torch thread count:

- ``kvproxy``: ``kvproxy serve`` with its batching defaults;
- ``kvproxy max-batch 1``: the same server one request at a time (``--max-batch 1``);
- ``transformers serve``: ``transformers serve MODEL_DIR --continuous-batching`` (paged
  attention continuous batching), run by the peer venv's Python (see ``batching_bench``).

TTFT is taken on the client: request sent -> first chunk with content. Output throughput is all
completion tokens (from each stream's final ``usage``) over first request sent -> last stream
done. A stream's decode speed is (completion tokens - 1) / (first content -> last content).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx

from bench.batching_workload import UsersParams, UsersScript, percentile, throughput, users_script
from bench.server_proc import START_TIMEOUT_S, Server, free_port

PEER_START_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class ChatSample:
    user: int
    round: int
    sent: float
    """``perf_counter`` when the request was sent."""
    ttft_s: float
    total_s: float
    decode_s: float
    """First -> last content chunk."""
    completion_tokens: int
    prompt_tokens: int
    cached_tokens: int | None = None
    server_ttft_s: float | None = None
    queue_s: float | None = None


def stream_chat(
    client: httpx.Client,
    model: str,
    messages: Sequence[tuple[str, str]],
    max_tokens: int,
    user: int = 0,
    round_: int = 0,
) -> ChatSample:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": r, "content": c} for r, c in messages],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    first: float | None = None
    last: float | None = None
    usage: dict[str, Any] | None = None
    start = time.perf_counter()
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.read()[:300]!r}")
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(f"in-stream error {event['error']}")
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    last = time.perf_counter()
                    if first is None:
                        first = last
    end = time.perf_counter()
    if usage is None or first is None or last is None:
        raise RuntimeError("the stream ended without content or usage")
    extra = usage.get("kvproxy") or {}
    details = usage.get("prompt_tokens_details") or {}

    def seconds(key: str) -> float | None:
        value = extra.get(key)
        return float(value) / 1e3 if value is not None else None

    return ChatSample(
        user=user,
        round=round_,
        sent=start,
        ttft_s=first - start,
        total_s=end - start,
        decode_s=last - first,
        completion_tokens=int(usage["completion_tokens"]),
        prompt_tokens=int(usage["prompt_tokens"]),
        cached_tokens=details.get("cached_tokens"),
        server_ttft_s=seconds("ttft_ms"),
        queue_s=seconds("queue_ms"),
    )


# -- servers -------------------------------------------------------------------------------------


class Arm(Protocol):
    name: str
    url: str
    model: str

    def launch(self) -> Arm: ...

    def wait_ready(self) -> Arm: ...

    def stop(self, timeout_s: float = 60.0) -> None: ...

    def log_tail(self, lines: int = 30) -> str: ...


class PeerServer:
    """``transformers serve MODEL_DIR --continuous-batching`` under another Python (its own venv)."""

    def __init__(
        self,
        name: str,
        python: Path,
        model_dir: Path,
        *,
        device: str,
        dtype: str,
        threads: int,
        log_path: Path,
    ) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = str(model_dir)
        self.args = [
            str(python),
            "-m",
            "transformers.cli.transformers",
            "serve",
            str(model_dir),
            "--continuous-batching",
            "--device",
            device,
            "--dtype",
            dtype,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KVPROXY_", "PYTHON"))}
        # No network: no update check, no hub lookups (the model is a local directory).
        env.update(HF_HUB_DISABLE_UPDATE_CHECK="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s = 0.0

    def launch(self) -> PeerServer:
        self._launched = time.perf_counter()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        return self

    def wait_ready(self) -> PeerServer:
        if self.proc is None:
            self.launch()
        assert self.proc is not None
        deadline = time.monotonic() + PEER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    self.startup_s = time.perf_counter() - self._launched
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"{self.name}: not healthy after {PEER_START_TIMEOUT_S:.0f}s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 60.0) -> None:
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


def peer_problem(python: Path) -> str | None:
    """Why the peer arm cannot run with ``python`` (``None``: it can)."""
    if not python.exists():
        return f"no peer Python at {python}"
    check = "import fastapi, uvicorn, openai, transformers.cli.serving"
    try:
        done = subprocess.run([str(python), "-c", check], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{python} does not run: {exc}"
    if done.returncode != 0:
        return f"{python} lacks transformers[serving]: {done.stderr.strip().splitlines()[-1:]}"
    return None


def kvproxy_server(
    name: str, model_dir: Path, workdir: Path, extra: Sequence[str], device: str, dtype: str
) -> Server:
    args = ["--model", str(model_dir), "--no-disk", "--device", device, "--dtype", dtype, *extra]
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    return Server(name, args, log_path=logs / f"{name.replace(' ', '-')}.log", cache_dir=workdir / "cache")


def batch_figures(arm: Arm) -> dict[str, Any] | None:
    """kvproxy's ``/v1/cache/stats`` batch figures (steps, batched steps, ...); ``None`` elsewhere."""
    if not isinstance(arm, Server):
        return None
    try:
        return dict(httpx.get(arm.url + "/v1/cache/stats", timeout=10).json().get("batch") or {})
    except (httpx.HTTPError, ValueError):
        return None


# -- the workload --------------------------------------------------------------------------------


def run_users(arm: Arm, script: UsersScript, users: int, rounds: int, max_tokens: int) -> dict[str, Any]:
    """All ``users`` at once, ``rounds`` each; the samples and the workload's figures."""
    samples: list[ChatSample] = []
    errors: list[BaseException] = []
    ends: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(users)

    def user(u: int) -> None:
        try:
            with httpx.Client(base_url=arm.url, timeout=START_TIMEOUT_S * 4) as client:
                barrier.wait()
                for r in range(rounds):
                    s = stream_chat(client, arm.model, script.messages(u, r), max_tokens, u, r)
                    with lock:
                        samples.append(s)
                        ends.append(s.sent + s.total_s)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    before = batch_figures(arm)
    threads = [threading.Thread(target=user, args=(u,), daemon=True) for u in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{arm.name}: {errors[0]!r}\n{arm.log_tail()}")
    after = batch_figures(arm)
    return summarize(samples, ends, before, after)


def summarize(
    samples: Sequence[ChatSample],
    ends: Sequence[float],
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
) -> dict[str, Any]:
    tokens = sum(s.completion_tokens for s in samples)
    ttft = [s.ttft_s for s in samples]
    decode = [
        (s.completion_tokens - 1) / s.decode_s for s in samples if s.decode_s > 0 and s.completion_tokens > 1
    ]
    queue = [s.queue_s for s in samples if s.queue_s is not None]
    out: dict[str, Any] = {
        "requests": len(samples),
        "completion_tokens": tokens,
        "prompt_tokens_mean": sum(s.prompt_tokens for s in samples) / len(samples),
        "throughput": throughput(tokens, [s.sent for s in samples], ends),
        "wall_s": max(ends) - min(s.sent for s in samples),
        "ttft_p50": percentile(ttft, 50),
        "ttft_p95": percentile(ttft, 95),
        "decode_p50": percentile(decode, 50),
        "queue_p50": percentile(queue, 50) if queue else None,
        "cached_share": (
            sum(s.cached_tokens or 0 for s in samples) / sum(s.prompt_tokens for s in samples)
            if all(s.cached_tokens is not None for s in samples)
            else None
        ),
        "samples": [asdict(s) for s in samples],
    }
    if before is not None and after is not None and after.get("steps") is not None:
        steps = after["steps"] - before.get("steps", 0)
        out["steps"] = steps
        out["batched_share"] = (
            (after["batched_steps"] - before.get("batched_steps", 0)) / steps if steps else 0.0
        )
        out["max_step_requests"] = after.get("max_step_requests")
        generated = after.get("generated_tokens", 0) - before.get("generated_tokens", 0)
        out["requests_per_step"] = generated / steps if steps else 0.0
    return out


@dataclass(frozen=True)
class UsersPlan:
    users: tuple[int, ...]
    rounds: int
    max_tokens: int
    reps: int
    single_sessions: int
    """N=1 runs this many single-user sessions back to back (more samples of TTFT and decode)."""


def run_users_section(
    arms: Sequence[Arm], plan: UsersPlan, log: Callable[[str], None] = print, seed: int = 31
) -> dict[str, Any]:
    """Every user count, every arm (rotated per count and repetition), ``plan.reps`` times."""
    # Warm every arm: the shared system prompt computed once (cached where the arm caches), the
    # peer's continuous batching manager initialized (its first request builds it).
    warm = users_script(UsersParams(users=2, rounds=1, seed=seed), variant=10_000)
    for arm in arms:
        started = time.perf_counter()
        run_users(arm, warm, 1, 1, 8)
        run_users(arm, warm, 2, 1, 8)
        log(f"  warmed {arm.name} in {time.perf_counter() - started:.1f}s")
    results: dict[str, dict[str, list[dict[str, Any]]]] = {
        str(n): {arm.name: [] for arm in arms} for n in plan.users
    }
    for rep in range(plan.reps):
        for i, n in enumerate(plan.users):
            k = (rep + i) % len(arms)
            order = list(arms[k:]) + list(arms[:k])
            script = users_script(UsersParams(users=n, rounds=plan.rounds, seed=seed), variant=rep)
            for arm in order:
                if n == 1:
                    parts = [
                        run_users(
                            arm,
                            users_script(
                                UsersParams(users=1, rounds=plan.rounds, seed=seed), variant=rep * 100 + j
                            ),
                            1,
                            plan.rounds,
                            plan.max_tokens,
                        )
                        for j in range(plan.single_sessions)
                    ]
                    row = merge_sessions(parts)
                else:
                    row = run_users(arm, script, n, plan.rounds, plan.max_tokens)
                results[str(n)][arm.name].append(row)
                log(
                    f"  rep {rep} N={n} {arm.name}: {row['throughput']:.0f} tok/s, TTFT p50 "
                    f"{row['ttft_p50'] * 1e3:.0f} p95 {row['ttft_p95'] * 1e3:.0f} ms, "
                    f"decode {row['decode_p50']:.1f} tok/s/stream"
                )
    return {"by_users": results}


def merge_sessions(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One row of several sequential single-user sessions: their samples pooled, throughput the
    median of the sessions'."""
    samples = [ChatSample(**s) for p in parts for s in p["samples"]]
    ends = [s.sent + s.total_s for s in samples]
    row = summarize(samples, ends)
    row["throughput"] = sorted(p["throughput"] for p in parts)[len(parts) // 2]
    return row
