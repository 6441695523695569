"""The disk tier under real faults: a server SIGKILLed while writing block files, a --disk-dir that
cannot exist (under a regular file), and a disk that fills up (the server runs under
RLIMIT_FSIZE, so block writes fail with EFBIG). Serving goes on with the right output; the
unusable tier is reported once and its errors are counted."""

from __future__ import annotations

import contextlib
import os
import resource
import struct
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import xxhash

from cache_store.codec import peek_header
from tests.reliability.conftest import ServerFactory
from tests.reliability.helpers import chat, chat_body, clean_reference, metric_total, salt, text
from tests.support.live_server import LiveServer

# The disk tier's file frame (cache_store/disk.py): magic, frame version, value length, XXH3-64.
DISK_FRAME = struct.Struct("<4sIQQ")
WARMUP_PROMPTS = [text(seed=800 + i, words=150) for i in range(24)]


def complete(server: LiveServer, prompt: str, **extra: object) -> dict[str, Any]:
    body = {"model": "demo", "prompt": prompt, "max_tokens": 4, "temperature": 0, **extra}
    resp = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text[:300]
    return resp.json()


def block_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


@pytest.mark.slow
def test_sigkill_while_writing_then_restart_reads_no_partial_record(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    disk = tmp_path / "blocks"
    first = server_factory("--disk-dir", str(disk))

    def warm() -> None:
        # Many multi-block prompts keep the background writer busy writing block files; the
        # kill cuts this request off, as intended.
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(
                first.url + "/v1/cache/warmup",
                json={"items": [{"prompt": p} for p in WARMUP_PROMPTS]},
                timeout=120,
            )

    warmup = threading.Thread(target=warm, daemon=True)
    with_tmp = 0
    warmup.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(block_files(disk)) < 40:
            time.sleep(0.01)
        assert len(block_files(disk)) >= 40, "the warmup wrote no block files"
        first.kill()  # mid-warmup: whatever the writer was doing is cut off there
        with_tmp = sum(1 for p in block_files(disk) if p.name.startswith("."))
    finally:
        warmup.join(timeout=30)
    written = len(block_files(disk))
    print(f"killed with {written} files on disk, {with_tmp} of them temp files mid-write")

    second = server_factory("--disk-dir", str(disk))
    # The restart's scan leaves only whole, framed, checksummed block records.
    files = block_files(disk)
    assert files and not [p for p in files if p.name.startswith(".") or p.name.endswith(".tmp")]
    for path in files:
        raw = path.read_bytes()
        magic, version, length, checksum = DISK_FRAME.unpack_from(raw)
        value = raw[DISK_FRAME.size :]
        assert (magic, version, len(value)) == (b"KVPD", 1, length), path
        assert xxhash.xxh3_64_intdigest(value) == checksum, path
        peek_header(value)
    hits = 0
    for prompt in WARMUP_PROMPTS[::3]:
        got = complete(second, prompt)
        clean = complete(second, prompt, cache_salt=salt())
        assert got["choices"][0]["text"] == clean["choices"][0]["text"]
        hits += got["usage"]["kvproxy"]["cached_by_tier"].get("disk", 0)
    assert hits > 0, "nothing came back from the disk written before the kill"
    assert "failed verification" not in second.log_text()
    assert "torn or corrupt" not in second.log_text()


def _serves_without_disk(server: LiveServer, seconds: float) -> None:
    """Requests for ``seconds`` (past the disk tier's root retry interval): all correct, all 200."""
    deadline = time.monotonic() + seconds
    seed = 900
    while time.monotonic() < deadline:
        body = chat_body(text(seed=seed, words=80), max_tokens=4)
        reply = chat(server, body)
        assert reply.text == clean_reference(server, body).text
        assert "disk" not in reply.by_tier
        again = chat(server, body)  # memory still serves hits
        assert again.by_tier.get("memory", 0) > 0, again.usage
        seed += 1
    health = server.get_json("/health")
    assert health["status"] == "degraded" and not health["tiers"]["disk"]["healthy"], health
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    assert metric_total(metrics, "kvproxy_store_errors_total", tier="disk") > 0


def _warnings_about_disk(server: LiveServer) -> list[str]:
    return [line for line in server.log_text().splitlines() if "WARNING" in line and "disk" in line]


@pytest.mark.slow
def test_disk_dir_under_a_regular_file(server_factory: ServerFactory, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a regular file where the disk tier's parent directory should be\n")
    server = server_factory("--disk-dir", str(blocker / "blocks"))
    _serves_without_disk(server, seconds=6.0)  # past the tier's 5 s retry of its root
    warnings = _warnings_about_disk(server)
    assert len(warnings) == 1, warnings
    assert str(blocker / "blocks") in warnings[0]


def _limit_file_size() -> None:
    # Smaller than one block file (~66 KB), larger than the server's own log: every block write
    # fails with EFBIG (CPython ignores SIGXFSZ), as on a full disk.
    resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))


def test_disk_that_fills_up(server_factory: ServerFactory, tmp_path: Path) -> None:
    disk = tmp_path / "blocks"
    server = server_factory("--disk-dir", str(disk), preexec_fn=_limit_file_size)
    _serves_without_disk(server, seconds=3.0)
    server.wait_written()
    warnings = _warnings_about_disk(server)
    assert len(warnings) == 1, warnings
    assert "File too large" in warnings[0] or os.strerror(27) in warnings[0], warnings[0]
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    assert metric_total(metrics, "kvproxy_store_errors_total", tier="disk", op="put") > 0
    # No block fits under the limit, and nothing half-written was left behind.
    assert block_files(disk) == []
