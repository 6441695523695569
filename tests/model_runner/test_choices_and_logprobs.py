"""The sampler's per-request extras: logprobs, logit bias, penalties, a token constraint, and
``n`` choices that share one prefill (CPU, float32, against plain transformers forwards)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
import torch

from model_runner.engine import Engine
from model_runner.engine_config import EngineConfig
from model_runner.loading import LoadedModel
from model_runner.records import Finished, GenerationRequest, InvalidTokens, TextDelta
from model_runner.sampling import SamplingParams, TokenLogprob
from tests.model_runner.conftest import BLOCK, base_tokens, make_cache

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def llama(load_tiny: Callable[[str], LoadedModel]) -> LoadedModel:
    return load_tiny("llama")


def _engine(loaded: LoadedModel, **config: object) -> Engine:
    return Engine(loaded, make_cache(), BLOCK, EngineConfig(**config) if config else None)  # type: ignore[arg-type]


def _run_all(
    engine: Engine, request: GenerationRequest
) -> tuple[dict[int, list[int]], dict[int, Finished], list[TextDelta]]:
    """Every choice's tokens and Finished event (the stream ends after n Finished events)."""
    done = threading.Event()
    tokens: dict[int, list[int]] = {i: [] for i in range(request.n)}
    finished: dict[int, Finished] = {}
    deltas: list[TextDelta] = []

    def sink(event: object) -> None:
        if isinstance(event, TextDelta):
            tokens[event.index].extend(event.token_ids)
            deltas.append(event)
        elif isinstance(event, Finished):
            finished[event.index] = event
            if len(finished) == request.n:
                done.set()
        else:
            done.set()
            raise AssertionError(f"unexpected event {event!r}")

    engine.submit(request, sink)
    assert done.wait(60), "the choices did not all finish"
    return tokens, finished, deltas


def _model_logits(loaded: LoadedModel, ids: list[int]) -> torch.Tensor:
    """The last position's logits of a plain full forward (no cache)."""
    with torch.no_grad():
        return loaded.model(torch.tensor([ids])).logits[0, -1].float()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logprobs_match_a_log_softmax_of_plain_transformers_logits(
    llama: LoadedModel, temperature: float
) -> None:
    engine = _engine(llama)
    try:
        prompt = base_tokens(llama, 13, seed=3)
        params = SamplingParams(max_tokens=6, temperature=temperature, seed=5, logprobs=True, top_logprobs=5)
        tokens, _finished, deltas = _run_all(engine, GenerationRequest(prompt, params))
        entries: list[TokenLogprob] = [lp for d in deltas for lp in d.logprobs]
        assert [e.token_id for e in entries] == [t for t in tokens[0] if t not in engine._eos]
        assert len(entries) == sum(len(d.token_ids) for d in deltas)
        for step, entry in enumerate(entries):
            expected = torch.log_softmax(_model_logits(llama, prompt + tokens[0][:step]), dim=-1)
            assert abs(entry.logprob - float(expected[entry.token_id])) < TOLERANCE
            top_ids = [t for t, _ in entry.top]
            assert top_ids == torch.topk(expected, 5).indices.tolist()
            for token, value in entry.top:
                assert abs(value - float(expected[token])) < TOLERANCE
            if temperature == 0.0:
                assert top_ids[0] == entry.token_id  # the greedy token is the top-1
    finally:
        engine.close()


def test_n_choices_share_one_prefill_and_equal_single_runs_with_seed_plus_i(llama: LoadedModel) -> None:
    engine = _engine(llama)
    try:
        prompt = base_tokens(llama, 18, seed=4)
        params = SamplingParams(max_tokens=8, temperature=1.0, seed=1234)
        before = engine.stats().prefilled_tokens
        tokens, finished, _ = _run_all(engine, GenerationRequest(prompt, params, n=3))
        assert engine.stats().prefilled_tokens - before == len(prompt)  # prefilled once
        assert set(finished) == {0, 1, 2}
        assert len({tuple(t) for t in tokens.values()}) == 3, "three different choices"
        for i in range(3):
            assert finished[i].usage.prompt_tokens == len(prompt)
        # Each choice equals a single-choice run seeded with seed + i (on a cold engine: no reuse).
        for i in range(3):
            solo = _engine(llama)
            try:
                single, _, _ = _run_all(
                    solo, GenerationRequest(prompt, SamplingParams(**{**params.__dict__, "seed": 1234 + i}))
                )
            finally:
                solo.close()
            assert single[0] == tokens[i], f"choice {i}"
    finally:
        engine.close()


def test_n_choices_on_a_warm_prefix_report_the_hit_for_every_choice(llama: LoadedModel) -> None:
    engine = _engine(llama)
    try:
        prompt = base_tokens(llama, 17, seed=6)
        _run_all(engine, GenerationRequest(prompt, SamplingParams(max_tokens=2, temperature=0.0)))
        _, finished, _ = _run_all(
            engine, GenerationRequest(prompt, SamplingParams(max_tokens=3, seed=9), n=2)
        )
        for event in finished.values():
            assert event.usage.cached_tokens == 16
    finally:
        engine.close()


def test_n_choices_on_the_one_at_a_time_path(load_tiny: Callable[[str], LoadedModel]) -> None:
    hybrid = load_tiny("hybrid")
    engine = Engine(hybrid, None, BLOCK)
    try:
        assert not engine.batched
        prompt = base_tokens(hybrid, 9, seed=2)
        tokens, finished, _ = _run_all(
            engine, GenerationRequest(prompt, SamplingParams(max_tokens=5, seed=3), n=3)
        )
        assert set(finished) == {0, 1, 2}
        solo, _, _ = _run_all(engine, GenerationRequest(prompt, SamplingParams(max_tokens=5, seed=4)))
        assert solo[0] == tokens[1]
    finally:
        engine.close()


