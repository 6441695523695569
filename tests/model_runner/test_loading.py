"""Loading: local paths, the demo model, options and their errors."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from model_runner.cache_factory import StoreOptions, build_prefix_cache
from model_runner.demo import build_demo_model, demo_model_dir, ensure_demo_model
from model_runner.engine import Engine
from model_runner.fingerprint import model_fingerprint
from model_runner.loading import (
    InvalidOption,
    LoadError,
    ModelNotFound,
    load_model,
    resolve_device,
    resolve_dtype,
)
from model_runner.records import Finished, GenerationRequest
from model_runner.sampling import SamplingParams


def test_loads_a_local_dir(tiny_model_path: Callable[[str], Path], isolated_cache_dir: Path) -> None:
    path = tiny_model_path("llama")
    loaded = load_model(str(path), "auto", "auto")
    assert loaded.model_id == str(path)
    assert loaded.device == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert loaded.dtype == (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    assert loaded.max_context == 512
    assert loaded.cacheable
    assert len(loaded.fingerprint) == 32
    assert loaded.tokenizer.chat_template
    assert (isolated_cache_dir / "fingerprints.json").is_file()
    assert not loaded.model.training


def test_dtype_is_applied_and_enters_the_fingerprint(
    tiny_model_path: Callable[[str], Path], isolated_cache_dir: Path
) -> None:
    path = str(tiny_model_path("llama"))
    f32 = load_model(path, "cpu", "float32")
    bf16 = load_model(path, "cpu", "bfloat16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    assert f32.fingerprint != bf16.fingerprint


def test_max_context_option(tiny_model_path: Callable[[str], Path], isolated_cache_dir: Path) -> None:
    path = str(tiny_model_path("llama"))
    assert load_model(path, "cpu", "float32", max_context=100).max_context == 100
    with pytest.raises(InvalidOption, match="max_context"):
        load_model(path, "cpu", "float32", max_context=513)


@pytest.mark.parametrize(
    ("model", "error"),
    [
        ("/nonexistent/model/dir", ModelNotFound),
        ("./relative/missing", ModelNotFound),
        ("a/b/c", ModelNotFound),
    ],
)
def test_bad_model_paths(model: str, error: type[Exception], isolated_cache_dir: Path) -> None:
    with pytest.raises(error):
        load_model(model, "cpu", "float32")


def test_a_dir_that_is_not_a_model(tmp_path: Path, isolated_cache_dir: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound, match=r"config\.json"):
        load_model(str(tmp_path / "empty"), "cpu", "float32")


def test_a_hub_id_without_network_is_a_clear_error(
    isolated_cache_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelNotFound, match="hub"):
        load_model("nobody/no-such-model", "cpu", "float32")


@pytest.mark.parametrize(("device", "dtype"), [("tpu", "auto"), ("cpu", "float64"), ("cpu", "fp8")])
def test_bad_options(device: str, dtype: str, isolated_cache_dir: Path) -> None:
    with pytest.raises(InvalidOption):
        load_model("demo", device, dtype)


def test_cuda_without_cuda_is_an_error() -> None:
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
        return
    with pytest.raises(InvalidOption, match="CUDA"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16


def test_load_errors_are_value_errors() -> None:
    assert issubclass(LoadError, ValueError)
    assert issubclass(ModelNotFound, LoadError) and issubclass(InvalidOption, LoadError)


def test_demo_is_the_default_built_once_and_reused(isolated_cache_dir: Path) -> None:
    loaded = load_model(None, "cpu", "auto")
    assert loaded.model_id == "demo"
    assert loaded.cacheable
    assert loaded.max_context == 4096
    target = demo_model_dir(isolated_cache_dir)
    stamp = os.stat(target / "model.safetensors").st_mtime_ns
    again = load_model("demo", "cpu", "auto")
    assert os.stat(target / "model.safetensors").st_mtime_ns == stamp
    assert again.fingerprint == loaded.fingerprint
    ids = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello!"}], add_generation_prompt=True, tokenize=False
    )
    assert ids.endswith("<|im_start|>assistant\n")
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("café 🙂 ok")) == "café 🙂 ok"
    engine = Engine(loaded, build_prefix_cache(StoreOptions(memory_bytes=1 << 26), 16), 16)
    prompt = engine.encode_chat([{"role": "system", "content": "You are a helpful assistant."}] * 3)
    request = GenerationRequest(prompt, SamplingParams(max_tokens=3, temperature=0.0))
    first = list(engine.generate(request))[-1]
    second = list(engine.generate(request))[-1]
    assert isinstance(first, Finished) and isinstance(second, Finished)
    assert second.usage.cached_tokens == min(len(prompt) // 16 * 16, len(prompt) - 1) > 0


def test_demo_builds_are_byte_identical(tmp_path: Path) -> None:
    a = build_demo_model(tmp_path / "a")
    b = ensure_demo_model(tmp_path / "cache")
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert model_fingerprint(a, dtype="float32") == model_fingerprint(b, dtype="float32")
