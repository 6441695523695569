"""The one typed container of everything the routes need, built in the app lifespan.

The model loads in a background thread so the server answers /health (503, "loading") during a
slow load; routes that need the model get a 503 + Retry-After until it is ready.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from model_runner import host_memory
from model_runner.engine import StepObservation
from model_runner.loading import LoadError
from proxy.auth import KeyTable
from proxy.batch_stats import BatchMonitor
from proxy.errors import ServiceUnavailable
from proxy.generation import GenerationService
from proxy.metrics import Metrics
from proxy.request_log import RequestLog
from proxy.runtime import Runtime, build_runtime
from proxy.settings import ServeSettings

log = logging.getLogger("kvproxy")

LoadState = Literal["loading", "ready", "failed"]


@dataclass
class Services:
    settings: ServeSettings
    metrics: Metrics
    keys: KeyTable | None
    batch: BatchMonitor = field(default_factory=BatchMonitor)
    requests: RequestLog = field(default_factory=RequestLog)
    started_at: float = field(default_factory=time.time)
    state: LoadState = "loading"
    load_error: str | None = None
    runtime: Runtime | None = None
    generation: GenerationService | None = None
    on_load_failed: Callable[[], None] | None = None
    """Called (from the loader thread) when the model cannot be loaded; the CLI stops the server."""
    host_reserve_bytes: int | None = None
    """Set by ``kvproxy serve``, which owns its process: once the model is loaded, freeze the
    loaded objects out of the GC's way and fault in this much heap (``model_runner.host_memory``).
    ``None`` (an app built inside another process, e.g. a test) leaves the process alone."""
    clock: Callable[[], float] = time.monotonic
    """Times the pins' TTLs (an in-process test gives its own to expire them without sleeping)."""
    _loader: threading.Thread | None = None

    @classmethod
    def create(cls, settings: ServeSettings, *, keys: KeyTable | None = None) -> Services:
        if keys is None and settings.api_keys is not None:
            keys = KeyTable.from_file(settings.api_keys)
        return cls(settings=settings, metrics=Metrics(), keys=keys)

    def start(self) -> None:
        self._loader = threading.Thread(target=self._load, name="kvproxy-load", daemon=True)
        self._loader.start()

    def _load(self) -> None:
        try:
            runtime = build_runtime(
                self.settings,
                self.metrics,
                observer=self._observe_step,
                clock=self.clock,
                publish_events=True,
            )
        except Exception as exc:
            # A LoadError's message says it all; anything else is a bug worth its traceback.
            log.error(
                "cannot serve %s: %s", self.settings.model_name, exc, exc_info=not isinstance(exc, LoadError)
            )
            self.load_error = f"{exc.__class__.__name__}: {exc}"
            self.state = "failed"
            if self.on_load_failed is not None:
                self.on_load_failed()
            return
        self.generation = GenerationService(
            runtime.engine,
            self.batch,
            self.metrics,
            self.requests,
            max_context=runtime.max_context,
            default_max_tokens=self.settings.default_max_tokens,
            block_size=self.settings.block_size,
            history_warming=not self.settings.no_history_warming,
            keep_billing_header=self.settings.keep_billing_header,
        )
        self.metrics.watch_tiers(runtime.tier_figures)
        self.metrics.watch_pins(runtime.pinned_bytes)
        self.metrics.watch_engine(lambda: _running_waiting(runtime))
        runtime.engine.start()
        if self.host_reserve_bytes is not None:
            reserved = host_memory.settle(self.host_reserve_bytes)
            log.debug("reserved %d MiB of heap for the memory tier", reserved >> 20)
        # Publish last: a reader that sees "ready" finds everything in place.
        self.runtime = runtime
        self.state = "ready"
        log.info(self.settings.summary(device=runtime.device, dtype=runtime.dtype))

    def _observe_step(self, step: StepObservation) -> None:
        self.metrics.observe_step(step.tokens, step.seconds)
        self.batch.observe(step)

    def wait_loaded(self, timeout_s: float | None = None) -> bool:
        if self._loader is not None:
            self._loader.join(timeout_s)
        return self.state == "ready"

    def ready(self) -> tuple[Runtime, GenerationService]:
        runtime, generation = self.runtime, self.generation
        if self.state == "failed":
            raise ServiceUnavailable(
                "The model failed to load; see the server log.", code="model_failed", retry_after_s=30
            )
        if runtime is None or generation is None:
            raise ServiceUnavailable("The model is still loading.", code="model_loading", retry_after_s=2)
        return runtime, generation

    def sweep_pins(self) -> int:
        """Drop the pins whose TTL has passed (the server calls this periodically; every pin
        call checks expiry too)."""
        runtime = self.runtime
        if runtime is None or runtime.cache is None or runtime.cache.pins is None:
            return 0
        return runtime.cache.pins.sweep()

    def close(self, *, grace_s: float = 10.0, drain_s: float = 10.0) -> None:
        """SIGTERM path: stop taking work, let running requests finish (bounded), drain the
        background writer (bounded), close the stores."""
        if self._loader is not None and self._loader.is_alive():
            self._loader.join(timeout=1.0)
        if self.runtime is not None and not self.runtime.close(grace_s=grace_s, drain_s=drain_s):
            log.warning("the engine did not stop within %.0fs", grace_s)


def _running_waiting(runtime: Runtime) -> tuple[int, int]:
    stats = runtime.engine.stats().scheduler
    return stats.running, stats.waiting