def _greedy_with(
    loaded: LoadedModel, prompt: list[int], steps: int, shape: Callable[[torch.Tensor, list[int]], None]
) -> list[int]:
    out: list[int] = []
    for _ in range(steps):
        logits = _model_logits(loaded, prompt + out)
        shape(logits, out)
        out.append(int(torch.argmax(logits)))
    return out


def test_penalties_follow_openais_formula(llama: LoadedModel) -> None:
    engine = _engine(llama)
    try:
        prompt = base_tokens(llama, 10, seed=8)
        freq, pres = 1.5, 0.7

        def penalize(logits: torch.Tensor, out: list[int]) -> None:
            for token in set(out):
                logits[token] -= out.count(token) * freq + pres

        expected = _greedy_with(llama, prompt, 8, penalize)
        params = SamplingParams(max_tokens=8, temperature=0.0, frequency_penalty=freq, presence_penalty=pres)
        tokens, _, _ = _run_all(engine, GenerationRequest(prompt, params))
        eos = engine._eos
        assert [t for t in tokens[0]] == expected[: len(tokens[0])]
        assert len(tokens[0]) == 8 or tokens[0][-1] in eos
        plain, _, _ = _run_all(
            engine, GenerationRequest(prompt, SamplingParams(max_tokens=8, temperature=0.0))
        )
        assert plain[0] != tokens[0], "the penalties changed nothing: pick a prompt where they matter"
    finally:
        engine.close()


def test_logit_bias_forces_and_bans_tokens(llama: LoadedModel) -> None:
    engine = _engine(llama)
    try:
        prompt = base_tokens(llama, 10, seed=11)
        plain, _, _ = _run_all(
            engine, GenerationRequest(prompt, SamplingParams(max_tokens=4, temperature=0.0))
        )
        banned = plain[0][0]
        params = SamplingParams(max_tokens=4, temperature=0.0, logit_bias=((banned, -100.0),))
        tokens, _, _ = _run_all(engine, GenerationRequest(prompt, params))
        assert banned not in tokens[0]
        forced = base_tokens(llama, 1, seed=99)[0]
        params = SamplingParams(max_tokens=4, temperature=1.0, seed=1, logit_bias=((forced, 100.0),))
        tokens, _, _ = _run_all(engine, GenerationRequest(prompt, params))
        assert tokens[0] == [forced] * 4
        with pytest.raises(InvalidTokens):
            engine.submit(
                GenerationRequest(prompt, SamplingParams(max_tokens=1, logit_bias=((10**6, 1.0),))),
                lambda e: None,
            )
    finally:
        engine.close()


class _OnlyTokens:
    """A constraint allowing ``allowed`` tokens, done after ``length`` of them."""

    def __init__(self, allowed: list[int], length: int) -> None:
        self.allowed = torch.tensor(allowed)
        self.length = length
        self.seen: list[int] = []

    def matcher(self) -> _OnlyTokens:
        return _OnlyTokens(self.allowed.tolist(), self.length)

    def mask_logits(self, logits: torch.Tensor) -> None:
        keep = logits[self.allowed].clone()
        logits.fill_(float("-inf"))
        logits[self.allowed] = keep

    def accept(self, token_id: int) -> None:
        if token_id not in self.allowed.tolist():
            raise ValueError(f"token {token_id} is not allowed")
        self.seen.append(token_id)

    @property
    def done(self) -> bool:
        return len(self.seen) >= self.length


def test_a_constraint_masks_every_choice_and_its_end_stops_the_stream(llama: LoadedModel) -> None:
    engine = _engine(llama)
    try:
        prompt = base_tokens(llama, 9, seed=12)
        allowed = base_tokens(llama, 3, seed=13)
        request = GenerationRequest(
            prompt,
            SamplingParams(max_tokens=10, temperature=1.0, seed=2),
            n=2,
            constraint=_OnlyTokens(allowed, 4),
        )
        tokens, finished, _ = _run_all(engine, request)
        for i in range(2):
            assert len(tokens[i]) == 4 and set(tokens[i]) <= set(allowed)
            assert finished[i].finish_reason == "stop"
    finally:
        engine.close()


def test_cancelling_an_n_request_ends_every_choice(llama: LoadedModel) -> None:
    engine = _engine(llama)
    try:
        prompt = base_tokens(llama, 9, seed=14)
        finished: dict[int, Finished] = {}
        all_done = threading.Event()
        first_text = threading.Event()

        def sink(event: object) -> None:
            if isinstance(event, TextDelta):
                first_text.set()
            if isinstance(event, Finished):
                finished[event.index] = event
                if len(finished) == 3:
                    all_done.set()

        handle = engine.submit(GenerationRequest(prompt, SamplingParams(max_tokens=200, seed=1), n=3), sink)
        assert first_text.wait(30)
        handle.cancel()
        assert all_done.wait(30)
        assert {e.finish_reason for e in finished.values()} <= {"cancelled", "stop"}
        # The events go out during a step; the loop publishes its figures at the end of its turn.
        deadline = time.monotonic() + 10
        while engine.stats().scheduler.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats().scheduler.kv_used_bytes == 0
        assert engine.stats().scheduler.running == 0
    finally:
        engine.close()
