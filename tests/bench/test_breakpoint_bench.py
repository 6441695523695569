"""The breakpoint bench's quick run: the positions found through offsets are never past the exact
ones and at most the margin short of them (the bench raises otherwise); timings are not checked."""

from __future__ import annotations

from bench.breakpoint_bench import report, run
from proxy.anthropic.plan import BOUNDARY_MARGIN


def test_quick_run_places_every_breakpoint_within_the_margin() -> None:
    rows = run([3], repeat=1)
    [row] = rows
    assert row["breakpoints"] == 4
    assert all(0 <= d <= BOUNDARY_MARGIN for d in row["exact_minus_offsets"])
    assert row["exact_minus_offsets"][-1] == 0  # the last block: nothing after it renders differently
    assert "| 4 |" in report(rows)
