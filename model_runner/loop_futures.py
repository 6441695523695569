"""Futures the step loop completes (work run between steps) or abandons (a dropped request's lookup)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from cache_store.prefix_cache import PrefixHit


def run_call(work: Callable[[], Any], future: Future[Any]) -> None:
    """Run ``work`` into ``future`` (its result or its exception), unless the future was cancelled."""
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(work())
    except Exception as exc:
        future.set_exception(exc)


def release_result(future: Future[PrefixHit | None]) -> None:
    """A done-callback for a lookup nobody waits for any more: release the hit's pins, if any."""
    try:
        hit = future.result()
    except Exception:
        return
    if hit is not None:
        hit.release()
