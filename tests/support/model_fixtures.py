"""Tiny models built in code (random weights + a tokenizer trained in a second).

Session-scoped: each model is built once per test run into a temp dir and reused. Use
``tiny_model_path("llama")`` (any key of ``TINY_MODELS``) or the named fixtures below. The
``isolated_cache_dir`` fixture points ``KVPROXY_CACHE_DIR`` at a temp dir for one test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.tiny_models import TINY_MODELS, build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """A function ``kind -> saved model dir`` that builds each tiny model once per session."""
    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            if kind not in TINY_MODELS:
                raise ValueError(f"unknown tiny model {kind!r}")
            built[kind] = build_tiny_model(kind, tmp_path_factory.mktemp(f"tiny-{kind}"))
        return built[kind]

    return get


@pytest.fixture(scope="session")
def tiny_llama_path(tiny_model_path: Callable[[str], Path]) -> Path:
    return tiny_model_path("llama")


@pytest.fixture(scope="session")
def tiny_qwen2_path(tiny_model_path: Callable[[str], Path]) -> Path:
    return tiny_model_path("qwen2")


@pytest.fixture(scope="session")
def tiny_mistral_path(tiny_model_path: Callable[[str], Path]) -> Path:
    return tiny_model_path("mistral")


@pytest.fixture(scope="session")
def tiny_gpt2_path(tiny_model_path: Callable[[str], Path]) -> Path:
    return tiny_model_path("gpt2")


@pytest.fixture(scope="session")
def tiny_sliding_path(tiny_model_path: Callable[[str], Path]) -> Path:
    """Gemma2 with a 6-token sliding window: not prefix-cacheable."""
    return tiny_model_path("sliding")


@pytest.fixture(scope="session")
def tiny_hybrid_path(tiny_model_path: Callable[[str], Path]) -> Path:
    """LFM2 (a convolution layer with recurrent state + an attention layer): cached at block boundaries."""
    return tiny_model_path("hybrid")


@pytest.fixture
def isolated_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """``KVPROXY_CACHE_DIR`` set to a fresh temp dir for one test (fingerprint cache, demo model)."""
    cache_dir = tmp_path / "kvproxy-cache"
    monkeypatch.setenv("KVPROXY_CACHE_DIR", str(cache_dir))
    yield cache_dir
