"""The disk tier: one file per block under sharded directories, LRU within a byte cap.

Layout: ``root/ab/cd/<hex key>`` where ``abcd`` are the first hex digits of the key. Each file is a
24-byte store frame (magic, frame version, value length, XXH3-64 of the value) followed by the
value. Files are written to a temp file in the same directory, fsynced, then ``os.replace``d into
place, so a reader never sees a half-written block. The frame protects the store from files torn
by a crash or truncated by hand: the length is checked on every read, the checksum on the first
read of a file this process did not write itself (later reads are already guarded by the record
codec's own checksum, and hashing every read would cost a third of the read throughput).

A batched read spreads its files over a few reader threads (``os.pread`` and the checksum
release the GIL): a restarted server restores a prefix from files the page cache no longer
holds, and a virtual disk serves 32 block files in about half the time with four reads in
flight as with one.

The index (sizes and access order) lives in memory and is rebuilt from the directory tree on
start; the access order survives restarts through the files' modification times, which a hit
refreshes at most once a minute.

Any OS error (the root is a regular file, read-only, the disk is full) is counted and turns the
call into a miss or a zero; the store marks itself unhealthy until a write succeeds again. Each
such outage is logged once as a warning (a full disk fails every write: one line per block would
drown the log), and its end once as info.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import xxhash

from cache_store.listener import BlockListener, ChangeLog
from cache_store.store import Buffer, StoreStats

log = logging.getLogger(__name__)

_FRAME = struct.Struct("<4sIQQ")  # magic, frame version, value length, xxh3_64(value)
_MAGIC = b"KVPD"
_FRAME_VERSION = 1
_TMP_SUFFIX = ".tmp"
_TOUCH_INTERVAL_S = 60.0
_RETRY_ROOT_S = 5.0
_READERS = 4
"""Reads in flight for one batched get."""


@dataclass
class _Entry:
    nbytes: int  # file size, frame included
    verified: bool  # checksum known good (written by us or checked once)
    touched_at: float  # wall-clock time of the file's last persisted touch


class DiskStore:
    """Block records as files under ``root``, at most ``max_bytes`` on disk (frames included).
    ``events``, when given, hears of every block stored, evicted and deleted (a corrupt file
    removed counts as deleted) and of every clear (``cache_store.listener``)."""

    name = "disk"

    def __init__(self, root: Path | str, max_bytes: int, *, events: BlockListener | None = None) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must not be negative, got {max_bytes}")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._changes = ChangeLog(self.name, events)
        self._index: OrderedDict[bytes, _Entry] = OrderedDict()  # oldest access first
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._puts = 0
        self._evictions = 0
        self._errors: dict[str, int] = {}
        self._healthy = False
        self._reported_down = False  # a warning went out for the current outage
        self._ready = False
        self._last_root_attempt = 0.0
        self._readers = ThreadPoolExecutor(max_workers=_READERS, thread_name_prefix="kvproxy-disk-read")
        self._open_root()

    # -- public API ---------------------------------------------------------------------------

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | bytearray | None]:
        if len(keys) < 2:
            out = [self._get_one(key) for key in keys]
        else:
            # Contiguous slices, one per reader: a prefix's blocks are read in order per thread.
            step = -(-len(keys) // _READERS)
            slices = [keys[i : i + step] for i in range(0, len(keys), step)]
            try:
                parts = list(self._readers.map(self._get_some, slices))
            except RuntimeError:  # closed: no reader threads any more, read here
                parts = [self._get_some(part) for part in slices]
            out = [v for part in parts for v in part]
        hits = sum(1 for value in out if value is not None)
        with self._lock:
            self._hits += hits
            self._misses += len(out) - hits
        return out

    def put_many(self, items: Sequence[tuple[bytes, Buffer]]) -> int:
        if not self._ensure_root():
            self._count_error("put", len(items))
            return 0
        return sum(1 for key, value in items if self._put_one(key, value))

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        with self._lock:
            return [key in self._index for key in keys]

    def delete(self, keys: Sequence[bytes]) -> int:
        removed = 0
        with self._lock:
            for key in keys:
                if self._remove_locked(key, "delete"):
                    removed += 1
                    self._changes.note("deleted", key)
            self._changes.emit()
        return removed

    def clear(self) -> int:
        with self._lock:
            keys = list(self._index)
            for key in keys:
                self._remove_locked(key, "clear")
            self._changes.cleared()
        return len(keys)

    def keys(self) -> list[bytes]:
        """Every key in the index now (a snapshot, oldest access first)."""
        with self._lock:
            return list(self._index)

    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(
                name=self.name,
                blocks=len(self._index),
                bytes=self._bytes,
                capacity_bytes=self.max_bytes,
                hits=self._hits,
                misses=self._misses,
                puts=self._puts,
                evictions=self._evictions,
                errors=dict(self._errors),
                healthy=self._healthy,
            )

    def close(self) -> None:
        """Files are durable as soon as they are written; only the reader threads stop."""
        self._readers.shutdown(wait=False, cancel_futures=True)

    def __repr__(self) -> str:
        return f"DiskStore(root={str(self.root)!r}, max_bytes={self.max_bytes})"

    # -- reads ----------------------------------------------------------------------------------

    def _get_some(self, keys: Sequence[bytes]) -> list[bytes | None]:
        return [self._get_one(key) for key in keys]

    def _get_one(self, key: bytes) -> bytes | None:
        with self._lock:
            entry = self._index.get(key)
            if entry is None:
                return None
            self._index.move_to_end(key)
            size, verified, touched_at = entry.nbytes, entry.verified, entry.touched_at
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            self._forget(key, None)  # removed behind our back (or by a concurrent delete)
            return None
        except OSError:
            self._count_error("get")
            return None
        try:
            value_len = size - _FRAME.size
            frame = os.pread(fd, _FRAME.size, 0)
            # Ask for one byte more than expected, so a file that grew is caught as well.
            value = os.pread(fd, value_len + 1, _FRAME.size)
            good = _frame_ok(frame, value, value_len, check_sum=not verified)
            if not good:
                log.warning("removing torn or corrupt block file %s", path)
                self._forget(key, os.fstat(fd).st_ino)
                return None
            now = time.time()
            if now - touched_at >= _TOUCH_INTERVAL_S:
                # Persist the access order for the next start, cheaply: mtime via the open fd.
                with contextlib.suppress(OSError):
                    os.utime(fd)
                touched_at = now
        except OSError:
            self._count_error("get")
            return None
        finally:
            os.close(fd)
        with self._lock:
            entry = self._index.get(key)
            if entry is not None and entry.nbytes == size:
                entry.verified = True
                entry.touched_at = touched_at
        return value

    def _forget(self, key: bytes, inode: int | None) -> None:
        """Drop ``key`` after a failed read: its file was gone (``inode`` None) or bad (``inode``
        of the file read). If a concurrent put has meanwhile installed a new file, keep that."""
        with self._lock:
            path = self._path(key)
            try:
                current: int | None = os.stat(path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                current = None
            except OSError:
                return
            if current is not None and current != inode:
                return
            entry = self._index.pop(key, None)
            if entry is not None:
                self._bytes -= entry.nbytes
                self._changes.note("deleted", key)
                self._changes.emit()
            if current is not None:
                with contextlib.suppress(OSError):
                    os.unlink(path)

    # -- writes ---------------------------------------------------------------------------------

    def _put_one(self, key: bytes, raw: Buffer) -> bool:
        value = memoryview(raw)
        size = _FRAME.size + value.nbytes
        if size > self.max_bytes:
            self._count_error("put")  # larger than the whole cap: can never be stored
            return False
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{_TMP_SUFFIX}")
        frame = _FRAME.pack(_MAGIC, _FRAME_VERSION, value.nbytes, xxhash.xxh3_64_intdigest(value))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_file(tmp, frame, value)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            self._write_failed(exc)
            return False
        with self._lock:
            # Rename under the lock so the index and the directory tree never disagree.
            try:
                os.replace(tmp, path)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                self._count_error_locked("put", 1)
                self._report_down(self._went_down_locked(), f"disk store cannot write under {self.root}", exc)
                return False
            old = self._index.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._index[key] = _Entry(nbytes=size, verified=True, touched_at=time.time())
            self._bytes += size
            self._puts += 1
            self._changes.note("stored", key)
            self._came_back_locked()
            self._evict_locked()
            self._changes.emit()
        return True

    def _write_failed(self, exc: OSError) -> None:
        with self._lock:
            self._count_error_locked("put", 1)
            first = self._went_down_locked()
        self._report_down(first, f"disk store cannot write under {self.root}", exc)

    def _went_down_locked(self) -> bool:
        """Mark the store unhealthy; True when this starts an outage not reported yet."""
        self._healthy = False
        first, self._reported_down = not self._reported_down, True
        return first

    def _came_back_locked(self) -> None:
        self._healthy = True
        if self._reported_down:
            self._reported_down = False
            log.info("disk store at %s is usable again", self.root)

    @staticmethod
    def _report_down(first: bool, what: str, exc: OSError) -> None:
        if first:
            log.warning("%s: %s; serving without the disk tier until it recovers", what, exc)
        else:
            log.debug("%s: %s", what, exc)

    def _evict_locked(self) -> None:
        while self._bytes > self.max_bytes and self._index:
            oldest = next(iter(self._index))
            self._remove_locked(oldest, "evict")
            self._evictions += 1
            self._changes.note("evicted", oldest)

    def _remove_locked(self, key: bytes, op: str) -> bool:
        entry = self._index.pop(key, None)
        if entry is None:
            return False
        self._bytes -= entry.nbytes
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass
        except OSError:
            self._count_error_locked(op, 1)
        return True

    # -- root and index -------------------------------------------------------------------------

    def _ensure_root(self) -> bool:
        if self._ready:
            return True
        if time.monotonic() - self._last_root_attempt >= _RETRY_ROOT_S:
            self._open_root()
        return self._ready

    def _open_root(self) -> None:
        self._last_root_attempt = time.monotonic()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if not os.access(self.root, os.W_OK | os.X_OK):
                raise PermissionError(f"no write access to {self.root}")
            entries = _scan(self.root)
        except OSError as exc:
            with self._lock:
                self._count_error_locked("open", 1)
                first = self._went_down_locked()
            self._report_down(first, f"disk store unusable at {self.root}", exc)
            return
        with self._lock:
            for key, entry in entries:
                self._index[key] = entry
                self._bytes += entry.nbytes
            self._ready = True
            self._came_back_locked()
            self._evict_locked()  # the cap may have shrunk since the last run
            self._changes.emit()

    def _path(self, key: bytes) -> Path:
        name = key.hex()
        return self.root / name[0:2] / name[2:4] / name

    def _count_error(self, op: str, n: int = 1) -> None:
        with self._lock:
            self._count_error_locked(op, n)

    def _count_error_locked(self, op: str, n: int) -> None:
        self._errors[op] = self._errors.get(op, 0) + n


def _frame_ok(frame: bytes, value: bytes, value_len: int, *, check_sum: bool) -> bool:
    if len(frame) != _FRAME.size or len(value) != value_len:
        return False
    magic, version, length, checksum = _FRAME.unpack(frame)
    if magic != _MAGIC or version != _FRAME_VERSION or length != value_len:
        return False
    return not check_sum or xxhash.xxh3_64_intdigest(value) == checksum


def _write_file(tmp: Path, frame: bytes, value: memoryview) -> None:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        buffers: list[bytes | memoryview] = [frame, value.cast("B")]
        total = len(frame) + value.nbytes
        written = 0
        while written < total:
            n = os.writev(fd, buffers)
            written += n
            buffers = _advance(buffers, n)
        os.fsync(fd)
    finally:
        os.close(fd)


def _advance(buffers: list[bytes | memoryview], n: int) -> list[bytes | memoryview]:
    """The buffers left after a short ``writev`` of ``n`` bytes (views, no copies)."""
    out: list[bytes | memoryview] = []
    for buf in buffers:
        if n >= len(buf):
            n -= len(buf)
            continue
        out.append(memoryview(buf)[n:])
        n = 0
    return out


def _scan(root: Path) -> list[tuple[bytes, _Entry]]:
    """Every well-formed block file under ``root``, oldest access first. Leftover temp files and
    files that fail the structural check (name, frame, size) are removed."""
    found: list[tuple[float, bytes, _Entry]] = []
    for dirpath, _dirnames, filenames in os.walk(root):
        for fname in filenames:
            path = os.path.join(dirpath, fname)
            key = _key_from_name(root, dirpath, fname)
            entry = _check_file(path) if key is not None else None
            if entry is None:
                with contextlib.suppress(OSError):
                    os.unlink(path)
                continue
            found.append((entry.touched_at, key, entry))  # type: ignore[arg-type]
    found.sort(key=lambda item: item[0])
    return [(key, entry) for _, key, entry in found]


def _key_from_name(root: Path, dirpath: str, fname: str) -> bytes | None:
    if fname.endswith(_TMP_SUFFIX) or fname.startswith("."):
        return None  # a temp file left by a crash mid-write
    try:
        key = bytes.fromhex(fname)
    except ValueError:
        return None
    rel = os.path.relpath(dirpath, root).split(os.sep)
    if len(key) < 2 or rel != [fname[0:2], fname[2:4]]:
        return None
    return key


def _check_file(path: str) -> _Entry | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)  # a planted symlink is not a block
        try:
            st = os.fstat(fd)
            frame = os.pread(fd, _FRAME.size, 0)
        finally:
            os.close(fd)
    except OSError:
        return None
    if len(frame) != _FRAME.size:
        return None
    magic, version, length, _checksum = _FRAME.unpack(frame)
    if magic != _MAGIC or version != _FRAME_VERSION or length + _FRAME.size != st.st_size:
        return None
    touched = max(st.st_mtime, st.st_atime)
    return _Entry(nbytes=st.st_size, verified=False, touched_at=touched)
