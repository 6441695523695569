"""DiskStore: survives a restart, drops torn and foreign files, keeps its byte cap, and turns an
unusable root into misses instead of exceptions."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from cache_store.disk import DiskStore


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def block_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_blocks_survive_a_restart(tmp_path: Path) -> None:
    first = DiskStore(tmp_path, max_bytes=1 << 20)
    items = [(key(i), os.urandom(1000 + i)) for i in range(10)]
    assert first.put_many(items) == 10
    first.close()
    second = DiskStore(tmp_path, max_bytes=1 << 20)
    assert second.get_many([k for k, _ in items]) == [v for _, v in items]
    assert second.stats().blocks == 10
    assert second.stats().bytes == first.stats().bytes


def test_a_batched_read_keeps_order_across_its_reader_threads(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, max_bytes=1 << 24)
    items = [(key(i), os.urandom(20_000 + i)) for i in range(0, 40, 2)]  # odd keys never stored
    store.put_many(items)
    damage_block(store, key(10), "garbage_tail")
    again = DiskStore(tmp_path, max_bytes=1 << 24)  # first reads check every frame checksum
    wanted = [key(i) for i in range(40)]
    stored = dict(items)
    expected = [None if k == key(10) else stored.get(k) for k in wanted]
    assert again.get_many(wanted) == expected
    stats = again.stats()
    assert (stats.hits, stats.misses) == (19, 21)
    again.close()
    assert again.get_many(wanted[:6]) == expected[:6], "a closed store still reads, on the caller's thread"


def test_files_are_sharded_by_key(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, max_bytes=1 << 20)
    k = bytes.fromhex("abcdef" + "00" * 13)
    store.put_many([(k, b"v")])
    assert [p.relative_to(tmp_path).as_posix() for p in block_files(tmp_path)] == [f"ab/cd/{k.hex()}"]


DAMAGE = {
    "truncate": lambda data: data[:-100],
    "garbage_header": lambda data: os.urandom(24) + data[24:],
    "garbage_tail": lambda data: data[:-10] + os.urandom(10),
    "empty": lambda data: b"",
}


def damage_block(store: DiskStore, k: bytes, how: str) -> Path:
    path = store._path(k)
    path.write_bytes(DAMAGE[how](path.read_bytes()))
    return path


@pytest.mark.parametrize("how", ["truncate", "garbage_header", "empty"])
def test_torn_file_is_ignored_and_removed_on_read(tmp_path: Path, how: str) -> None:
    store = DiskStore(tmp_path, max_bytes=1 << 20)
    store.put_many([(key(1), os.urandom(5000)), (key(2), b"fine")])
    path = damage_block(store, key(1), how)
    assert store.get_many([key(1), key(2)]) == [None, b"fine"]
    assert not path.exists()
    assert store.contains([key(1)]) == [False]
    assert store.stats().blocks == 1


@pytest.mark.parametrize("how", list(DAMAGE))
def test_torn_file_from_an_earlier_run_is_never_returned(tmp_path: Path, how: str) -> None:
    store = DiskStore(tmp_path, max_bytes=1 << 20)
    store.put_many([(key(1), os.urandom(5000)), (key(2), b"fine")])
    path = damage_block(store, key(1), how)
    # The start scan drops what fails the cheap frame check; the first read of a file this
    # process did not write verifies its checksum, which catches same-length damage too.
    again = DiskStore(tmp_path, max_bytes=1 << 20)
    assert again.get_many([key(1), key(2)]) == [None, b"fine"]
    assert not path.exists()
    assert again.stats().blocks == 1


def test_start_removes_temp_files_and_foreign_files(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, max_bytes=1 << 20)
    store.put_many([(key(7), b"seven")])
    shard = store._path(key(7)).parent
    stale_tmp = shard / f".{key(7).hex()}.deadbeef.tmp"
    stale_tmp.write_bytes(b"half a write")
    misplaced = tmp_path / "ff" / "ee" / key(8).hex()  # right name, wrong shard
    misplaced.parent.mkdir(parents=True)
    misplaced.write_bytes(store._path(key(7)).read_bytes())
    junk = shard / "not-a-block"
    junk.write_bytes(b"junk")
    truncated = store._path(key(9))
    truncated.write_bytes(b"KVPD")
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.write_bytes(store._path(key(7)).read_bytes())
    planted = store._path(key(10))
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.symlink_to(outside)  # a link out of the cache is never followed

    again = DiskStore(tmp_path, max_bytes=1 << 20)
    assert block_files(tmp_path) == [store._path(key(7))]
    assert again.get_many([key(7), key(8), key(9), key(10)]) == [b"seven", None, None, None]
    assert outside.exists()
    assert again.stats().blocks == 1


def test_byte_cap_evicts_least_recently_used(tmp_path: Path) -> None:
    value = b"x" * 1000
    frame = 24
    store = DiskStore(tmp_path, max_bytes=3 * (len(value) + frame))
    store.put_many([(key(i), value) for i in range(3)])
    store.get_many([key(0)])
    store.put_many([(key(3), value)])
    assert store.contains([key(0), key(1), key(2), key(3)]) == [True, False, True, True]
    assert len(block_files(tmp_path)) == 3
    stats = store.stats()
    assert stats.evictions == 1 and stats.bytes <= stats.capacity_bytes  # type: ignore[operator]


def test_access_order_survives_a_restart(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, max_bytes=3 * 124)
    store.put_many([(key(i), bytes(100)) for i in range(3)])
    old = time.time() - 3600
    for i, age in ((0, 10), (1, 30), (2, 20)):  # key 1 is the least recently used
        os.utime(store._path(key(i)), (old - age, old - age))
    again = DiskStore(tmp_path, max_bytes=3 * 124)
    again.put_many([(key(3), bytes(100))])
    assert again.contains([key(0), key(1), key(2), key(3)]) == [True, False, True, True]


def test_a_smaller_cap_on_restart_trims_the_store(tmp_path: Path) -> None:
    DiskStore(tmp_path, max_bytes=1 << 20).put_many([(key(i), bytes(1000)) for i in range(10)])
    smaller = DiskStore(tmp_path, max_bytes=3 * 1024)
    assert smaller.stats().blocks == 3
    assert len(block_files(tmp_path)) == 3


def test_value_larger_than_the_cap_is_refused(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, max_bytes=1000)
    assert store.put_many([(key(0), bytes(2000))]) == 0
    assert store.get_many([key(0)]) == [None]
    assert block_files(tmp_path) == []


def test_unusable_root_gives_misses_not_exceptions(tmp_path: Path) -> None:
    root = tmp_path / "a-file"
    root.write_bytes(b"not a directory")
    store = DiskStore(root, max_bytes=1 << 20)
    assert store.put_many([(key(0), b"v")]) == 0
    assert store.get_many([key(0)]) == [None]
    assert store.contains([key(0)]) == [False]
    assert store.delete([key(0)]) == 0
    assert store.clear() == 0
    stats = store.stats()
    assert not stats.healthy
    assert stats.errors.get("open", 0) >= 1 and stats.errors.get("put", 0) >= 1


def test_root_becoming_a_file_later_is_survived(tmp_path: Path) -> None:
    root = tmp_path / "blocks"
    store = DiskStore(root, max_bytes=1 << 20)
    store.put_many([(key(0), b"v")])
    for path in sorted(root.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    root.rmdir()
    root.write_bytes(b"now a file")
    assert store.put_many([(key(1), b"w")]) == 0
    assert store.get_many([key(0), key(1)]) == [None, None]
    assert not store.stats().healthy


def test_file_size_limit_on_write_is_a_counted_error(tmp_path: Path) -> None:
    # EFBIG stands in for ENOSPC: both are OS errors mid-write. Run in a child process so the
    # lowered RLIMIT_FSIZE cannot touch the test runner's own files.
    script = textwrap.dedent(
        f"""
        import resource, signal
        from pathlib import Path
        from cache_store.disk import DiskStore
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        store = DiskStore(Path({str(tmp_path)!r}), max_bytes=1 << 30)
        assert store.put_many([(b"a" * 16, b"small")]) == 1
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
        assert store.put_many([(b"b" * 16, bytes(1 << 20))]) == 0
        stats = store.stats()
        assert not stats.healthy and stats.errors == {{"put": 1}}, stats
        assert store.get_many([b"a" * 16, b"b" * 16]) == [b"small", None]
        assert store.put_many([(b"c" * 16, b"fits again")]) == 1
        assert store.stats().healthy
        print("ok")
        """
    )
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=repo, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
    assert not list(tmp_path.rglob("*.tmp")), "a failed write leaves no temp file behind"


def test_concurrent_reader_and_writer(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, max_bytes=40 * 1100)
    errors: list[BaseException] = []

    def writer() -> None:
        for i in range(200):
            store.put_many([(key(i), bytes([i % 256]) * 1000)])

    def reader() -> None:
        try:
            for i in range(400):
                got = store.get_many([key(i // 2)])[0]
                assert got is None or got == bytes([(i // 2) % 256]) * 1000
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    stats = store.stats()
    assert stats.bytes <= 40 * 1100 and stats.errors == {}
    assert len(block_files(tmp_path)) == stats.blocks


def test_a_hit_is_remembered_across_restarts(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, max_bytes=3 * 124)
    store.put_many([(key(i), bytes(100)) for i in range(3)])
    old = time.time() - 3600
    for i in range(3):  # key 0 oldest, then 1, then 2
        os.utime(store._path(key(i)), (old + i, old + i))
    reader = DiskStore(tmp_path, max_bytes=3 * 124)
    assert reader.get_many([key(0)]) == [bytes(100)]  # refreshes the file's mtime
    again = DiskStore(tmp_path, max_bytes=3 * 124)
    again.put_many([(key(3), bytes(100))])
    assert again.contains([key(0), key(1), key(2), key(3)]) == [True, False, True, True]
