"""The kvproxy CLI: settings errors, off-loopback warning, a model that cannot load, stats/flush."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.proxy.conftest import ServerFactory
from tests.proxy.helpers import chat_body, text
from tests.support.redis_fixtures import RedisServer, free_port

ADMIN = "sk-admin-cli-0123456789"


def kvproxy(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("KVPROXY_")}
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**base, **(env or {})},
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--block-size", "0"], "--block-size"),
        (["--memory-bytes", "lots"], "--memory-bytes"),
        (["--redis-url", "http://x"], "--redis-url"),
        (["--device", "tpu"], "--device"),
        (["--no-disk", "--disk-dir", "/tmp/x"], "not allowed with argument"),
    ],
)
def test_invalid_options_exit_2_naming_the_flag(args: list[str], needle: str) -> None:
    proc = kvproxy("serve", *args, timeout=60)
    assert proc.returncode == 2
    assert needle in proc.stderr and "Traceback" not in proc.stderr


def test_invalid_env_var_is_named() -> None:
    proc = kvproxy("serve", env={"KVPROXY_MAX_QUEUE": "-3"}, timeout=60)
    assert proc.returncode == 2 and "KVPROXY_MAX_QUEUE" in proc.stderr


def test_unloadable_model_exits_nonzero_and_warns_off_loopback(tmp_path: Path) -> None:
    proc = kvproxy(
        "serve",
        "--host",
        "0.0.0.0",
        "--port",
        str(free_port()),
        "--model",
        str(tmp_path / "none"),
        "--no-disk",
        env={"KVPROXY_CACHE_DIR": str(tmp_path)},
    )
    assert proc.returncode == 1
    assert "no --api-keys" in proc.stderr  # the off-loopback warning
    assert "cannot serve" in proc.stderr and "Traceback" not in proc.stderr


def test_stats_and_flush(server_factory: ServerFactory, tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(f"{ADMIN} ops admin\n")
    server = server_factory("--no-disk", "--api-keys", str(keys))
    body = chat_body(text(seed=140, words=80))
    for _ in range(2):
        resp = httpx.post(
            server.url + "/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {ADMIN}"},
            timeout=60,
        )
        assert resp.status_code == 200

    refused = kvproxy("stats", "--server", server.url)
    assert refused.returncode == 2 and "401" in refused.stderr and "KVPROXY_API_KEY" in refused.stderr
    shown = kvproxy("stats", "--server", server.url, env={"KVPROXY_API_KEY": ADMIN})
    assert shown.returncode == 0, shown.stderr
    for needle in ("token hit rate", "memory", "recent requests", "full_hit"):
        assert needle in shown.stdout
    flushed = kvproxy("flush", "--server", server.url, "--api-key", ADMIN)
    assert flushed.returncode == 0 and "flushed" in flushed.stdout and "not flushed" not in flushed.stdout
    stats = httpx.get(server.url + "/v1/cache/stats", headers={"Authorization": f"Bearer {ADMIN}"}).json()
    assert stats["tiers"]["memory"]["blocks"] == 0


def test_no_server_is_a_one_line_error() -> None:
    proc = kvproxy("stats", "--server", f"http://127.0.0.1:{free_port()}", timeout=60)
    assert proc.returncode == 2 and "cannot reach" in proc.stderr and "Traceback" not in proc.stderr


def test_flush_reports_a_tier_it_could_not_clear(
    server_factory: ServerFactory, private_redis: RedisServer
) -> None:
    server = server_factory("--no-disk", "--redis-url", private_redis.url, "--redis-prefix", "kvptest:flush:")
    resp = httpx.post(
        server.url + "/v1/chat/completions", json=chat_body(text(seed=141, words=80)), timeout=60
    )
    assert resp.status_code == 200
    private_redis.stop()
    flushed = kvproxy("flush", "--server", server.url)
    assert flushed.returncode == 1, flushed.stdout + flushed.stderr
    assert "not flushed: redis" in flushed.stdout
    result = httpx.delete(server.url + "/v1/cache", timeout=30).json()
    assert result["complete"] is False
    assert result["tiers"]["memory"]["ok"] is True and result["tiers"]["redis"]["ok"] is False
