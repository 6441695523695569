"""Helpers for the model_runner tests: loaded tiny models, engines, references from ``generate``."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from cache_store.prefix_cache import PrefixCache
from model_runner.cache_factory import StoreOptions, build_prefix_cache
from model_runner.engine import Engine
from model_runner.loading import LoadedModel, load_model
from model_runner.records import Finished, GenerationRequest, TextDelta
from model_runner.sampling import SamplingParams

BLOCK = 4
MARGIN = 1e-4


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine the threads'
    barriers make each forward ~20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def load_tiny(
    tiny_model_path: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], LoadedModel]:
    """``kind -> LoadedModel`` (CPU, float32), loaded once per session."""
    loaded: dict[str, LoadedModel] = {}
    cache_dir = tmp_path_factory.mktemp("kvproxy-cache")

    def get(kind: str) -> LoadedModel:
        if kind not in loaded:
            loaded[kind] = load_model(str(tiny_model_path(kind)), "cpu", "float32", cache_dir=cache_dir)
        return loaded[kind]

    return get


def make_cache(block_size: int = BLOCK, **options: object) -> PrefixCache:
    return build_prefix_cache(StoreOptions(memory_bytes=64 << 20, **options), block_size)  # type: ignore[arg-type]


def lower_tier_options(tier: str, tmp_path: Path, request: pytest.FixtureRequest) -> dict[str, object]:
    """``StoreOptions`` fields for a disk or Redis tier (Redis: the session's server and a
    prefix of this test's own)."""
    if tier == "disk":
        return {"disk_dir": tmp_path / "blocks"}
    return {
        "redis_url": request.getfixturevalue("redis_url"),
        "redis_prefix": request.getfixturevalue("redis_prefix"),
    }


@dataclass
class RunResult:
    tokens: list[int]
    text: str
    finished: Finished


def run(engine: Engine, prompt: Sequence[int], **sampling: object) -> RunResult:
    """Drain one generation; greedy with 6 new tokens unless told otherwise."""
    params = {"max_tokens": 6, "temperature": 0.0, **sampling}
    events = list(engine.generate(GenerationRequest(list(prompt), SamplingParams(**params))))  # type: ignore[arg-type]
    deltas = [e for e in events if isinstance(e, TextDelta)]
    finished = events[-1]
    if not isinstance(finished, Finished) or any(isinstance(e, Finished) for e in events[:-1]):
        raise AssertionError(f"the stream must end with exactly one Finished: {events}")
    return RunResult([t for d in deltas for t in d.token_ids], "".join(d.text for d in deltas), finished)


def reference(loaded: LoadedModel, prompt: Sequence[int], max_new_tokens: int = 6) -> list[int]:
    """Greedy tokens from plain ``model.generate`` on the full prompt, asserting every step's
    top-1/top-2 logit margin exceeds ``MARGIN`` (so a 1e-6 numeric difference cannot flip it)."""
    ids = torch.tensor([list(prompt)])
    with torch.inference_mode():
        out = loaded.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
            pad_token_id=loaded.tokenizer.pad_token_id,
        )
    for step, logits in enumerate(out.logits):
        top = torch.topk(logits[0].float(), 2).values
        margin = float(top[0] - top[1])
        if margin <= MARGIN:
            raise AssertionError(
                f"reference step {step} is a near tie (margin {margin}); pick another prompt"
            )
    return out.sequences[0, len(prompt) :].tolist()


def base_tokens(loaded: LoadedModel, n: int, seed: int = 0) -> list[int]:
    """``n`` deterministic token ids from the model's vocabulary (no special tokens)."""
    special = set(loaded.tokenizer.all_special_ids)
    vocab = len(loaded.tokenizer)
    gen = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    while len(ids) < n:
        t = int(torch.randint(0, vocab, (1,), generator=gen))
        if t not in special:
            ids.append(t)
    return ids
