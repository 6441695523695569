"""A circuit breaker, so a down or slow remote store costs one timeout, not one per request.

closed --(``failure_threshold`` consecutive failures)--> open --(``cooldown_s``)--> half_open
half_open lets exactly one trial call through: success closes the breaker, failure reopens it
for another cooldown.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Literal

BreakerState = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """Thread-safe three-state breaker driven by the caller's ``record_success``/``record_failure``."""

    def __init__(
        self,
        failure_threshold: int = 3,
        cooldown_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be at least 1, got {failure_threshold}")
        if cooldown_s < 0:
            raise ValueError(f"cooldown_s must not be negative, got {cooldown_s}")
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._lock = threading.Lock()
        self._state: BreakerState = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._trial_started: float | None = None
        self.opened_count = 0
        """How many times the breaker has tripped open (for logs and tests)."""

    @property
    def state(self) -> BreakerState:
        """The current state; an open breaker whose cooldown has passed reads as ``half_open``."""
        with self._lock:
            if self._state == "open" and self._clock() - self._opened_at >= self.cooldown_s:
                return "half_open"
            return self._state

    def allow(self) -> bool:
        """Whether a call may go out now. In half_open only one trial is let through at a time."""
        with self._lock:
            if self._state == "closed":
                return True
            now = self._clock()
            if self._state == "open":
                if now - self._opened_at < self.cooldown_s:
                    return False
                self._state = "half_open"
                self._trial_started = now
                return True
            # half_open: a trial is in flight. If its caller never reported back (a bug, a
            # killed thread), let another trial through after a cooldown rather than stay stuck.
            if self._trial_started is not None and now - self._trial_started < self.cooldown_s:
                return False
            self._trial_started = now
            return True

    def record_success(self) -> None:
        with self._lock:
            self._state = "closed"
            self._failures = 0
            self._trial_started = None

    def record_failure(self) -> None:
        with self._lock:
            self._failures += 1
            if self._state == "half_open" or (
                self._state == "closed" and self._failures >= self.failure_threshold
            ):
                self._state = "open"
                self._opened_at = self._clock()
                self._trial_started = None
                self.opened_count += 1
            elif self._state == "open":
                # A call that was already in flight when the breaker opened: restart the cooldown
                # so the store gets its full quiet period.
                self._opened_at = self._clock()

    def __repr__(self) -> str:
        return f"CircuitBreaker(state={self.state!r}, failures={self._failures})"
