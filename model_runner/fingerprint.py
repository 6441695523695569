"""Model fingerprint: a digest of everything that changes K/V (weights, config, tokenizer, dtype).

Computed from file *contents* (XXH3-128 per file, then over the sorted ``(relative name, file
digest)`` pairs), so the same files in two directories, two processes or two machines give the
same fingerprint. Hashing multi-GB weights on every start would be slow, so per-file digests are
kept in a small JSON cache keyed by ``(absolute path, size, mtime_ns)``: a file that is
rewritten changes its mtime and is hashed again.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import xxhash

FINGERPRINT_VERSION = 1

# Files that decide the K/V a model computes. Docs, licences and .git never enter.
_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".txt", ".model", ".jinja", ".py", ".tiktoken")
_SKIP_NAMES = frozenset({"README.md", "LICENSE", "LICENSE.txt", "NOTICE", "USE_POLICY.md", ".gitattributes"})
_CHUNK = 8 << 20


class FingerprintError(ValueError):
    """The model directory holds no file a fingerprint could be computed from."""


def fingerprint_files(model_dir: Path) -> list[Path]:
    """The files of ``model_dir`` that enter the fingerprint, sorted by relative name."""
    files = [
        path
        for path in model_dir.rglob("*")
        if path.is_file()
        and path.suffix in _SUFFIXES
        and path.name not in _SKIP_NAMES
        and not any(part.startswith(".") for part in path.relative_to(model_dir).parts)
    ]
    return sorted(files, key=lambda p: p.relative_to(model_dir).as_posix())


def hash_file(path: Path) -> str:
    """XXH3-128 of a file's bytes, as hex."""
    hasher = xxhash.xxh3_128()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


class DigestCache:
    """Per-file digests in a JSON file, keyed by ``path|size|mtime_ns``. A broken or unwritable
    cache only costs a re-hash; it never fails a model load."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._entries: dict[str, str] = self._read()
        self._dirty = False

    def _read(self) -> dict[str, str]:
        if self._path is None:
            return {}
        try:
            data = json.loads(self._path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("version") != FINGERPRINT_VERSION:
            return {}
        entries = data.get("files", {})
        return {k: v for k, v in entries.items() if isinstance(k, str) and isinstance(v, str)}

    @staticmethod
    def _key(path: Path) -> str:
        st = path.stat()
        return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"

    def digest(self, path: Path) -> str:
        key = self._key(path)
        cached = self._entries.get(key)
        if cached is not None:
            return cached
        value = hash_file(path)
        self._entries[key] = value
        self._dirty = True
        return value

    def save(self) -> None:
        if self._path is None or not self._dirty:
            return
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self._path.parent, prefix=".fingerprints.")
            with os.fdopen(fd, "w") as fh:
                json.dump({"version": FINGERPRINT_VERSION, "files": self._entries}, fh)
            os.replace(tmp, self._path)
            self._dirty = False
        except OSError:
            pass  # a read-only cache dir only means hashing again next start


def combine(named_digests: Iterable[tuple[str, str]], *, dtype: str) -> str:
    """The fingerprint from ``(relative name, file digest)`` pairs and the compute dtype."""
    hasher = xxhash.xxh3_128()
    for part in (b"kvproxy-fingerprint", str(FINGERPRINT_VERSION).encode(), dtype.encode()):
        hasher.update(len(part).to_bytes(8, "little") + part)
    for name, digest in sorted(named_digests):
        for part in (name.encode(), digest.encode()):
            hasher.update(len(part).to_bytes(8, "little") + part)
    return hasher.hexdigest()


def model_fingerprint(model_dir: Path, *, dtype: str, cache_file: Path | None = None) -> str:
    """Fingerprint of the model files in ``model_dir`` computed in ``dtype`` (e.g. ``"float32"``).

    ``cache_file``: where per-file digests are remembered across starts (``None``: no cache).
    """
    files = fingerprint_files(model_dir)
    if not files:
        raise FingerprintError(f"no model files found in {model_dir}")
    cache = DigestCache(cache_file)
    pairs = [(path.relative_to(model_dir).as_posix(), cache.digest(path)) for path in files]
    cache.save()
    return combine(pairs, dtype=dtype)
