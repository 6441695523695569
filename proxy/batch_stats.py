"""What the batch is doing, for /v1/cache/stats and the dashboard: running and waiting
requests, the K/V budget, tokens per step and output tokens per second over the last seconds.

Fed by the engine's step observer (on the engine's thread), read by the stats route (on the
event loop): a lock between them.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

from model_runner.engine import Engine, StepObservation

WINDOW_S = 10.0


class BatchMonitor:
    def __init__(self, window_s: float = WINDOW_S) -> None:
        self._window_s = window_s
        self._lock = threading.Lock()
        self._steps: deque[tuple[float, StepObservation]] = deque()

    def observe(self, step: StepObservation) -> None:
        now = time.monotonic()
        with self._lock:
            self._steps.append((now, step))
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._steps and self._steps[0][0] < now - self._window_s:
            self._steps.popleft()

    def figures(self, engine: Engine) -> dict[str, Any]:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            steps = [s for _, s in self._steps]
            first = self._steps[0][0] if self._steps else now
        stats = engine.stats()
        sched = stats.scheduler
        span = max(now - first, 1e-9) if len(steps) > 1 else self._window_s
        n = len(steps)
        return {
            "batched": engine.batched,
            "batching_reason": engine.batching_reason,
            "max_batch": engine.config.max_batch,
            "max_batch_tokens": engine.config.max_batch_tokens,
            "running": sched.running,
            "waiting": sched.waiting,
            "waiting_for_kv": sched.waiting_for_kv,
            "waiting_on_blocks": sched.waiting_on_blocks,
            "kv_used_bytes": sched.kv_used_bytes,
            "kv_budget_bytes": sched.kv_budget_bytes,
            "steps": stats.steps,
            "batched_steps": stats.batched_steps,
            "max_step_requests": stats.max_step_requests,
            "prefilled_tokens": stats.prefilled_tokens,
            "generated_tokens": stats.generated_tokens,
            "recent": {
                "window_s": self._window_s,
                "steps": n,
                "tokens_per_step": sum(s.tokens for s in steps) / n if n else 0.0,
                "requests_per_step": sum(s.requests for s in steps) / n if n else 0.0,
                "output_tokens_per_s": sum(s.sampled for s in steps) / span if n else 0.0,
                "step_ms": 1000 * sum(s.seconds for s in steps) / n if n else 0.0,
            },
        }
