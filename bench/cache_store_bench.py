"""cache_store throughput against raw floors: ``python -m bench.cache_store_bench [--quick]``.

Measures, in one run: block hashing (µs per 1,000 blocks of 64 tokens); the trie (match time for a
32k-token prompt, index bytes per block via tracemalloc); the record codec (encode/decode GB/s
against a plain memory copy of the same bytes); and each store's get/put GB/s against its raw
floor -- MemoryStore vs ``bytes(bytearray)``, DiskStore vs plain files (open+readinto /
open+write+fsync), RedisStore vs raw redis-py MGET / pipelined SET of opaque values of the same
size. Codec figures come in two modes: ``hot`` (one record at a time, its memory reused: pure CPU
cost) and ``batch`` (32 MiB of records, 8 with --quick, kept alive as the memory tier keeps them:
every new record and every floor copy needs fresh pages). Every figure is the median of several repetitions, a
store and its floor timed round-robin (this machine is shared). Prints markdown tables and writes
``bench/results/cache_store.json``. Redis: ``REDIS_URL`` (default redis://127.0.0.1:6379/0), under
a unique key prefix whose keys are deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import redis
import torch

from cache_store.codec import decode_block, encode_block
from cache_store.disk import DiskStore
from cache_store.hashing import block_hashes, namespace_hash
from cache_store.memory import MemoryStore
from cache_store.redis_store import RedisStore
from cache_store.trie import PrefixTrie

KIB, MIB = 1024, 1024 * 1024
SIZES = (64 * KIB, 256 * KIB, 1 * MIB, 4 * MIB)
BLOCK = 64
HEAD_DIM = 64
RESULTS = Path(__file__).resolve().parent / "results" / "cache_store.json"


Timed = Callable[[], object] | tuple[Callable[[], object], Callable[[], object]]


def medians(fns: dict[str, Timed], reps: int) -> dict[str, float]:
    """Median wall time of each function over ``reps`` runs, after one warm-up. The functions run
    round-robin, so a load spike on this shared machine hits a store and its floor alike. A
    ``(setup, fn)`` pair runs ``setup`` untimed before each timed ``fn``."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(reps + 1):
        for name, entry in fns.items():
            setup, fn = entry if isinstance(entry, tuple) else (None, entry)
            if setup is not None:
                setup()
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if i:
                times[name].append(elapsed)
    return {name: statistics.median(t) for name, t in times.items()}


