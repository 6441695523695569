"""build_prefix_cache assembles the tiers the store options ask for, in read order."""

from __future__ import annotations

from pathlib import Path

import pytest

from model_runner.cache_factory import StoreOptions, build_prefix_cache, default_disk_dir


def test_memory_only(tmp_path: Path) -> None:
    cache = build_prefix_cache(StoreOptions(memory_bytes=1 << 20), 16)
    assert cache.block_size == 16
    assert cache.store.memory.max_bytes == 1 << 20
    assert [t.name for t in cache.store.lower] == []
    cache.store.close()


def test_disk_then_redis(tmp_path: Path, redis_url: str, redis_prefix: str) -> None:
    options = StoreOptions(
        disk_dir=tmp_path / "blocks", disk_bytes=1 << 20, redis_url=redis_url, redis_prefix=redis_prefix
    )
    cache = build_prefix_cache(options, 8)
    assert [t.name for t in cache.store.lower] == ["disk", "redis"]
    cache.store.close()


def test_default_disk_dir_follows_the_cache_dir(isolated_cache_dir: Path) -> None:
    assert default_disk_dir() == isolated_cache_dir / "blocks"


@pytest.mark.parametrize(
    "kwargs",
    [{"memory_bytes": -1}, {"disk_bytes": -1}, {"store_timeout_ms": 0}, {"breaker_cooldown_s": -1.0}],
)
def test_invalid_options(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        StoreOptions(**kwargs)  # type: ignore[arg-type]
