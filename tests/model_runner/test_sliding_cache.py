"""Sliding-window models are prefix-cached on the packed path, exactly.

The packed path keeps every token's K/V of every layer in the request's buffers (the window is a
mask in ``model_runner.attention``), so a block holds every layer's K/V and a restore is what a
prefill would have computed. Gemma 2 (a 6-token window), Gemma 3 (two local layers with their own
RoPE base per global one, an 11-token window) and gpt-oss (a 5-token window, attention sinks,
experts) with blocks of 4 (windows wider than a block) and 16 (narrower), prefixes shorter and
longer than the window, ending on and off block boundaries. Every case proves the restore
happened: the tokens that enter the model (a hook on the input embeddings) are the uncached
suffix only. Batched and lower-tier restores of these models are in ``test_batching``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from model_runner.capability import analyze_cache_support
from model_runner.engine import Engine
from model_runner.loading import LoadedModel, load_model
from model_runner.records import GenerationRequest
from tests.model_runner.conftest import MARGIN, base_tokens, make_cache, run

SLIDING_KINDS = ["sliding", "gemma3", "gptoss"]


@contextmanager
def tokens_entering(loaded: LoadedModel) -> Iterator[list[int]]:
    """Counts the token ids every forward feeds the model (the input embeddings see them all)."""
    fed = [0]

    def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        fed[0] += int(args[0].numel())

    handle = loaded.model.get_input_embeddings().register_forward_hook(hook)
    try:
        yield fed
    finally:
        handle.remove()


def greedy_reference(loaded: LoadedModel, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """``model.generate`` on the full prompt: its greedy tokens up to the first step whose top-1 /
    top-2 margin is below ``MARGIN`` (a tie a 1e-6 difference could flip), and the first logits."""
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = loaded.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=steps,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
            pad_token_id=loaded.tokenizer.pad_token_id,
        )
    tokens = out.sequences[0, len(prompt) :].tolist()
    for step, logits in enumerate(out.logits):
        top = torch.topk(logits[0].float(), 2).values
        if float(top[0] - top[1]) <= MARGIN:
            return tokens[:step], out.logits[0][0].float()
    return tokens, out.logits[0][0].float()


def test_sliding_layers_are_cacheable_only_where_every_token_is_kept(
    load_tiny: Callable[[str], LoadedModel],
) -> None:
    for kind in SLIDING_KINDS:
        loaded = load_tiny(kind)
        assert loaded.cacheable, loaded.cache_reason
        assert "sliding-window layer(s) cached whole" in loaded.cache_reason
        config = loaded.model.config
        # The serial path's DynamicCache drops what slides out: not cacheable there.
        assert not analyze_cache_support(config, 512).cacheable
        assert analyze_cache_support(config, 512, keeps_every_token=True).cacheable


@pytest.mark.parametrize("block", [4, 16])
@pytest.mark.parametrize("kind", SLIDING_KINDS)
def test_restored_sliding_prefixes_equal_a_full_prefill(
    kind: str, block: int, load_tiny: Callable[[str], LoadedModel]
) -> None:
    loaded = load_tiny(kind)
    first_logits: dict[int, torch.Tensor] = {}

    def keep_first(request: GenerationRequest, logits: torch.Tensor) -> None:
        first_logits.setdefault(len(request.prompt_ids), logits.detach().float().clone())

    engine = Engine(loaded, make_cache(block), block, logits_hook=keep_first)
    base = base_tokens(loaded, 48, seed=31)
    tail = base_tokens(loaded, 5, seed=32)
    cases = [
        # (prompt, tokens that must come from the cache)
        (base[:37], 0),  # cold
        (base[:37], 36 // block * block),  # a repeat, off a block boundary
        (base[:32], min(32 // block * block, 31)),  # a prefix of it, on a block boundary
        (base[:8] + tail, 8 // block * block),  # shares 8 tokens, shorter than every window here
        (base[:44] + tail, 37 // block * block),  # extends the first prompt past every window
    ]
    try:
        for prompt, cached in cases:
            first_logits.clear()
            with tokens_entering(loaded) as fed:
                result = run(engine, prompt, max_tokens=6)
            usage = result.finished.usage
            assert usage.cached_tokens >= cached, (prompt, usage)
            assert fed[0] == len(prompt) - usage.cached_tokens + max(usage.completion_tokens - 1, 0), (
                "only the uncached suffix (and the decode steps) may enter the model"
            )
            ref, ref_logits = greedy_reference(loaded, prompt, 6)
            assert result.tokens[: len(ref)] == ref
            diff = float((first_logits[len(prompt)] - ref_logits).abs().max())
            assert diff < MARGIN, diff
        assert engine.stats().prefilled_tokens < sum(len(p) for p, _ in cases)
    finally:
        engine.close()


def test_the_log_says_how_sliding_layers_are_cached(
    tiny_model_path: Callable[[str], Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO", logger="model_runner.loading"):
        load_model(str(tiny_model_path("gemma3")), "cpu", "float32", cache_dir=tmp_path)
    assert (
        "1 full-attention layer(s) store their K/V per block; 2 sliding-window layer(s) cached whole"
        in caplog.text
    )
