"""A restored prefix gives the same output as a full prefill (CPU, float32).

References come from plain transformers (a full forward, ``model.generate``) and must have a
top-1/top-2 margin above 1e-4 at every compared step, so equality is meaningful.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from cache_store.hashing import namespace_hash
from model_runner import kv
from model_runner.engine import Engine
from model_runner.loading import LoadedModel
from tests.model_runner.conftest import (
    BLOCK,
    MARGIN,
    base_tokens,
    lower_tier_options,
    make_cache,
    reference,
    run,
)

CACHED_KINDS = ["llama", "qwen2", "mistral", "gpt2"]


def shared_prefix_prompts(loaded: LoadedModel) -> list[list[int]]:
    """22 prompts in serving order. Shared prefixes end at offsets that are and are not multiples
    of the block size; some prompts are entirely cached by the time they come."""
    base = base_tokens(loaded, 40, seed=1)
    prompts: list[list[int]] = []
    for j, shared in enumerate([5, 7, 8, 10, 12, 13, 16, 18, 21, 24, 27, 32]):
        tail = base_tokens(loaded, 3 + j % 4, seed=100 + j)
        prompts.append(base[:shared] + tail)
    prompts.append(base[:36])  # 9 full blocks, most of them cached already
    prompts.append(base[:36])  # entirely cached: restored minus one token, which is prefilled
    prompts.append(base[:20])  # a strict prefix of an earlier prompt, block-aligned
    prompts.append(base[:22])  # a strict prefix, not block-aligned
    prompts.append(base[:40])
    prompts.append(base[:40] + base_tokens(loaded, 5, seed=7))
    other = base_tokens(loaded, 17, seed=2)
    prompts.append(other)  # nothing shared
    prompts.append(other + base_tokens(loaded, 2, seed=8))
    prompts.append(other[:3])  # shorter than one block
    prompts.append(other[:9])
    return prompts


def _strip_eos(tokens: list[int], loaded: LoadedModel) -> list[int]:
    eos = loaded.tokenizer.eos_token_id
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


@pytest.mark.parametrize("kind", CACHED_KINDS)
def test_restored_logits_equal_full_prefill(kind: str, load_tiny: Callable[[str], LoadedModel]) -> None:
    loaded = load_tiny(kind)
    assert loaded.cacheable, loaded.cache_reason
    engine = Engine(loaded, make_cache(), BLOCK)
    prompt = base_tokens(loaded, 30, seed=3)
    engine.warmup(prompt)
    namespace = namespace_hash(model_fingerprint=loaded.fingerprint, block_size=BLOCK, tenant="default")
    cache = engine.prefix_cache
    assert cache is not None
    with torch.inference_mode():
        full = loaded.model(torch.tensor([prompt])).logits[0, -1]
    top = torch.topk(full, 2).values
    assert float(top[0] - top[1]) > MARGIN
    for cut in (4, 5, 11, 16, 27, 28):
        with torch.inference_mode():
            with cache.lookup(namespace, prompt, dtype=torch.float32, layer_shapes=None) as hit:
                assert len(hit.blocks) == 7
                past = kv.build_cache(loaded.model.config, hit.blocks, cut, torch.device("cpu"))
            assert past.get_seq_length() == cut
            suffix = torch.tensor([prompt[cut:]])
            positions = torch.arange(cut, len(prompt)).unsqueeze(0)
            cache_kw = kv.cache_argument(loaded.model)
            out = loaded.model(input_ids=suffix, position_ids=positions, logits_to_keep=1, **{cache_kw: past})
        diff = (out.logits[0, -1] - full).abs().max().item()
        assert diff <= 1e-5, f"cut {cut}: max abs diff {diff}"


@pytest.mark.parametrize("kind", CACHED_KINDS)
def test_greedy_equals_generate_with_shared_prefixes(
    kind: str, load_tiny: Callable[[str], LoadedModel]
) -> None:
    loaded = load_tiny(kind)
    engine = Engine(loaded, make_cache(), BLOCK)
    prompts = shared_prefix_prompts(loaded)
    assert len(prompts) >= 20
    cached_runs = 0
    for i, prompt in enumerate(prompts):
        expected = _strip_eos(reference(loaded, prompt), loaded)
        result = run(engine, prompt)
        assert result.tokens == expected, f"prompt {i}"
        usage = result.finished.usage
        assert usage.prompt_tokens == len(prompt)
        assert usage.cached_tokens + usage.prefilled_tokens == len(prompt)
        assert usage.cached_tokens <= len(prompt) - 1
        assert usage.cached_tokens % BLOCK == 0 or usage.cached_tokens == len(prompt) - 1
        if i > 0 and prompt[:BLOCK] == prompts[0][:BLOCK]:
            assert usage.cached_tokens > 0, f"prompt {i} shares a block and must be served from cache"
        cached_runs += usage.cached_tokens > 0
    entirely = run(engine, prompts[13]).finished.usage
    assert entirely.miss_reason == "full_hit"
    assert entirely.cached_tokens == len(prompts[13]) - 1
    assert cached_runs >= 12


@pytest.mark.parametrize("tier", ["disk", "redis"])
@pytest.mark.parametrize("kind", CACHED_KINDS)
def test_prefix_from_lower_tier(
    kind: str, tier: str, load_tiny: Callable[[str], LoadedModel], tmp_path, request: pytest.FixtureRequest
) -> None:
    loaded = load_tiny(kind)
    options = lower_tier_options(tier, tmp_path, request)
    prompts = shared_prefix_prompts(loaded)[:12]
    writer = make_cache(**options)
    writer_engine = Engine(loaded, writer, BLOCK)
    for prompt in prompts:
        writer_engine.warmup(prompt)
    assert writer.store.drain(10.0)
    writer.store.close()

    reader = make_cache(**options)  # empty memory: every block comes from the lower tier
    engine = Engine(loaded, reader, BLOCK)
    for i, prompt in enumerate(prompts):
        result = run(engine, prompt)
        assert result.tokens == _strip_eos(reference(loaded, prompt), loaded), f"prompt {i}"
        usage = result.finished.usage
        assert usage.cached_tokens > 0
        assert sum(usage.cached_by_tier.values()) == usage.cached_tokens
        if i == 0:
            assert usage.cached_by_tier == {tier: usage.cached_tokens}
    reader.store.close()


def _populate_disk(loaded: LoadedModel, tmp_path, prompt: list[int]) -> list[bytes]:
    cache = make_cache(disk_dir=tmp_path / "blocks")
    engine = Engine(loaded, cache, BLOCK)
    engine.warmup(prompt)
    assert cache.store.drain(10.0)
    namespace = namespace_hash(model_fingerprint=loaded.fingerprint, block_size=BLOCK, tenant="default")
    hashes = cache.lookup(namespace, prompt, dtype=torch.float32, layer_shapes=None)
    hashes.release()
    cache.store.close()
    return hashes.hashes


@pytest.mark.parametrize("damage", ["corrupt", "collision"])
def test_bad_record_is_a_miss_from_that_block_on(
    damage: str, load_tiny: Callable[[str], LoadedModel], tmp_path
) -> None:
    loaded = load_tiny("llama")
    prompt = base_tokens(loaded, 26, seed=5)
    hashes = _populate_disk(loaded, tmp_path, prompt)
    bad = 3
    cache = make_cache(disk_dir=tmp_path / "blocks")
    disk = cache.store.lower[0]
    (record,) = disk.get_many([hashes[bad]])
    assert record is not None
    if damage == "corrupt":
        broken = bytearray(record)
        broken[-1] ^= 0xFF  # a flipped payload byte: the checksum no longer matches
    else:
        (broken,) = disk.get_many([hashes[0]])  # a valid record of block 0 under block 3's key
    disk.put_many([(hashes[bad], bytes(broken))])

    engine = Engine(loaded, cache, BLOCK)
    result = run(engine, prompt)
    usage = result.finished.usage
    assert usage.miss_reason == "verification_failed"
    assert usage.miss_block == bad
    assert usage.cached_tokens == bad * BLOCK
    assert result.tokens == _strip_eos(reference(loaded, prompt), loaded)
    again = run(engine, prompt).finished.usage  # the prompt's blocks were stored afresh
    assert again.miss_reason == "full_hit"
    cache.store.close()


@pytest.mark.parametrize("kind", ["kvshared"])
def test_uncacheable_models_are_served_uncached_and_correct(
    kind: str, load_tiny: Callable[[str], LoadedModel], caplog: pytest.LogCaptureFixture
) -> None:
    loaded = load_tiny(kind)
    assert not loaded.cacheable
    assert "shares another layer's K/V" in loaded.cache_reason
    with caplog.at_level("WARNING"):
        engine = Engine(loaded, make_cache(), BLOCK)
    assert "without prefix caching" in caplog.text
    assert not engine.caching
    base = base_tokens(loaded, 24, seed=4)
    for prompt in (base, base, base[:13] + base_tokens(loaded, 4, seed=9)):
        result = run(engine, prompt)
        assert result.tokens == _strip_eos(reference(loaded, prompt), loaded)
        assert result.finished.usage.cached_tokens == 0
        assert result.finished.usage.miss_reason == "cache_disabled"
