"""What a local tier tells a listener about the blocks it gains and loses.

A cache-aware router (``kvproxy route``) sends a prompt to the replica whose memory or disk holds
its blocks; it learns what each replica holds from these notifications (published by
``cache_store.events.BlockEvents``). This module is the store side only, with no Redis in it, so
the memory and disk tiers stay free of network code.

A store notes each change while it holds its own lock and hands them to the listener before it
lets go, in the order they happened: the listener's sequence numbers then follow the store's
real order, and a listing taken under the same lock agrees with every change numbered before it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Literal

log = logging.getLogger(__name__)

BlockOp = Literal["stored", "evicted", "deleted", "cleared"]
"""``stored``: the tier now holds the blocks; ``evicted``: dropped to make room; ``deleted``: removed
on request (or found corrupt); ``cleared``: the tier was emptied (no hashes)."""

BlockListener = Callable[[str, str, Sequence[bytes]], None]
"""``listener(op, tier, block_hashes)``. Called with the store's lock held: it must be cheap, must
not block and must not call back into the store."""


class ChangeLog:
    """The changes one store makes under one hold of its lock, kept as runs of one op so a batch
    of puts becomes one notification. Use only with the store's lock held."""

    __slots__ = ("_listener", "_runs", "tier")

    def __init__(self, tier: str, listener: BlockListener | None) -> None:
        self.tier = tier
        self._listener = listener
        self._runs: list[tuple[str, list[bytes]]] = []

    def note(self, op: BlockOp, key: bytes) -> None:
        """Remember that ``key`` was ``op``-ed (nothing is kept without a listener)."""
        if self._listener is None:
            return
        if self._runs and self._runs[-1][0] == op:
            self._runs[-1][1].append(key)
        else:
            self._runs.append((op, [key]))

    def emit(self) -> None:
        """Hand the noted runs to the listener, oldest first, and forget them."""
        if not self._runs:
            return
        runs, self._runs = self._runs, []
        for op, keys in runs:
            self._call(op, keys)

    def cleared(self) -> None:
        """The tier was emptied: whatever was noted before is moot, one ``cleared`` says it all."""
        self._runs = []
        if self._listener is not None:
            self._call("cleared", ())

    def _call(self, op: str, keys: Sequence[bytes]) -> None:
        try:
            self._listener(op, self.tier, keys)  # type: ignore[misc]
        except Exception:  # a listener bug must never fail a store call
            log.exception("block listener failed on %s %s", self.tier, op)
