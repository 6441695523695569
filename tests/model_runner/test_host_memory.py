"""Host memory settings of a serving process: freed memory is kept, a reservation is reused
without page faults, and the loaded objects leave the garbage collector's reach.

Each case runs in a fresh interpreter: allocator settings are process-wide, and the pytest
process must keep its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from model_runner import host_memory

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20

# Touches 64 MiB of fresh buffers the way a request does (a few MB at a time, kept alive, so each
# one needs pages of its own) and reports the minor page faults that cost.
PROBE = """
import json, resource, sys, threading
from model_runner import host_memory
mode = sys.argv[1]
tuning = None
if mode != "plain":
    tuning = host_memory.tune_allocator(96 << 20)
if mode == "reserved":
    # Settle on another thread, as the server's loader does; the buffers below are made on this one.
    worker = threading.Thread(target=host_memory.settle, args=(tuning.reserve_bytes,))
    worker.start(); worker.join()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
before = faults()
kept = []
for _ in range(16):
    buf = bytearray(4 << 20)  # zero-filled: every page is written
    kept.append(buf)
print(json.dumps({"faults": faults() - before, "applied": bool(tuning and tuning.applied)}))
"""


def _python(code: str, *args: str) -> str:
    """The last line ``code`` prints, run by a fresh interpreter from the repository root."""
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout.strip().splitlines()[-1]


def _probe(mode: str) -> dict[str, int]:
    return json.loads(_python(PROBE, mode))


def test_a_reservation_is_reused_without_page_faults() -> None:
    plain = _probe("plain")
    reserved = _probe("reserved")
    pages = 64 * MiB // 4096
    # Fresh memory faults once per page; memory reserved (even by another thread) does not.
    assert plain["faults"] >= pages * 0.9, plain
    assert reserved["applied"], "malloc tuning needs glibc (the CI machine is Debian)"
    assert reserved["faults"] < pages * 0.1, reserved


def test_tuning_reports_what_it_keeps() -> None:
    line = _python(
        "from model_runner import host_memory as h; t = h.tune_allocator(64 << 20); "
        "print(t.applied, t.retain_bytes, t.reserve_bytes)"
    )
    applied, retain, reserve = line.split()
    assert applied == "True"
    assert int(retain) == 64 * MiB + host_memory.RETAIN_HEADROOM
    assert int(reserve) == 64 * MiB


def test_reservation_is_bounded_by_available_memory() -> None:
    assert host_memory.reservation_bytes(0) == 0
    assert host_memory.reservation_bytes(64 * MiB) == 64 * MiB
    available = host_memory.available_bytes()
    assert available is not None and available > 64 * MiB
    # Half of what this process may still use, at most (memory may move between the two reads).
    assert abs(host_memory.reservation_bytes(1 << 60) - available // 2) < 256 * MiB


@pytest.mark.parametrize(
    ("limit", "usage", "headroom"),
    [("2147483648", "1073741824", 1 << 30), ("max", "5", None), (str(1 << 63), "5", None), ("100", "500", 0)],
)
def test_a_container_limit_bounds_the_reservation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: str, usage: str, headroom: int | None
) -> None:
    """Inside a container /proc/meminfo shows the host: the cgroup's limit minus its usage wins."""
    (tmp_path / "memory.max").write_text(limit + "\n")
    (tmp_path / "memory.current").write_text(usage + "\n")
    monkeypatch.setattr(
        host_memory, "_CGROUP_FILES", ((str(tmp_path / "memory.max"), str(tmp_path / "memory.current")),)
    )
    assert host_memory._cgroup_headroom() == headroom
    if headroom is not None:
        assert host_memory.reservation_bytes(1 << 40) == headroom // 2


def test_loaded_objects_are_frozen_out_of_the_collector() -> None:
    line = _python(
        "import gc; from model_runner import host_memory as h; "
        "before = gc.get_freeze_count(); h.freeze_loaded_objects(); print(before, gc.get_freeze_count())"
    )
    before, after = map(int, line.split())
    assert before == 0 and after > 1000
