"""Batched answers equal plain transformers (CPU, float32).

The reference is always a full prefill of the whole prompt with transformers' own cache and
greedy ``model.generate``, never the engine. A request's greedy output under batching must equal
the reference up to the first step whose reference top-1/top-2 margin is below 1e-4 (each request
compares at least 8 tokens), with logits within 1e-4 of the reference at every compared step,
while it runs beside up to 15 other requests of different lengths that arrive at random steps,
some prefilled in chunks, some restored from memory, disk or Redis. Every test also checks, from
the engine's own counters, that batching really happened.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

from model_runner.engine import Engine
from model_runner.engine_config import EngineConfig
from model_runner.loading import LoadedModel
from model_runner.records import Failed, Finished, GenerationRequest, TextDelta
from model_runner.sampling import SamplingParams
from tests.model_runner.conftest import BLOCK, MARGIN, base_tokens, lower_tier_options, make_cache

LOGIT_TOLERANCE = 1e-4
MIN_COMPARED = 8
NEW_TOKENS = 10
BATCHED_KINDS = ["llama", "qwen2", "mistral", "gpt2", "sliding", "gemma3", "gptoss"]
"""``sliding``: Gemma 2 with a 6-token window; ``gemma3``: two 11-token local layers per global one;
``gptoss``: 5-token windows with attention sinks (the window is a mask; every token's K/V is kept,
so these are cached too)."""


@dataclass
class Reference:
    tokens: list[int]
    logits: torch.Tensor  # [steps, vocab]
    compared: int
    """Steps before the first near tie (margin below 1e-4) or the end."""


def reference(loaded: LoadedModel, prompt: list[int], new_tokens: int = NEW_TOKENS) -> Reference:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = loaded.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
            pad_token_id=loaded.tokenizer.pad_token_id,
        )
    logits = torch.stack([step[0].float() for step in out.logits])
    compared = 0
    for row in logits:
        top = torch.topk(row, 2).values
        if float(top[0] - top[1]) < MARGIN:
            break
        compared += 1
    return Reference(out.sequences[0, len(prompt) :].tolist(), logits, compared)


def comparable_prompt(
    loaded: LoadedModel, prefix: list[int], length: int, seed: int
) -> tuple[list[int], Reference]:
    """``prefix`` + a tail up to ``length`` tokens whose reference compares >= 8 tokens."""
    eos = loaded.tokenizer.eos_token_id
    for attempt in range(50):
        tail = base_tokens(loaded, max(length - len(prefix), 1), seed=seed * 100 + attempt)
        prompt = (prefix + tail)[: max(length, len(prefix) + 1)]
        ref = reference(loaded, prompt)
        if ref.compared >= MIN_COMPARED and eos not in ref.tokens[:MIN_COMPARED]:
            return prompt, ref
    raise AssertionError(f"no prompt of {length} tokens with {MIN_COMPARED} comparable reference steps")


@dataclass
class Outcome:
    tokens: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    finished: Finished | None = None
    error: Exception | None = None
    done: threading.Event = field(default_factory=threading.Event)


def run_batch(
    engine: Engine, prompts: list[list[int]], arrivals: list[int], logits_of: dict[int, Outcome]
) -> list[Outcome]:
    """Submit ``prompts[i]`` once the engine has run ``arrivals[i]`` steps (or sits idle)."""
    outcomes = [Outcome() for _ in prompts]
    for i in sorted(range(len(prompts)), key=lambda i: arrivals[i]):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            stats = engine.stats()
            idle = stats.scheduler.running == 0 and stats.scheduler.waiting == 0
            if stats.steps >= arrivals[i] or idle:
                break
            time.sleep(0.0005)
        outcome = outcomes[i]
        request = GenerationRequest(prompts[i], SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
        logits_of[id(request)] = outcome

        def sink(event: object, outcome: Outcome = outcome) -> None:
            if isinstance(event, TextDelta):
                outcome.tokens.extend(event.token_ids)
            elif isinstance(event, Finished):
                outcome.finished = event
                outcome.done.set()
            elif isinstance(event, Failed):
                outcome.error = event.error
                outcome.done.set()

        engine.submit(request, sink)
    for outcome in outcomes:
        assert outcome.done.wait(60), "a request never finished"
        assert outcome.error is None, outcome.error
    return outcomes


def hooked_engine(loaded: LoadedModel, cache, config: EngineConfig) -> tuple[Engine, dict[int, Outcome]]:
    logits_of: dict[int, Outcome] = {}

    def hook(request: GenerationRequest, logits: torch.Tensor) -> None:
        logits_of[id(request)].logits.append(logits.detach().float().clone())

    return Engine(loaded, cache, BLOCK, config, logits_hook=hook), logits_of


def check_against_references(
    kind: str, outcomes: list[Outcome], refs: list[Reference], eos: int | None
) -> float:
    worst = 0.0
    for i, (outcome, ref) in enumerate(zip(outcomes, refs, strict=True)):
        generated = outcome.tokens + (
            [eos] if outcome.finished and outcome.finished.finish_reason == "stop" else []
        )
        n = ref.compared
        assert generated[:n] == ref.tokens[:n], f"{kind} request {i}: {generated[:n]} != {ref.tokens[:n]}"
        for step in range(min(n, len(outcome.logits))):
            diff = float((outcome.logits[step] - ref.logits[step]).abs().max())
            worst = max(worst, diff)
            assert diff <= LOGIT_TOLERANCE, f"{kind} request {i} step {step}: logits differ by {diff}"
        assert len(outcome.logits) >= min(n, MIN_COMPARED)
    print(f"max |logit - reference| under batching, {kind}: {worst:.2e}")  # for the README (-s)
    return worst


def workload(
    loaded: LoadedModel, n_requests: int, seed: int
) -> tuple[list[int], list[list[int]], list[Reference]]:
    """A shared 24-token document, and prompts of 5..120 tokens: some extend the document (so
    they restore it), the rest are unrelated."""
    rng = random.Random(seed)
    document = base_tokens(loaded, 24, seed=seed)
    prompts, refs = [], []
    for i in range(n_requests):
        length = rng.choice([5, 9, 17, 33, 48, 70, 120])
        prefix = document if i % 2 == 0 and length > len(document) else []
        prompt, ref = comparable_prompt(loaded, prefix, length, seed=seed * 1000 + i)
        prompts.append(prompt)
        refs.append(ref)
    return document, prompts, refs


@pytest.mark.parametrize("kind", BATCHED_KINDS)
def test_batched_greedy_equals_reference(kind: str, load_tiny: Callable[[str], LoadedModel]) -> None:
    loaded = load_tiny(kind)
    engine, logits_of = hooked_engine(
        loaded, make_cache(), EngineConfig(max_batch=16, max_batch_tokens=24, kv_budget_bytes=1 << 30)
    )
    assert engine.batched, engine.batching_reason
    document, prompts, refs = workload(loaded, 16, seed=3)
    if engine.caching:
        engine.warmup(document)
    rng = random.Random(4)
    arrivals = [rng.randrange(0, 40) for _ in prompts]
    outcomes = run_batch(engine, prompts, arrivals, logits_of)
    check_against_references(kind, outcomes, refs, loaded.tokenizer.eos_token_id)
    stats = engine.stats()
    assert stats.batched_steps > 0 and stats.max_step_requests > 1, stats
    usages = [o.finished.usage for o in outcomes if o.finished]
    assert any(u.prefill_steps > 1 for u in usages), "some prompt must have been prefilled in chunks"
    if engine.caching:
        assert any(u.cached_tokens > 0 for u in usages), "some prompt must have been restored"
    engine.close()


@pytest.mark.parametrize("tier", ["disk", "redis"])
@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
def test_batched_requests_restored_from_a_lower_tier(
    kind: str, tier: str, load_tiny: Callable[[str], LoadedModel], tmp_path, request: pytest.FixtureRequest
) -> None:
    loaded = load_tiny(kind)
    options = lower_tier_options(tier, tmp_path, request)
    document, prompts, refs = workload(loaded, 12, seed=5)
    writer_cache = make_cache(**options)
    writer = Engine(loaded, writer_cache, BLOCK)
    writer.warmup(document)
    for prompt in prompts[:4]:
        writer.warmup(prompt)
    assert writer_cache.store.drain(10)
    writer.close()
    writer_cache.store.close()
    reader_cache = make_cache(**options)  # a new memory tier: every hit comes from `tier`
    engine, logits_of = hooked_engine(
        loaded, reader_cache, EngineConfig(max_batch=12, max_batch_tokens=32, kv_budget_bytes=1 << 30)
    )
    rng = random.Random(6)
    outcomes = run_batch(engine, prompts, [rng.randrange(0, 20) for _ in prompts], logits_of)
    check_against_references(kind, outcomes, refs, loaded.tokenizer.eos_token_id)
    usages = [o.finished.usage for o in outcomes if o.finished]
    assert any(u.cached_by_tier.get(tier, 0) > 0 for u in usages), [u.cached_by_tier for u in usages]
    assert engine.stats().batched_steps > 0
    engine.close()
    reader_cache.store.close()


@pytest.mark.parametrize("n_others", [1, 4, 15])
def test_a_request_is_exact_beside_any_number_of_others(
    n_others: int, load_tiny: Callable[[str], LoadedModel]
) -> None:
    loaded = load_tiny("llama")
    engine, logits_of = hooked_engine(
        loaded, make_cache(), EngineConfig(max_batch=16, max_batch_tokens=64, kv_budget_bytes=1 << 30)
    )
    _, prompts, refs = workload(loaded, n_others + 1, seed=7 + n_others)
    outcomes = run_batch(engine, prompts, [0] * len(prompts), logits_of)
    check_against_references("llama", outcomes, refs, loaded.tokenizer.eos_token_id)
    assert engine.stats().max_step_requests == n_others + 1
    engine.close()


def test_a_model_that_cannot_be_batched_runs_one_at_a_time_and_stays_exact(
    load_tiny: Callable[[str], LoadedModel],
) -> None:
    loaded = load_tiny("hybrid")  # LFM2: a short-convolution layer reads a packed row as one sequence
    engine, logits_of = hooked_engine(loaded, None, EngineConfig(max_batch=16, max_batch_tokens=8))
    assert not engine.batched and engine.batching_reason
    assert engine.config.max_batch == 1
    _, prompts, refs = workload(loaded, 4, seed=9)
    outcomes = run_batch(engine, prompts, [0] * 4, logits_of)
    check_against_references("hybrid", outcomes, refs, loaded.tokenizer.eos_token_id)
    assert engine.stats().max_step_requests == 1
    engine.close()


def test_max_batch_1_is_bitwise_reproducible_whatever_the_load(
    load_tiny: Callable[[str], LoadedModel],
) -> None:
    loaded = load_tiny("qwen2")
    _, prompts, _ = workload(loaded, 6, seed=11)
    config = EngineConfig(max_batch=1, max_batch_tokens=16, kv_budget_bytes=1 << 30)
    alone, alone_logits = hooked_engine(loaded, None, config)
    quiet = run_batch(alone, prompts[:1], [0], alone_logits)[0]
    loaded_engine, loaded_logits = hooked_engine(loaded, None, config)
    busy = run_batch(loaded_engine, prompts[1:] + prompts[:1], [0] * 6, loaded_logits)[-1]
    assert busy.tokens == quiet.tokens
    assert all(torch.equal(a, b) for a, b in zip(busy.logits, quiet.logits, strict=True))
    assert loaded_engine.stats().max_step_requests == 1
    alone.close()
    loaded_engine.close()
