"""The one interface every block store implements: bytes in, bytes out, keyed by block hash.

Stores know nothing of tensors (serialization lives in ``codec``). A store fault never escapes as
an exception from ``get_many``/``put_many``/``contains``/``delete``: it is counted in
``stats().errors`` and turns into a miss (``None``), a ``False`` or a zero count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

Buffer = bytes | bytearray | memoryview


@dataclass
class StoreStats:
    """A snapshot of one store's figures (cumulative counters since start)."""

    name: str
    blocks: int = 0
    bytes: int = 0
    capacity_bytes: int | None = None
    hits: int = 0
    misses: int = 0
    puts: int = 0
    evictions: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    """Failed operations by op name (``get``, ``put``, ``delete``, ...)."""
    healthy: bool = True
    breaker: str | None = None
    """``closed``/``open``/``half_open`` for stores behind a circuit breaker, else ``None``."""


@runtime_checkable
class BlockStore(Protocol):
    """Bytes keyed by 16-byte block hash."""

    name: str

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | bytearray | None]:
        """Values in key order; ``None`` for a miss or for any fault (never raises for store faults)."""
        ...

    def put_many(self, items: Sequence[tuple[bytes, Buffer]]) -> int:
        """Store every item (one atomic value per key); returns how many were stored."""
        ...

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        """Presence in key order; ``False`` on a fault."""
        ...

    def delete(self, keys: Sequence[bytes]) -> int:
        """Remove keys; returns how many existed."""
        ...

    def clear(self) -> int:
        """Remove everything this store owns (for Redis: only keys under its prefix)."""
        ...

    def stats(self) -> StoreStats: ...

    def close(self) -> None: ...
