"""Engine behaviour: finish reasons, stop strings, cancellation, pins released, warmup, usage."""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from model_runner.engine import Engine
from model_runner.loading import LoadedModel, load_model
from model_runner.records import (
    ContextLengthExceeded,
    Finished,
    GenerationRequest,
    InvalidTokens,
    TextDelta,
)
from model_runner.sampling import SamplingParams
from tests.model_runner.conftest import BLOCK, base_tokens, make_cache, reference, run


@pytest.fixture
def llama(load_tiny: Callable[[str], LoadedModel]) -> LoadedModel:
    return load_tiny("llama")


def _locked(engine: Engine) -> int:
    assert engine.prefix_cache is not None
    return len(engine.prefix_cache.trie.locked_blocks())


def test_max_tokens_gives_length(llama: LoadedModel) -> None:
    engine = Engine(llama, make_cache(), BLOCK)
    result = run(engine, base_tokens(llama, 10), max_tokens=5)
    assert result.finished.finish_reason == "length"
    assert result.finished.usage.completion_tokens == 5
    assert len(result.tokens) == 5


def test_eos_gives_stop_and_is_not_emitted(
    llama: LoadedModel, tiny_model_path: Callable[[str], Path], tmp_path: Path
) -> None:
    prompt = base_tokens(llama, 10)
    greedy = reference(llama, prompt, max_new_tokens=4)
    # The same weights, with the third greedy token declared an end-of-sequence token.
    fresh = load_model(str(tiny_model_path("llama")), "cpu", "float32", cache_dir=tmp_path)
    fresh.model.generation_config.eos_token_id = [llama.tokenizer.eos_token_id, greedy[2]]
    result = run(Engine(fresh, make_cache(), BLOCK), prompt, max_tokens=10)
    assert result.finished.finish_reason == "stop"
    assert result.tokens == greedy[:2]
    assert result.finished.usage.completion_tokens == 3


