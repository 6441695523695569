"""Blocks outlive a server: two servers sharing one Redis hit each other's prompts; a server
restarted on the same disk dir hits on its first request."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from tests.proxy.conftest import ServerFactory
from tests.proxy.helpers import chat_body, expected_cached, salt, text
from tests.support.live_server import LiveServer


def _chat(server: LiveServer, body: dict[str, object]) -> dict[str, object]:
    resp = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_two_servers_share_redis(
    server: LiveServer, server_factory: ServerFactory, redis_url: str, session_redis_prefix: str
) -> None:
    # Same Redis prefix as the shared server, no disk tier: only Redis can carry the blocks.
    other = server_factory("--no-disk", "--redis-url", redis_url, "--redis-prefix", session_redis_prefix)
    body = chat_body(text(seed=31, words=120), cache_salt=salt())
    first = _chat(server, body)
    _wait_written(server)  # Redis is written in the background, after the response
    second = _chat(other, body)
    usage = second["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == expected_cached(usage["prompt_tokens"]), usage
    assert usage["kvproxy"]["cached_by_tier"] == {"redis": usage["prompt_tokens_details"]["cached_tokens"]}
    assert second["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]


def test_restart_on_same_disk_dir_hits_first_request(server_factory: ServerFactory, tmp_path: Path) -> None:
    disk = tmp_path / "blocks"
    body = chat_body(text(seed=32, words=120))
    first_server = server_factory("--disk-dir", str(disk))
    first = _chat(first_server, body)
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    first_server.stop()  # SIGTERM drains the disk writer
    restarted = server_factory("--disk-dir", str(disk))
    again = _chat(restarted, body)
    usage = again["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == expected_cached(usage["prompt_tokens"]), usage
    assert usage["kvproxy"]["cached_by_tier"] == {"disk": usage["prompt_tokens_details"]["cached_tokens"]}
    assert again["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]


def _wait_written(server: LiveServer, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        writer = httpx.get(server.url + "/v1/cache/stats", timeout=5).json()["writer"]
        if writer["queued"] == 0:
            return
        time.sleep(0.05)
    raise AssertionError("the store writer did not drain")
