"""Host memory of a serving process: freed memory stays for reuse, the budget is faulted in ahead
of need, and the garbage collector leaves the loaded model alone.

Why (measured on the bench model, 2048-token restores; docs/bench/server.md): every request
allocates and frees tens of MB of host memory (the restored K/V, the copies a forward makes,
records read from disk or Redis). glibc's malloc gives blocks above its mmap threshold their own
fresh mapping and returns freed memory to the kernel past its trim threshold, so the next request
first-touches the same amount again: one minor fault per 4 KiB page, 2-5 us each on a virtual
machine once TLB shoot-downs across the server's threads are counted. A restarted server that
promotes blocks from disk or Redis into memory faults in every byte it keeps on the request's
path. That doubled the CPU time of a 2048-token hit's forward. And a full collection of the
generation holding the model's and tokenizer's objects took 220-250 ms, landing inside whichever
request happened to trigger it.

So a serving process (``kvproxy serve``) calls ``tune_allocator`` before it loads anything and
``settle`` once the model is loaded. glibc only: elsewhere (musl, macOS) the allocator calls do
nothing and say so.
"""

from __future__ import annotations

import ctypes
import gc
import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

MiB = 1 << 20

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

MMAP_THRESHOLD = 32 * MiB
"""Blocks up to this come from the heap, where freed memory is reused (glibc's own cap)."""
RETAIN_HEADROOM = 256 * MiB
"""Freed memory kept on top of the reservation: the transient peak of a request."""
_CHUNK = 16 * MiB  # under the mmap threshold, so reserved chunks come from the heap


@dataclass(frozen=True)
class AllocatorTuning:
    applied: bool
    retain_bytes: int
    """Freed memory glibc keeps (0 when not applied)."""
    reserve_bytes: int
    """What ``settle`` should fault in: the reservation asked for, 0 when not applied (an
    allocator that hands memory back would waste it)."""
    reason: str = ""


def _libc() -> ctypes.CDLL | None:
    """The C library the process runs on (its symbols are the main program's), with the three
    calls used here typed; ``None`` without glibc's ``mallopt`` (musl, macOS)."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    libc.free.restype = None
    return libc


def tune_allocator(reserve_bytes: int) -> AllocatorTuning:
    """Make glibc keep freed memory for reuse: a fixed mmap threshold (blocks up to 32 MiB come
    from the heap), a trim threshold of ``reserve_bytes`` plus ``RETAIN_HEADROOM`` (memory is only
    handed back beyond that), and one arena, so memory one thread frees (a forward's buffers) is
    reused by another (a Redis reply parsed on a store thread) and a reservation serves them all.
    Call it before the process starts threads and allocates in earnest."""
    libc = _libc()
    if libc is None:
        return AllocatorTuning(False, 0, 0, "not glibc")
    reserve = max(int(reserve_bytes), 0)
    retain = reserve + RETAIN_HEADROOM
    retain = min(retain, 2**31 - 1)  # mallopt takes an int
    applied = all(
        libc.mallopt(param, value) == 1
        for param, value in (
            (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (_M_TRIM_THRESHOLD, retain),
            (_M_ARENA_MAX, 1),
        )
    )
    if not applied:
        return AllocatorTuning(False, 0, 0, "mallopt refused")
    return AllocatorTuning(True, retain, reserve)


def reservation_bytes(budget: int) -> int:
    """What to reserve for a memory tier of ``budget`` bytes: the budget, but never more than half
    of the memory available right now to this process (the machine's, or its container's when a
    cgroup limit is lower)."""
    available = available_bytes()
    return max(0, min(int(budget), available // 2 if available is not None else int(budget)))


def available_bytes() -> int | None:
    """``MemAvailable``, lowered to the cgroup's headroom (limit - usage) under a memory limit;
    ``None`` where neither can be read."""
    candidates = [v for v in (_meminfo_available(), _cgroup_headroom()) if v is not None]
    return min(candidates) if candidates else None


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


_CGROUP_FILES = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),  # v1
)
_NO_LIMIT = 1 << 60  # v1 reports "no limit" as a number near 2**63


def _cgroup_headroom() -> int | None:
    for limit_path, usage_path in _CGROUP_FILES:
        try:
            with open(limit_path, encoding="ascii") as f:
                raw = f.read().strip()
            if raw == "max":
                return None
            limit = int(raw)
            with open(usage_path, encoding="ascii") as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        return None if limit >= _NO_LIMIT else max(limit - usage, 0)
    return None


def reserve_heap(nbytes: int) -> int:
    """Fault in ``nbytes`` of heap and free it again: with ``tune_allocator`` in effect glibc keeps
    it, and later allocations reuse pages that are already mapped. Returns the bytes reserved."""
    libc = _libc()
    if libc is None or nbytes <= 0:
        return 0
    chunks: list[int] = []
    try:
        for _ in range(-(-nbytes // _CHUNK)):
            ptr = libc.malloc(_CHUNK)
            if not ptr:
                break
            chunks.append(ptr)
            ctypes.memset(ptr, 0, _CHUNK)  # the first write faults each page in
    finally:
        for ptr in chunks:
            libc.free(ptr)
    return len(chunks) * _CHUNK


def settle(reserve_bytes: int) -> int:
    """Once everything is loaded: freeze the loaded objects out of the collector, then fault in
    ``reserve_bytes`` of heap (``AllocatorTuning.reserve_bytes``). Returns the bytes reserved."""
    freeze_loaded_objects()
    return reserve_heap(reserve_bytes)


def freeze_loaded_objects() -> None:
    """Move every object alive now (the model, the tokenizer, the stores) out of the collector's
    reach: later collections only walk what requests create."""
    gc.collect()
    gc.freeze()