def test_stop_string_gives_stop_and_is_never_emitted(llama: LoadedModel) -> None:
    engine = Engine(llama, make_cache(), BLOCK)
    prompt = base_tokens(llama, 12, seed=11)
    full = run(engine, prompt, max_tokens=12).text
    # A two-character stop string from the second half of the text (no replacement chars).
    starts = [i for i in range(len(full) // 2, len(full) - 1) if "\ufffd" not in full[i : i + 2]]
    assert starts, f"the test needs some text to cut: {full!r}"
    stop = full[starts[0] : starts[0] + 2]
    result = run(engine, prompt, max_tokens=12, stop=(stop,))
    assert result.finished.finish_reason == "stop"
    assert stop not in result.text
    assert full.startswith(result.text)
    assert result.text == full[: full.index(stop)]


def test_deltas_concatenate_to_the_decoded_completion(llama: LoadedModel) -> None:
    engine = Engine(llama, make_cache(), BLOCK)
    result = run(engine, base_tokens(llama, 9, seed=12), max_tokens=15)
    assert result.text == llama.tokenizer.decode(result.tokens, skip_special_tokens=True)


def test_cancel_before_start_and_mid_stream(llama: LoadedModel) -> None:
    engine = Engine(llama, make_cache(), BLOCK)
    prompt = base_tokens(llama, 16, seed=13)
    engine.warmup(prompt)
    cancel = threading.Event()
    cancel.set()
    events = list(engine.generate(GenerationRequest(prompt, SamplingParams(max_tokens=50)), cancel))
    assert isinstance(events[-1], Finished) and events[-1].finish_reason == "cancelled"
    assert events[-1].usage.completion_tokens == 0
    assert _locked(engine) == 0

    # Cancelled from the sink, on the engine's thread, at the first delta: the request is still
    # running then, so its restored prefix is pinned; it leaves at the next step.
    seen: list[object] = []
    locked_while_running: list[int] = []
    done = threading.Event()
    handle = None

    def sink(event: object) -> None:
        seen.append(event)
        if isinstance(event, TextDelta) and not locked_while_running:
            locked_while_running.append(_locked(engine))
            assert handle is not None
            handle.cancel()
        if isinstance(event, Finished):
            done.set()

    handle = engine.submit(GenerationRequest(prompt, SamplingParams(max_tokens=50, temperature=0.0)), sink)
    assert done.wait(10)
    event = seen[-1]
    assert isinstance(event, Finished)
    assert locked_while_running == [4]
    assert event.finish_reason == "cancelled"
    assert event.usage.completion_tokens < 50
    assert _locked(engine) == 0


def _wait_until(check: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return check()


def test_closing_the_stream_early_releases_the_pins(llama: LoadedModel) -> None:
    engine = Engine(llama, make_cache(), BLOCK)
    prompt = base_tokens(llama, 16, seed=14)
    engine.warmup(prompt)
    stream = engine.generate(GenerationRequest(prompt, SamplingParams(max_tokens=400, temperature=0.0)))
    first = next(stream)
    assert isinstance(first, TextDelta)
    stream.close()  # the request leaves the batch at the next step and unpins its blocks
    assert _wait_until(lambda: _locked(engine) == 0 and engine.stats().scheduler.running == 0)
    assert engine.stats().cancelled_requests == 1
    # A stream that was never read holds nothing once it ends either.
    engine.generate(GenerationRequest(prompt, SamplingParams(max_tokens=5))).close()
    assert _wait_until(lambda: _locked(engine) == 0 and engine.stats().scheduler.running == 0)


def test_context_length_is_checked_before_any_work(llama: LoadedModel) -> None:
    engine = Engine(llama, make_cache(), BLOCK)
    with pytest.raises(ContextLengthExceeded):
        engine.generate(GenerationRequest(base_tokens(llama, 500), SamplingParams(max_tokens=13)))
    with pytest.raises(ContextLengthExceeded):
        engine.warmup(base_tokens(llama, 513))
    with pytest.raises(InvalidTokens):
        engine.generate(GenerationRequest([1, 2, len(llama.tokenizer) + 5], SamplingParams(max_tokens=1)))
    assert engine.prefix_cache is not None and engine.prefix_cache.stats().lookups == 0


def test_warmup_stores_full_blocks_then_requests_hit(llama: LoadedModel) -> None:
    engine = Engine(llama, make_cache(), BLOCK)
    prompt = base_tokens(llama, 18, seed=15)
    result = engine.warmup(prompt)
    assert (result.prompt_tokens, result.cached_tokens, result.prefilled_tokens) == (18, 0, 16)
    assert result.stored_blocks == 4
    assert engine.warmup(prompt).stored_blocks == 0  # already there
    usage = run(engine, prompt).finished.usage
    assert usage.cached_tokens == 16 and usage.prefilled_tokens == 2
    assert usage.cached_by_tier == {"memory": 16}
    assert usage.miss_reason == "full_hit"
    # The time to the first token, phase by phase.
    assert min(usage.lookup_s, usage.restore_s, usage.prefill_s) > 0
    assert usage.lookup_s + usage.queue_s + usage.restore_s + usage.prefill_s == pytest.approx(
        usage.ttft_s, abs=1e-6
    )


def test_generated_blocks_are_stored_for_the_next_turn(llama: LoadedModel) -> None:
    engine = Engine(llama, make_cache(), BLOCK)
    prompt = base_tokens(llama, 8, seed=16)
    first = run(engine, prompt, max_tokens=9)
    follow_up = prompt + first.tokens + base_tokens(llama, 3, seed=17)
    usage = run(engine, follow_up).finished.usage
    # prompt (8) + the 8 generated tokens whose K/V were computed: 4 blocks.
    assert usage.cached_tokens == 16


def test_usage_reports_misses_and_timings(llama: LoadedModel) -> None:
    engine = Engine(llama, make_cache(), BLOCK)
    usage = run(engine, base_tokens(llama, 3, seed=18)).finished.usage
    assert usage.miss_reason == "short_prompt" and usage.cached_tokens == 0
    usage = run(engine, base_tokens(llama, 9, seed=19)).finished.usage
    assert usage.miss_reason == "no_shared_prefix" and usage.miss_block == 0
    diverged = base_tokens(llama, 9, seed=19)[:5] + base_tokens(llama, 6, seed=20)
    usage = run(engine, diverged).finished.usage
    assert usage.miss_reason == "diverged" and usage.miss_block == 1 and usage.cached_tokens == 4
    assert usage.ttft_s > 0 and usage.decode_s >= 0


def test_tenants_and_salts_do_not_share_blocks(llama: LoadedModel) -> None:
    engine = Engine(llama, make_cache(), BLOCK)
    prompt = base_tokens(llama, 12, seed=21)
    engine.warmup(prompt, tenant="a")

    def cached(tenant: str, salt: str = "") -> int:
        request = GenerationRequest(prompt, SamplingParams(max_tokens=1), tenant=tenant, cache_salt=salt)
        return list(engine.generate(request))[-1].usage.cached_tokens  # type: ignore[union-attr]

    assert cached("a") == 11
    assert cached("b") == 0
    assert cached("a", "salt") == 0


def test_no_cache_serves_uncached(llama: LoadedModel) -> None:
    engine = Engine(llama, None, BLOCK)
    assert engine.cacheable and not engine.caching
    prompt = base_tokens(llama, 10, seed=22)
    result = run(engine, prompt)
    assert result.finished.usage.miss_reason == "cache_disabled"
    assert engine.warmup(prompt).miss_reason == "cache_disabled"


def test_encode_chat_uses_the_template_and_has_a_fallback(llama: LoadedModel) -> None:
    engine = Engine(llama, None, BLOCK)
    ids = engine.encode_chat([{"role": "user", "content": "hi"}])
    assert llama.tokenizer.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert engine.encode_prompt("hi") == llama.tokenizer("hi")["input_ids"]
    bare_tokenizer = type(llama.tokenizer).from_pretrained(llama.model_dir)
    bare_tokenizer.chat_template = None
    bare = Engine(dataclasses.replace(llama, tokenizer=bare_tokenizer), None, BLOCK)
    text = bare_tokenizer.decode(bare.encode_chat([{"role": "user", "content": "hi"}]))
    assert text == "user: hi\nassistant: "


def test_block_size_must_match_the_cache(llama: LoadedModel) -> None:
    with pytest.raises(ValueError, match="block_size"):
        Engine(llama, make_cache(8), BLOCK)


def test_a_window_as_long_as_the_context_is_cached_up_to_its_end(
    tiny_model_path: Callable[[str], Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model_dir = tmp_path / "mistral-w16"
    shutil.copytree(tiny_model_path("mistral"), model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["sliding_window"] = 16
    (model_dir / "config.json").write_text(json.dumps(config))
    loaded = load_model(str(model_dir), "cpu", "float32", cache_dir=tmp_path / "cache")
    assert loaded.max_context == 16 and loaded.cacheable
    engine = Engine(loaded, make_cache(), BLOCK)
    prompt = base_tokens(loaded, 10, seed=23)
    with caplog.at_level("ERROR"):
        first = run(engine, prompt, max_tokens=6)  # 16 tokens: the window is full at the end
    assert "failed" not in caplog.text
    assert first.tokens == reference(loaded, prompt, max_new_tokens=6)[: len(first.tokens)]
    again = run(engine, prompt + first.tokens[:4], max_tokens=2).finished.usage
    assert again.cached_tokens == 12


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(llama: LoadedModel) -> None:
    engine = Engine(llama, make_cache(), BLOCK)
    prompt = base_tokens(llama, 10, seed=24)
    sampled = {"temperature": 1.5, "max_tokens": 12}
    a = run(engine, prompt, seed=5, **sampled).tokens
    assert run(engine, prompt, seed=5, **sampled).tokens == a  # the second run is a cache hit
    others = {tuple(run(engine, prompt, seed=s, **sampled).tokens) for s in range(6, 10)}
    assert others - {tuple(a)}
    greedy = run(engine, prompt, max_tokens=8).tokens
    assert run(engine, prompt, max_tokens=8, temperature=2.0, top_k=1, seed=1).tokens == greedy
