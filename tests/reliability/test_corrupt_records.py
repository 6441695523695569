"""Bad block records planted in Redis and on disk under a live server: flipped bytes, truncation, a
wrong magic or version, another model's namespace, and a real pickle whose unpickling would create
a marker file. Each is the *middle* block of a cached prefix, so the restore has to stop halfway:
the record is rejected as a miss, deleted, never executed, and the output equals a clean run.

The server keeps no block in memory (``--memory-bytes 1``), so every hit is read back from the
lower tiers, where the planted record sits.
"""

from __future__ import annotations

import pathlib
import pickle
import struct
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import xxhash

from cache_store.codec import RecordError, peek_header
from cache_store.hashing import namespace_hash
from cache_store.redis_store import EVENTS_INFIX
from tests.reliability.conftest import BLOCK_SIZE, ServerFactory
from tests.reliability.helpers import Reply, chain_order, chat, chat_body, clean_reference, text
from tests.support.live_server import LiveServer

# The disk tier's file frame (cache_store/disk.py): magic, frame version, value length, XXH3-64.
DISK_FRAME = struct.Struct("<4sIQQ")


class MarkerPickle:
    """Unpickling this creates ``path``: proof of execution, if it ever happened."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable[..., object], tuple[object, ...]]:
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def _flip(record: bytes) -> bytes:
    out = bytearray(record)
    for i in range(len(out) - 512, len(out), 7):  # inside the K/V payload
        out[i] ^= 0xFF
    return bytes(out)


def _other_models_namespace(record: bytes) -> bytes:
    other = namespace_hash(model_fingerprint="another-model", block_size=BLOCK_SIZE, tenant="default")
    return record[:8] + other + record[24:]


CORRUPTIONS: dict[str, Callable[[bytes, Path], bytes]] = {
    "flipped-bytes": lambda rec, _m: _flip(rec),
    "truncated": lambda rec, _m: rec[: len(rec) // 2],
    "wrong-magic": lambda rec, _m: b"KVPX" + rec[4:],
    "wrong-version": lambda rec, _m: rec[:4] + struct.pack("<H", 99) + rec[6:],
    "other-models-namespace": lambda rec, _m: _other_models_namespace(rec),
    "pickle": lambda _rec, marker: pickle.dumps(MarkerPickle(marker)),
}


@dataclass
class Rig:
    server: LiveServer
    redis: redis.Redis
    prefix: str
    disk: Path
    marker_dir: Path

    def redis_blocks(self) -> dict[bytes, bytes]:
        out: dict[bytes, bytes] = {}
        for rkey in self.redis.scan_iter(match=self.prefix + "*", count=1000):
            if rkey.decode().startswith(self.prefix + EVENTS_INFIX):
                continue  # the server's block event stream, not a block
            value = self.redis.get(rkey)
            if value is not None:
                out[bytes.fromhex(rkey.decode()[len(self.prefix) :])] = value
        return out

    def disk_path(self, key: bytes) -> Path:
        name = key.hex()
        return self.disk / name[0:2] / name[2:4] / name


@pytest.fixture(scope="module")
def rig(
    module_server_factory: ServerFactory, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Rig]:
    prefix = f"kvptest:{uuid.uuid4().hex}:"
    disk = tmp_path_factory.mktemp("disk-tier")
    server = module_server_factory(
        "--memory-bytes", "1",
        "--disk-dir", str(disk),
        "--redis-url", redis_url,
        "--redis-prefix", prefix,
        "--store-timeout-ms", "2000",  # a loaded 2-core machine must not turn hits into timeouts
    )  # fmt: skip
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    yield Rig(server, client, prefix, disk, tmp_path_factory.mktemp("markers"))
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    if keys:
        client.unlink(*keys)
    client.close()


@pytest.fixture(scope="module")
def prompt(rig: Rig) -> tuple[dict[str, object], Reply]:
    """One prompt of several blocks and its clean-run output (every case caches it under a salt
    of its own, which changes the blocks but not the output)."""
    body = chat_body(text(seed=700, words=60), max_tokens=4)
    return body, clean_reference(rig.server, body)


def test_the_pickle_is_live(tmp_path: Path) -> None:
    """The planted pickle really would create its marker if anything unpickled it."""
    marker = tmp_path / "proof"
    payload = pickle.dumps(MarkerPickle(marker))
    subprocess.run([sys.executable, "-c", "import pickle,sys; pickle.loads(sys.stdin.buffer.read())"],
                   input=payload, check=True, timeout=30)  # fmt: skip
    assert marker.exists()


@pytest.mark.parametrize("tier", ["redis", "disk"])
@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_bad_middle_record_is_a_deleted_miss(
    rig: Rig, prompt: tuple[dict[str, object], Reply], tier: str, kind: str
) -> None:
    body, reference = prompt
    body = {**body, "cache_salt": f"{tier}-{kind}-{uuid.uuid4().hex}"}
    rig.server.wait_written()  # earlier requests' blocks must not show up as this one's
    before = set(rig.redis_blocks())
    chat(rig.server, body)
    rig.server.wait_written()
    new = {k: v for k, v in rig.redis_blocks().items() if k not in before}
    chain = chain_order(new)
    assert len(chain) >= 3, "the prompt must span at least three blocks"
    target = chain[1]
    good = new[target]
    marker = rig.marker_dir / f"{tier}-{kind}"
    bad = CORRUPTIONS[kind](good, marker)
    if tier == "redis":
        rig.redis.set(rig.prefix + target.hex(), bad)
        rig.disk_path(target).unlink()  # so the read falls through to Redis
    else:
        # A frame that is itself intact, so the bad record gets past the disk tier to the codec.
        path = rig.disk_path(target)
        path.write_bytes(DISK_FRAME.pack(b"KVPD", 1, len(bad), xxhash.xxh3_64_intdigest(bad)) + bad)
        rig.redis.delete(rig.prefix + target.hex())
    failures_before = rig.server.log_text().count("failed verification")

    reply = chat(rig.server, body)

    assert reply.text == reference.text
    assert reply.cached == BLOCK_SIZE, reply.usage  # block 0 restored, the restore stopped at block 1
    assert reply.by_tier == {"disk": BLOCK_SIZE}, reply.usage
    assert not marker.exists(), "a record was unpickled"
    rig.server.wait_written()
    if tier == "redis":
        assert rig.server.log_text().count("failed verification") > failures_before
        stored = rig.redis.get(rig.prefix + target.hex())
    else:
        path = rig.disk_path(target)
        stored = path.read_bytes()[DISK_FRAME.size :] if path.exists() else None
    # The bad value is gone: deleted, or replaced by the block recomputed from this request.
    assert stored != bad
    if stored is not None:
        try:
            peek_header(stored)
        except RecordError as exc:
            raise AssertionError(f"a bad record is still stored: {exc}") from None
    again = chat(rig.server, body)
    assert again.text == reference.text
    assert again.cached > BLOCK_SIZE, again.usage
