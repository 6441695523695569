"""Block hashing: token ids -> full blocks -> chained XXH3-128 digests rooted in a namespace.

``h_0`` is the namespace digest; ``h_i = xxh3_128(h_{i-1} || token ids of block i as little-endian
u32)``. Everything here is a pure function of its inputs: no Python ``hash()``, nothing that
depends on PYTHONHASHSEED, so two processes on two machines agree on every digest.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence

import numpy as np
import xxhash

FORMAT_VERSION = 2
"""Version of the block record format; part of every namespace so a format change never reuses
blocks written by an older release."""

HASH_BYTES = 16

_U32_MAX = 2**32 - 1


def _field(value: bytes) -> bytes:
    """Length-prefixed field, so ("org_1", "2345") and ("org_12345", "") never collide."""
    return struct.pack("<Q", len(value)) + value


def namespace_hash(
    *,
    model_fingerprint: str,
    block_size: int,
    tenant: str,
    cache_salt: str = "",
    version: int = FORMAT_VERSION,
) -> bytes:
    """The root digest ``h_0`` that partitions the cache by format, model, block size, tenant and salt."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    payload = b"".join(
        _field(part)
        for part in (
            b"kvproxy-namespace",
            str(version).encode(),
            model_fingerprint.encode(),
            str(block_size).encode(),
            tenant.encode("utf-8", "surrogatepass"),
            cache_salt.encode("utf-8", "surrogatepass"),
        )
    )
    return xxhash.xxh3_128_digest(payload)


def tokens_to_bytes(token_ids: Sequence[int] | np.ndarray) -> bytes:
    """Token ids as little-endian u32, the byte form that is hashed and stored in records."""
    arr = np.asarray(token_ids, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError("token ids must be a flat sequence")
    if arr.size and (arr.min() < 0 or arr.max() > _U32_MAX):
        raise ValueError("token ids must fit in an unsigned 32-bit integer")
    return arr.astype("<u4").tobytes()


def iter_block_hashes(
    token_ids: Sequence[int] | np.ndarray, block_size: int, namespace: bytes
) -> Iterator[bytes]:
    """Yield ``h_1 .. h_n`` for the full blocks of ``token_ids``; a trailing partial block is ignored."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if len(namespace) != HASH_BYTES:
        raise ValueError(f"namespace must be {HASH_BYTES} bytes")
    raw = tokens_to_bytes(token_ids)
    stride = block_size * 4
    n_full = len(raw) // stride
    prev = namespace
    view = memoryview(raw)
    for i in range(n_full):
        hasher = xxhash.xxh3_128(prev)
        hasher.update(view[i * stride : (i + 1) * stride])
        prev = hasher.digest()
        yield prev


def block_hashes(token_ids: Sequence[int] | np.ndarray, block_size: int, namespace: bytes) -> list[bytes]:
    """Digests of every full block of ``token_ids``, in order (see ``iter_block_hashes``)."""
    return list(iter_block_hashes(token_ids, block_size, namespace))


def parent_hashes(hashes: Sequence[bytes], namespace: bytes) -> list[bytes]:
    """The parent of each block: the namespace for block 0, the previous block's digest after."""
    return [namespace, *hashes[:-1]] if hashes else []
