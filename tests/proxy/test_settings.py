"""ServeSettings: sizes, env vars, validation, the startup summary."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from proxy.cli import build_parser, settings_from_args
from proxy.settings import ServeSettings, parse_size, redact_url


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1048576", 1048576),
        (4096, 4096),
        ("512MiB", 512 * 1024**2),
        ("4GiB", 4 * 1024**3),
        ("1.5GiB", int(1.5 * 1024**3)),
        ("10GB", 10 * 1000**3),
        ("64 kib", 64 * 1024),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "12XB", "-5", "1e3"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_defaults_follow_design(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(ServeSettings.model_fields):
        monkeypatch.delenv(f"KVPROXY_{name.upper()}", raising=False)
    s = ServeSettings()
    assert (s.block_size, s.memory_bytes, s.disk_bytes) == (64, 1024**3, 10 * 1024**3)
    assert (s.redis_prefix, s.store_timeout_ms, s.breaker_cooldown_s) == ("kvp:v1:", 200, 10.0)
    assert (s.max_queue, s.default_max_tokens, s.host, s.port) == (64, 256, "127.0.0.1", 8000)
    assert s.disk_dir.parts[-2:] == ("kvproxy", "blocks")
    assert s.model_name == "demo" and s.tiers == ["memory", "disk"]


def test_env_then_flag_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVPROXY_BLOCK_SIZE", "16")
    monkeypatch.setenv("KVPROXY_MEMORY_BYTES", "512MiB")
    monkeypatch.setenv("KVPROXY_NO_DISK", "true")
    args = build_parser().parse_args(["serve", "--block-size", "32"])
    s = settings_from_args(args, ServeSettings.model_fields)
    assert (s.block_size, s.memory_bytes, s.no_disk) == (32, 512 * 1024**2, True)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"block_size": 0},
        {"port": 70000},
        {"redis_url": "http://example.com"},
        {"redis_prefix": ""},
        {"redis_prefix": "kvp:*"},
        {"device": "tpu"},
        {"max_queue": 0},
        {"api_keys": Path("/nonexistent/keys.txt")},
    ],
)
def test_invalid_settings(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        ServeSettings(**kwargs)


def test_summary_never_shows_a_redis_password() -> None:
    s = ServeSettings(redis_url="redis://user:s3cret@redis.example:6380/0", no_disk=True)
    line = s.summary(device="cpu", dtype="float32")
    assert "s3cret" not in line and "user:***@redis.example:6380" in line
    assert "block size 64" in line and "http://127.0.0.1:8000" in line
    assert redact_url("redis://:pw@h/0") == "redis://:***@h/0"
