"""The fingerprint changes with anything that changes K/V, and only with that."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from model_runner import fingerprint as fp
from model_runner.fingerprint import FingerprintError, model_fingerprint


@pytest.fixture
def model_copy(tiny_model_path: Callable[[str], Path], tmp_path: Path) -> Path:
    dest = tmp_path / "model"
    shutil.copytree(tiny_model_path("llama"), dest)
    return dest


def test_same_files_in_two_dirs_give_the_same_fingerprint(model_copy: Path, tmp_path: Path) -> None:
    other = tmp_path / "elsewhere" / "copy"
    shutil.copytree(model_copy, other)
    assert model_fingerprint(model_copy, dtype="float32") == model_fingerprint(other, dtype="float32")


def test_same_files_in_two_processes_give_the_same_fingerprint(model_copy: Path) -> None:
    code = "import sys; from pathlib import Path; from model_runner.fingerprint import model_fingerprint; "
    code += "print(model_fingerprint(Path(sys.argv[1]), dtype='float32'))"
    root = Path(__file__).resolve().parents[2]
    outs = {
        subprocess.run(
            [sys.executable, "-c", code, str(model_copy)],
            capture_output=True,
            text=True,
            check=True,
            cwd=root,
            env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"},
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert outs == {model_fingerprint(model_copy, dtype="float32")}


def test_one_changed_weight_changes_it(model_copy: Path) -> None:
    before = model_fingerprint(model_copy, dtype="float32")
    weights = load_file(model_copy / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] += 1e-3
    save_file(weights, model_copy / "model.safetensors", metadata={"format": "pt"})
    assert model_fingerprint(model_copy, dtype="float32") != before


def test_dtype_changes_it(model_copy: Path) -> None:
    assert model_fingerprint(model_copy, dtype="float32") != model_fingerprint(model_copy, dtype="bfloat16")


def test_tokenizer_change_changes_it(model_copy: Path) -> None:
    before = model_fingerprint(model_copy, dtype="float32")
    data = json.loads((model_copy / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = sorted(vocab)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (model_copy / "tokenizer.json").write_text(json.dumps(data))
    assert model_fingerprint(model_copy, dtype="float32") != before


def test_config_change_changes_it(model_copy: Path) -> None:
    before = model_fingerprint(model_copy, dtype="float32")
    config = json.loads((model_copy / "config.json").read_text())
    config["rope_theta"] = 12345.0
    (model_copy / "config.json").write_text(json.dumps(config))
    assert model_fingerprint(model_copy, dtype="float32") != before


def test_readme_does_not_change_it(model_copy: Path) -> None:
    before = model_fingerprint(model_copy, dtype="float32")
    (model_copy / "README.md").write_text("# notes\n")
    assert model_fingerprint(model_copy, dtype="float32") == before


def test_digest_cache_avoids_rehashing_and_notices_rewrites(
    model_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_file = tmp_path / "cache" / "fingerprints.json"
    first = model_fingerprint(model_copy, dtype="float32", cache_file=cache_file)
    assert cache_file.is_file()
    hashed: list[Path] = []
    real = fp.hash_file

    def counting(path: Path) -> str:
        hashed.append(path)
        return real(path)

    monkeypatch.setattr(fp, "hash_file", counting)
    assert model_fingerprint(model_copy, dtype="float32", cache_file=cache_file) == first
    assert hashed == []
    weights = load_file(model_copy / "model.safetensors")
    weights = {k: v + 1 if k == sorted(weights)[0] else v for k, v in weights.items()}
    save_file(weights, model_copy / "model.safetensors", metadata={"format": "pt"})
    assert model_fingerprint(model_copy, dtype="float32", cache_file=cache_file) != first
    assert [p.name for p in hashed] == ["model.safetensors"]


def test_a_broken_digest_cache_is_ignored(model_copy: Path, tmp_path: Path) -> None:
    cache_file = tmp_path / "fingerprints.json"
    cache_file.write_text("{not json")
    assert model_fingerprint(model_copy, dtype="float32", cache_file=cache_file) == model_fingerprint(
        model_copy, dtype="float32"
    )


def test_a_dir_without_model_files_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FingerprintError):
        model_fingerprint(tmp_path, dtype="float32")