def median_s(fn: Callable[[], object], reps: int) -> float:
    return medians({"fn": fn}, reps)["fn"]


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def layout(size: int) -> tuple[int, int]:
    """(layers, kv_heads) for a bf16 record of about ``size`` bytes: 16 KiB per layer x head."""
    units = max(1, size // (2 * BLOCK * HEAD_DIM * 2))
    layers = min(units, 32)
    return layers, units // layers


def make_record(size: int, seed: int = 0) -> tuple[dict[str, Any], bytearray]:
    layers, heads = layout(size)
    ns = namespace_hash(model_fingerprint="bench", block_size=BLOCK, tenant="bench")
    tokens = [(seed * 7919 + i) % 50_000 for i in range(BLOCK)]
    (h,) = block_hashes(tokens, BLOCK, ns)
    gen = torch.Generator().manual_seed(seed)
    kv = {
        "keys": [torch.randn(heads, BLOCK, HEAD_DIM, generator=gen).bfloat16() for _ in range(layers)],
        "values": [torch.randn(heads, BLOCK, HEAD_DIM, generator=gen).bfloat16() for _ in range(layers)],
    }
    ident = {"namespace": ns, "parent": ns, "block_hash": h, "token_ids": tokens}
    return {**ident, **kv}, encode_block(**ident, **kv)


# -- sections ----------------------------------------------------------------------------------


def bench_hashing(reps: int) -> dict[str, float]:
    ns = namespace_hash(model_fingerprint="bench", block_size=BLOCK, tenant="bench")
    tokens = np.random.default_rng(0).integers(0, 150_000, 1000 * BLOCK).tolist()
    seconds = median_s(lambda: block_hashes(tokens, BLOCK, ns), reps)
    return {"us_per_1000_blocks": seconds * 1e6, "block_size": BLOCK}


def bench_trie(reps: int) -> dict[str, float]:
    ns = namespace_hash(model_fingerprint="bench", block_size=BLOCK, tenant="bench")
    prompt = list(range(32 * 1024))
    hashes = block_hashes(prompt, BLOCK, ns)
    trie = PrefixTrie()
    trie.insert(hashes, None, [256 * KIB] * len(hashes))
    match_s = median_s(lambda: trie.match(hashes), reps * 4)
    lock_s = median_s(lambda: trie.unlock(trie.lock(hashes)), reps * 4)

    chains, per_chain = 100, 512  # 51,200 blocks: index size, keys and eviction heap included
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    big = PrefixTrie()
    for c in range(chains):
        keys = [c.to_bytes(4, "little") + i.to_bytes(12, "little") for i in range(per_chain)]
        big.insert(keys, None, [256 * KIB] * per_chain)
        big.match(keys)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    evict_s = median_s(big.evict_one, reps * 20)
    return {
        "blocks": len(hashes),
        "match_32k_tokens_us": match_s * 1e6,
        "lock_unlock_32k_tokens_us": lock_s * 1e6,
        "index_bytes_per_block": (after - before) / (chains * per_chain),
        "evict_one_us": evict_s * 1e6,
    }


def bench_codec(reps: int, batch_bytes: int) -> list[dict[str, Any]]:
    """Two views of each record size. ``hot``: one record at a time, its buffer freed and reused
    (pure CPU cost, all in cache). ``batch``: ``batch_bytes`` of records kept alive, as the memory
    tier keeps them (each new record needs fresh memory, and so does each floor copy)."""
    rows = []
    for size in SIZES:
        kwargs, record = make_record(size)
        ident = {k: kwargs[k] for k in ("namespace", "parent", "block_hash", "token_ids")}
        frozen = bytes(record)  # what a store hands back
        n = len(record)
        count = max(4, batch_bytes // n)

        def encode(kw: dict[str, Any] = kwargs) -> bytearray:
            return encode_block(**kw)

        def decode(b: bytes = frozen, i: dict[str, Any] = ident) -> object:
            return decode_block(b, **i, dtype=torch.bfloat16)

        def copy(r: bytearray = record) -> bytes:
            return bytes(r)

        fns = (("copy", copy), ("enc", encode), ("dec", decode))
        hot = medians(dict(fns), reps * 6)
        batch = medians({name: lambda fn=fn, k=count: [fn() for _ in range(k)] for name, fn in fns}, reps)
        batch = {name: t / count for name, t in batch.items()}
        row: dict[str, Any] = {"record_bytes": n, "layers_x_heads": "x".join(map(str, layout(size)))}
        for label, t in (("hot", hot), ("batch", batch)):
            row[f"{label}_copy_gbps"] = gbps(n, t["copy"])
            row[f"{label}_encode_gbps"] = gbps(n, t["enc"])
            row[f"{label}_decode_gbps"] = gbps(n, t["dec"])
            row[f"{label}_encode_ratio"] = t["copy"] / t["enc"]
            row[f"{label}_decode_ratio"] = t["copy"] / t["dec"]
        rows.append(row)
    return rows


def _records(size: int, total: int) -> list[tuple[bytes, bytes]]:
    count = max(4, total // size)
    _, base = make_record(size)
    payload = bytes(base)
    return [(uuid.uuid4().bytes, payload) for _ in range(count)]


def _row(store: str, op: str, size: int, nbytes: int, store_s: float, floor_s: float) -> dict[str, Any]:
    return {
        "store": store,
        "op": op,
        "record_bytes": size,
        "gbps": gbps(nbytes, store_s),
        "floor_gbps": gbps(nbytes, floor_s),
        "ratio": floor_s / store_s,
    }


def bench_memory(size: int, items: list[tuple[bytes, bytes]], reps: int) -> list[dict[str, Any]]:
    nbytes = sum(len(v) for _, v in items)
    keys = [k for k, _ in items]
    values = [bytearray(v) for _, v in items]
    store = MemoryStore(2 * nbytes)
    t = medians(
        {
            "put": (store.clear, lambda: store.put_many(items)),
            "get": lambda: store.get_many(keys),
            "copy": lambda: [bytes(v) for v in values],
        },
        reps,
    )
    put_s, get_s, copy_s = t["put"], t["get"], t["copy"]
    return [
        _row("memory", "put", size, nbytes, put_s, copy_s),
        _row("memory", "get", size, nbytes, get_s, copy_s),
    ]


def bench_disk(size: int, items: list[tuple[bytes, bytes]], reps: int, root: Path) -> list[dict[str, Any]]:
    nbytes = sum(len(v) for _, v in items)
    keys = [k for k, _ in items]
    store = DiskStore(root / f"store-{size}", 4 * nbytes + MIB)
    raw_dir = root / f"raw-{size}"
    raw_dir.mkdir()
    raw_paths = [raw_dir / k.hex() for k in keys]

    def raw_put() -> None:
        for path, (_, value) in zip(raw_paths, items, strict=True):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, value)
                os.fsync(fd)
            finally:
                os.close(fd)

    def raw_get() -> list[bytearray]:
        out = []  # kept, like get_many's result: each read needs fresh memory
        for path in raw_paths:
            with open(path, "rb", buffering=0) as f:
                buf = bytearray(os.fstat(f.fileno()).st_size)
                f.readinto(buf)
                out.append(buf)
        return out

    t = medians({"put": (store.clear, lambda: store.put_many(items)), "raw_put": raw_put}, reps)
    t |= medians({"get": lambda: store.get_many(keys), "raw_get": raw_get}, reps)
    put_s, raw_put_s, get_s, raw_get_s = t["put"], t["raw_put"], t["get"], t["raw_get"]
    if sum(v is not None for v in store.get_many(keys)) != len(keys):
        raise RuntimeError("disk store lost records during the benchmark")
    store.clear()
    return [
        _row("disk", "put", size, nbytes, put_s, raw_put_s),
        _row("disk", "get", size, nbytes, get_s, raw_get_s),
    ]


def bench_redis(
    size: int, items: list[tuple[bytes, bytes]], reps: int, url: str, prefix: str
) -> list[dict[str, Any]]:
    nbytes = sum(len(v) for _, v in items)
    keys = [k for k, _ in items]
    store = RedisStore(url, prefix=f"{prefix}store:", timeout_ms=5000)
    raw = redis.Redis.from_url(url, socket_timeout=5)
    raw_keys = [f"{prefix}raw:{k.hex()}".encode() for k in keys]
    try:

        def raw_put() -> None:
            pipe = raw.pipeline(transaction=False)
            for rk, (_, value) in zip(raw_keys, items, strict=True):
                pipe.set(rk, value)
            pipe.execute()

        t = medians({"put": lambda: store.put_many(items), "raw_put": raw_put}, reps)
        t |= medians({"get": lambda: store.get_many(keys), "raw_get": lambda: raw.mget(raw_keys)}, reps)
        put_s, raw_put_s, get_s, raw_get_s = t["put"], t["raw_put"], t["get"], t["raw_get"]
        if sum(v is not None for v in store.get_many(keys)) != len(keys):
            raise RuntimeError(f"redis store missed records (errors: {store.stats().errors})")
    finally:
        store.clear()
        raw.delete(*raw_keys)
        store.close()
        raw.close()
    return [
        _row("redis", "put", size, nbytes, put_s, raw_put_s),
        _row("redis", "get", size, nbytes, get_s, raw_get_s),
    ]


# -- report ------------------------------------------------------------------------------------


def _size(n: int) -> str:
    return f"{n // MIB} MiB" if n >= MIB else f"{n // KIB} KiB"


def print_report(result: dict[str, Any]) -> None:
    h, t = result["hashing"], result["trie"]
    m = result["machine"]
    load = m["load_avg_1m_at_start"]
    print(f"\n## cache_store benchmark ({m['cpu']}, {m['cores']} cores, load average {load:.1f})\n")
    print(f"- hashing: {h['us_per_1000_blocks']:.0f} µs per 1,000 blocks of {h['block_size']} tokens")
    print(
        f"- trie: match of a 32k-token prompt ({t['blocks']} blocks) {t['match_32k_tokens_us']:.0f} µs, "
        f"lock+unlock {t['lock_unlock_32k_tokens_us']:.0f} µs, evict_one {t['evict_one_us']:.1f} µs, "
        f"{t['index_bytes_per_block']:.0f} bytes of index per block"
    )
    print("\n| codec, bf16 | layers x heads | mode | copy GB/s | encode GB/s (ratio) | decode GB/s (ratio) |")
    print("|---|---|---|---|---|---|")
    for r in result["codec"]:
        for m in ("hot", "batch"):
            print(
                f"| {_size(r['record_bytes'])} | {r['layers_x_heads']} | {m} | {r[m + '_copy_gbps']:.1f} | "
                f"{r[m + '_encode_gbps']:.1f} ({r[m + '_encode_ratio']:.2f}) | "
                f"{r[m + '_decode_gbps']:.1f} ({r[m + '_decode_ratio']:.2f}) |"
            )
    print(
        "\nMemoryStore keeps and hands out the very objects (no copy), so its ratio to a copy is "
        "large by construction."
    )
    print("\n| store | op | record | GB/s | raw floor GB/s | ratio |")
    print("|---|---|---|---|---|---|")
    for r in result["stores"]:
        print(
            f"| {r['store']} | {r['op']} | {_size(r['record_bytes'])} | {r['gbps']:.2f} | "
            f"{r['floor_gbps']:.2f} | {r['ratio']:.2f} |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and smaller batches")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    reps = 3 if args.quick else 9
    batch_bytes = (8 if args.quick else 32) * MIB
    torch.set_num_threads(1)

    started = time.perf_counter()
    result: dict[str, Any] = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "load_avg_1m_at_start": os.getloadavg()[0],
        },
        "quick": args.quick,
        "hashing": bench_hashing(reps * 3),
        "trie": bench_trie(reps),
        "codec": bench_codec(reps, batch_bytes),
        "stores": [],
    }
    prefix = f"kvpbench:{uuid.uuid4().hex}:"
    with tempfile.TemporaryDirectory(prefix="kvp-bench-") as tmp:
        for size in SIZES:
            items = _records(size, batch_bytes)
            result["stores"] += bench_memory(size, items, reps)
            result["stores"] += bench_disk(size, items, reps, Path(tmp))
            result["stores"] += bench_redis(size, items, reps, args.redis_url, prefix)
    result["seconds"] = time.perf_counter() - started
    print_report(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{result['seconds']:.0f} s; results in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
