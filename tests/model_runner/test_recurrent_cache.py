"""Models with recurrent layers are prefix-cached exactly: their state after a block boundary is a
section of that block's record, and a prefix is restored up to the last block that carries one.

Four families of tiny random-weight models: LFM2 (a short-convolution layer beside attention),
Qwen3-Next (gated delta-net layers beside gated attention, experts), Granite 4 hybrid (a Mamba-2
layer beside attention) and FalconMamba (a pure state-space model whose Mamba-1 scan restarts
from zero on a multi-token step, so its suffix is fed one token at a time). Blocks of 4 and 16,
prompts ending on and off block boundaries, extended, cut short and sharing a prefix with another
suffix, restored from memory, disk and Redis. Every case checks the first logits against a full
prefill (within 1e-4) and the greedy tokens against ``model.generate``, and proves the restore
happened: the tokens that enter the model are the uncached suffix only.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from model_runner import recurrent
from model_runner.engine import Engine
from model_runner.kv import CacheKV
from model_runner.loading import LoadedModel, load_model
from model_runner.records import GenerationRequest
from model_runner.sampling import SamplingParams
from tests.model_runner.conftest import MARGIN, base_tokens, lower_tier_options, make_cache, run
from tests.model_runner.test_choices_and_logprobs import _run_all
from tests.model_runner.test_sliding_cache import greedy_reference, tokens_entering
from tests.support.tiny_models import build_tiny_model

RECURRENT_KINDS = ["hybrid", "qwen3next", "granitehybrid", "falconmamba"]
CONTINUATION = {"hybrid": "chunk", "qwen3next": "chunk", "granitehybrid": "chunk", "falconmamba": "token"}


class Checked:
    """An engine over ``loaded`` whose runs are checked against a full prefill."""

    def __init__(self, loaded: LoadedModel, engine_cache: object, block: int) -> None:
        self.loaded = loaded
        self.first_logits: dict[int, torch.Tensor] = {}
        self.engine = Engine(loaded, engine_cache, block, logits_hook=self._keep_first)  # type: ignore[arg-type]

    def _keep_first(self, request: GenerationRequest, logits: torch.Tensor) -> None:
        self.first_logits.setdefault(len(request.prompt_ids), logits.detach().float().clone())

    def run(self, prompt: list[int], max_tokens: int = 6) -> tuple[int, list[int]]:
        """Run ``prompt`` (greedy) and check it; returns (cached tokens, generated tokens)."""
        self.first_logits.clear()
        with tokens_entering(self.loaded) as fed:
            result = run(self.engine, prompt, max_tokens=max_tokens)
        usage = result.finished.usage
        assert fed[0] == len(prompt) - usage.cached_tokens + max(usage.completion_tokens - 1, 0), (
            "only the uncached suffix (and the decode steps) may enter the model",
            usage,
        )
        ref, ref_logits = greedy_reference(self.loaded, prompt, max_tokens)
        assert result.tokens[: len(ref)] == ref
        diff = float((self.first_logits[len(prompt)] - ref_logits).abs().max())
        assert diff < MARGIN, diff
        return usage.cached_tokens, result.tokens

    def close(self) -> None:
        self.engine.close()


@pytest.mark.parametrize("kind", RECURRENT_KINDS)
def test_recurrent_models_are_cacheable_with_their_continuation_measured(
    kind: str, load_tiny: Callable[[str], LoadedModel]
) -> None:
    loaded = load_tiny(kind)
    assert loaded.cacheable, loaded.cache_reason
    assert "recurrent layer(s) store their state at block boundaries" in loaded.cache_reason
    assert loaded.state_continuation == CONTINUATION[kind]
    probe = recurrent.probe_continuation(loaded.model, loaded.device, "cache")
    assert probe.mode == CONTINUATION[kind]
    if kind == "falconmamba":
        # The Mamba-1 scan restarts from zero on a multi-token step: far off, while one token at a
        # time continues exactly.
        assert probe.chunk_error > 100 * probe.tolerance and probe.token_error < probe.tolerance


def test_a_state_that_does_not_continue_is_served_uncached(
    load_tiny: Callable[[str], LoadedModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = load_tiny("hybrid")
    real_load = recurrent.load

    def lossy(cache, states, n_tokens, device):  # type: ignore[no-untyped-def]
        real_load(
            cache, [type(s)(s.layer, s.slot, s.index, s.tensor * 0.5) for s in states], n_tokens, device
        )

    monkeypatch.setattr(recurrent, "load", lossy)
    probe = recurrent.probe_continuation(loaded.model, loaded.device, "cache")
    assert probe.mode is None and probe.token_error > probe.tolerance


@pytest.mark.parametrize("block", [4, 16])
@pytest.mark.parametrize("kind", RECURRENT_KINDS)
def test_restored_recurrent_prefixes_equal_a_full_prefill(
    kind: str, block: int, load_tiny: Callable[[str], LoadedModel]
) -> None:
    loaded = load_tiny(kind)
    checked = Checked(loaded, make_cache(block), block)
    layout = checked.engine.state_layout
    assert layout is not None and layout.continuation == CONTINUATION[kind]
    base = base_tokens(loaded, 60, seed=31)
    tail = base_tokens(loaded, 5, seed=32)
    other = base_tokens(loaded, 7, seed=33)
    last = 37 // block * block  # the first prompt's last block boundary: it always keeps its state
    periodic = layout.every * block if layout.continuation == "chunk" else None
    try:
        assert checked.run(base[:37])[0] == 0  # cold
        assert checked.run(base[:37])[0] == last  # a repeat, off a block boundary
        assert checked.run(base[:56] + tail)[0] == last  # extends it
        assert checked.run(base[:last] + other)[0] == last  # shares its prefix, another suffix
        # A prompt that ends on a boundary the first one only passed through: restored from the
        # last periodic state before it (none for a model fed one token at a time after a
        # restore), then it stores its own state there, so the next prompt past it restores all.
        short = last - block
        cached, _ = checked.run(base[:short])
        expected = (short - 1) // periodic * periodic if periodic else 0
        assert cached == expected
        assert checked.run(base[:short] + other)[0] == short
        assert checked.engine.stats().prefilled_tokens < 37 * 6
    finally:
        checked.close()


@pytest.mark.parametrize("block", [4, 16])
@pytest.mark.parametrize("kind", RECURRENT_KINDS)
def test_where_two_prompts_part_a_state_is_stored_for_the_third(
    kind: str, block: int, load_tiny: Callable[[str], LoadedModel]
) -> None:
    """A shared system prompt: the first request stores a state only at its own end, the second
    (another question after the same prefix) restores what it can and takes the state where it
    leaves the cached prefix, and the third restores the whole shared prefix."""
    loaded = load_tiny(kind)
    checked = Checked(loaded, make_cache(block), block)
    # (Seeds 35-37 gave a question where transformers itself, prefilling 20 tokens and continuing
    # the rest, lands 1.1e-4 from one full prefill of the tiny Qwen3-Next: its chunked delta rule
    # in float32 with logits near 13. The bound stays 1e-4; those prompts test nothing of ours.)
    system = base_tokens(loaded, 22, seed=34)
    questions = [base_tokens(loaded, 30, seed=45 + i) for i in range(3)]
    shared = len(system) // block * block
    try:
        assert checked.run(system + questions[0])[0] == 0
        assert checked.run(system + questions[1])[0] == 0  # no state inside the shared prefix yet
        # A model fed one token at a time after a restore prefills a cold prompt in one step (it
        # takes no state on the way: stopping would feed the rest one token at a time).
        expected = shared if CONTINUATION[kind] == "chunk" else 0
        assert checked.run(system + questions[2])[0] == expected
    finally:
        checked.close()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["hybrid", "qwen3next"])
def test_periodic_states_restore_a_long_prefix(kind: str, tmp_path: Path) -> None:
    """Past ``STATE_INTERVAL_MIN_TOKENS`` a long prompt keeps states at its periodic boundaries: a
    prompt that shares most of it restores up to the last one, and stores its branch point."""
    block = 16
    path = build_tiny_model(kind, tmp_path / kind, max_positions=2048)
    loaded = load_model(str(path), "cpu", "float32", cache_dir=tmp_path / "cache")
    checked = Checked(loaded, make_cache(block), block)
    layout = checked.engine.state_layout
    assert layout is not None
    period = layout.every * block
    assert period == recurrent.STATE_INTERVAL_MIN_TOKENS  # the tiny states are far under the K/V rule
    long = base_tokens(loaded, 2 * period + 80, seed=36)
    cut = 2 * period + 25
    try:
        assert checked.run(long, max_tokens=2)[0] == 0
        assert checked.run(long[:cut] + base_tokens(loaded, 5, seed=37), max_tokens=2)[0] == 2 * period
        branch = cut // block * block
        assert checked.run(long[:cut] + base_tokens(loaded, 5, seed=38), max_tokens=2)[0] == branch
    finally:
        checked.close()


@pytest.mark.parametrize("kind", RECURRENT_KINDS)
def test_a_conversation_continues_from_the_state_its_decode_left(
    kind: str, load_tiny: Callable[[str], LoadedModel]
) -> None:
    block = 4
    loaded = load_tiny(kind)
    checked = Checked(loaded, make_cache(block), block)
    try:
        prompt = base_tokens(loaded, 21, seed=41)
        _, generated = checked.run(prompt, max_tokens=12)
        assert len(generated) == 12
        # The next turn repeats the history (the last sampled token was never fed: its state is not
        # there) and adds a question.
        fed = len(prompt) + len(generated) - 1
        turn = prompt + generated + base_tokens(loaded, 6, seed=42)
        cached, _ = checked.run(turn)
        assert cached == fed // block * block
    finally:
        checked.close()


@pytest.mark.parametrize("tier", ["disk", "redis"])
@pytest.mark.parametrize("kind", RECURRENT_KINDS)
def test_states_restore_from_the_lower_tiers(
    kind: str,
    tier: str,
    load_tiny: Callable[[str], LoadedModel],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    block = 16
    loaded = load_tiny(kind)
    options = lower_tier_options(tier, tmp_path, request)
    writer_cache = make_cache(block, **options)
    writer = Checked(loaded, writer_cache, block)
    prompt = base_tokens(loaded, 50, seed=51)
    try:
        writer.run(prompt)
        assert writer_cache.store.drain(10.0)
    finally:
        writer.close()
        writer_cache.store.close()
    # A new process: empty memory, the same lower tier.
    reader_cache = make_cache(block, **options)
    reader = Checked(loaded, reader_cache, block)
    try:
        cached, _ = reader.run(prompt + base_tokens(loaded, 3, seed=52))
        assert cached == 48
        assert reader_cache.stats().hit_blocks.get(tier, 0) == 3
    finally:
        reader.close()
        reader_cache.store.close()


def test_recurrent_requests_take_turns_and_answer_as_alone(load_tiny: Callable[[str], LoadedModel]) -> None:
    """A recurrent layer would read a packed row as one sequence: such a model runs one request
    per step, and concurrent requests wait their turn with answers equal to their solo runs."""
    block = 4
    loaded = load_tiny("hybrid")
    prompts = [base_tokens(loaded, 17 + 3 * i, seed=60 + i) for i in range(4)]
    solo = Engine(loaded, make_cache(block), block)
    try:
        alone = [run(solo, p, max_tokens=8).tokens for p in prompts]
    finally:
        solo.close()
    engine = Engine(loaded, make_cache(block), block)
    assert not engine.batched and engine.config.max_batch == 1
    results: dict[int, list[int]] = {}

    def go(i: int) -> None:
        results[i] = run(engine, prompts[i], max_tokens=8).tokens

    try:
        threads = [threading.Thread(target=go, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert [results[i] for i in range(len(prompts))] == alone
        stats = engine.stats()
        assert stats.max_step_requests == 1 and stats.completed == len(prompts)
    finally:
        engine.close()


def test_n_choices_of_a_recurrent_model_fork_their_state(load_tiny: Callable[[str], LoadedModel]) -> None:
    block = 4
    loaded = load_tiny("hybrid")
    engine = Engine(loaded, make_cache(block), block)
    prompt = base_tokens(loaded, 19, seed=71)
    try:
        tokens, finished, _ = _run_all(
            engine, GenerationRequest(prompt, SamplingParams(max_tokens=9, seed=5), n=3)
        )
        assert set(finished) == {0, 1, 2}
        # Each choice continues its own copy of the state: choice 1 equals a lone run with its seed.
        lone = run(engine, prompt, max_tokens=9, temperature=1.0, seed=6)
        assert lone.finished.usage.cached_tokens == 16
        assert lone.tokens == tokens[1]
    finally:
        engine.close()


def test_a_prefill_stops_where_the_state_is_taken(load_tiny: Callable[[str], LoadedModel]) -> None:
    loaded = load_tiny("qwen3next")
    engine = Engine(loaded, make_cache(4), 4)
    layout = engine.state_layout
    engine.close()
    assert layout is not None and layout.every * 4 == recurrent.STATE_INTERVAL_MIN_TOKENS

    def stops(prompt: int, branch: int = 0) -> list[int]:
        kv = CacheKV(loaded.model.config, layout, 4, prompt_tokens=prompt)
        kv.branch_tokens = branch
        seen = []
        while kv.length < prompt:
            kv.length += kv.chunk_limit(prompt)
            seen.append(kv.length)
        return seen

    # Periodic states, the prompt's last block boundary, and where it left a matched prefix.
    assert stops(50) == [48, 50]
    assert stops(1202) == [512, 1024, 1200, 1202]
    assert stops(1202, branch=600) == [512, 600, 1024, 1200, 1202]
    assert stops(48) == [48]


def test_the_log_says_how_each_kind_of_layer_is_cached(
    tiny_model_path: Callable[[str], Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO"):
        loaded = load_model(str(tiny_model_path("qwen3next")), "cpu", "float32", cache_dir=tmp_path)
        Engine(loaded, make_cache(16), 16).close()
    assert (
        "1 full-attention layer(s) store their K/V per block; 3 recurrent layer(s) store their state at "
        "block boundaries; a restored state continues exactly, many tokens per step"
    ) in caplog.text
    assert "3 recurrent layer(s) keep 18432 state bytes, stored after every 512 tokens" in caplog.text
