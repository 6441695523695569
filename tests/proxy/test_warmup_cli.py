"""`kvproxy warmup`, offline (straight into the stores) and through a server; afterwards the
warmed prompts are hits on every tier."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import redis

from tests.proxy.conftest import BASE_ARGS, ServerFactory
from tests.proxy.helpers import expected_cached, salt, text
from tests.support.live_server import LiveServer

SYSTEM = text(seed=120, words=80)


def _files(tmp_path: Path, seed: int) -> tuple[list[Path], dict[str, object], str]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"topic {seed}"}]
    prompt = text(seed=seed, words=70)
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text(
        "\n".join(
            [
                json.dumps({"messages": messages}),
                "{not json",
                json.dumps({"text": "neither prompt nor messages"}),
                json.dumps({"prompt": prompt}),
                "",
            ]
        )
    )
    plain = tmp_path / "plain.txt"
    plain.write_text(text(seed=seed + 1, words=60))
    return [jsonl, plain], {"messages": messages}, prompt


def _cli(*args: str, cache_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVPROXY_")}
    env["KVPROXY_CACHE_DIR"] = str(cache_dir)
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", "warmup", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )


def _usage(server: LiveServer, path: str, body: dict[str, object]) -> dict:
    resp = httpx.post(server.url + path, json={"model": "demo", "max_tokens": 2, **body}, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()["usage"]


def _assert_hit(usage: dict, tier: str) -> None:
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    assert cached == expected_cached(usage["prompt_tokens"]) > 0
    assert usage["kvproxy"]["cached_by_tier"] == {tier: cached}


def test_offline_warmup_then_hits_on_every_tier(
    tmp_path: Path, kvp_cache_dir: Path, server_factory: ServerFactory, redis_url: str, redis_prefix: str
) -> None:
    files, chat, prompt = _files(tmp_path, seed=121)
    disk = tmp_path / "blocks"
    proc = _cli(
        *map(str, files),
        *BASE_ARGS,
        "--disk-dir",
        str(disk),
        "--redis-url",
        redis_url,
        "--redis-prefix",
        redis_prefix,
        cache_dir=kvp_cache_dir,
    )
    assert proc.returncode == 0, proc.stderr
    assert "prompts.jsonl:2" in proc.stderr and "prompts.jsonl:3" in proc.stderr  # bad lines, by number
    assert "warmed 3 prompts" in proc.stdout and "2 skipped" in proc.stdout

    from_disk = server_factory("--disk-dir", str(disk))
    _assert_hit(_usage(from_disk, "/v1/chat/completions", chat), "disk")
    _assert_hit(_usage(from_disk, "/v1/chat/completions", chat), "memory")  # promoted on the way
    from_redis = server_factory("--no-disk", "--redis-url", redis_url, "--redis-prefix", redis_prefix)
    _assert_hit(_usage(from_redis, "/v1/completions", {"prompt": prompt}), "redis")


def test_warmup_through_the_server(
    tmp_path: Path, kvp_cache_dir: Path, server: LiveServer, redis_url: str, session_redis_prefix: str
) -> None:
    files, chat, prompt = _files(tmp_path, seed=131)
    tenant = f"warm-{salt()[:8]}"  # a namespace of our own on the shared server
    with redis.Redis.from_url(redis_url) as client:
        redis_before = sum(1 for _ in client.scan_iter(match=session_redis_prefix + "*", count=1000))
    disk_before = httpx.get(server.url + "/v1/cache/stats", timeout=10).json()["tiers"]["disk"]["blocks"]

    proc = _cli(*map(str, files), "--server", server.url, "--tenant", tenant, cache_dir=kvp_cache_dir)
    assert proc.returncode == 0, proc.stderr
    assert "prompts.jsonl:2" in proc.stderr
    assert "warmed 3 prompts" in proc.stdout
    written = int(proc.stdout.split("tokens: ")[1].split(" blocks written")[0])
    assert written > 0

    # The warmup answered only after every tier was written.
    stats = httpx.get(server.url + "/v1/cache/stats", timeout=10).json()
    assert stats["tiers"]["disk"]["blocks"] - disk_before == written
    with redis.Redis.from_url(redis_url) as client:
        redis_after = sum(1 for _ in client.scan_iter(match=session_redis_prefix + "*", count=1000))
    assert redis_after - redis_before == written

    # The warmed tenant's namespace is the one a request of that tenant uses: a warmup for the
    # default tenant of the same prompt is a different namespace (so this is a miss) ...
    assert (
        _usage(server, "/v1/completions", {"prompt": prompt})["prompt_tokens_details"]["cached_tokens"] == 0
    )
    # ... and warming the default tenant makes it a memory hit.
    proc = _cli(*map(str, files), "--server", server.url, cache_dir=kvp_cache_dir)
    assert proc.returncode == 0, proc.stderr
    _assert_hit(_usage(server, "/v1/chat/completions", chat), "memory")
