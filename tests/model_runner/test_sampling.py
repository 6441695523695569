"""Sampling: greedy, temperature, top-k, top-p, seeded reproducibility."""

from __future__ import annotations

import pytest
import torch

from model_runner.sampling import SamplingParams, filter_logits, make_generator, sample_next

CPU = torch.device("cpu")


def _logits(seed: int = 0, vocab: int = 50) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 3


def _draws(params: SamplingParams, n: int = 40) -> list[int]:
    gen = make_generator(params.seed, CPU)
    return [sample_next(_logits(i), params, gen) for i in range(n)]


def test_greedy_is_argmax() -> None:
    logits = _logits()
    assert sample_next(logits, SamplingParams(max_tokens=1, temperature=0.0), None) == int(logits.argmax())


def test_top_k_1_equals_greedy_even_at_high_temperature() -> None:
    greedy = _draws(SamplingParams(max_tokens=1, temperature=0.0))
    assert _draws(SamplingParams(max_tokens=1, temperature=5.0, top_k=1, seed=3)) == greedy


def test_same_seed_same_draws_other_seed_other_draws() -> None:
    params = SamplingParams(max_tokens=1, temperature=1.5, seed=42)
    assert _draws(params) == _draws(params)
    assert _draws(params) != _draws(SamplingParams(max_tokens=1, temperature=1.5, seed=43))


def test_seeded_sampling_ignores_the_global_rng() -> None:
    params = SamplingParams(max_tokens=1, temperature=1.0, seed=7)
    torch.manual_seed(1)
    a = _draws(params)
    torch.manual_seed(2)
    assert _draws(params) == a


def test_top_k_keeps_only_the_k_best() -> None:
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    kept = torch.isfinite(filter_logits(logits, top_k=2, top_p=1.0)).nonzero().flatten().tolist()
    assert kept == [1, 3]


def test_top_p_keeps_the_smallest_nucleus() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    kept = torch.isfinite(filter_logits(logits, top_k=0, top_p=0.75)).nonzero().flatten().tolist()
    assert kept == [0, 1]  # 0.5 < 0.75, 0.5 + 0.3 >= 0.75
    assert torch.isfinite(filter_logits(logits, top_k=0, top_p=0.01)).sum() == 1


def test_samples_stay_inside_top_k_and_top_p() -> None:
    logits = _logits(5)
    allowed = set(torch.topk(logits, 3).indices.tolist())
    gen = make_generator(0, CPU)
    params = SamplingParams(max_tokens=1, temperature=2.0, top_k=3, seed=0)
    assert {sample_next(logits, params, gen) for _ in range(200)} <= allowed


def test_temperature_spreads_choices() -> None:
    logits = _logits(9)
    gen = make_generator(0, CPU)
    hot = {sample_next(logits, SamplingParams(max_tokens=1, temperature=5.0), gen) for _ in range(200)}
    assert len(hot) > 5


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_tokens": 0},
        {"max_tokens": 1, "temperature": -0.1},
        {"max_tokens": 1, "top_p": 0.0},
        {"max_tokens": 1, "top_p": 1.5},
        {"max_tokens": 1, "top_k": -1},
        {"max_tokens": 1, "stop": ("",)},
    ],
)
def test_invalid_params(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("top_p", [5e-324, 1e-45, 1e-300])
def test_a_top_p_that_float32_cannot_hold_keeps_the_most_likely_token(top_p: float) -> None:
    """Found by fuzzing /v1/messages: a subnormal top_p rounded to 0 in float32 dropped every
    token, and sampling from all -inf raised (a 500)."""
    logits = torch.tensor([0.5, 3.0, -1.0, 2.0])
    kept = filter_logits(logits, 0, top_p)
    assert torch.isfinite(kept).tolist() == [False, True, False, False]
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=top_p)
    assert sample_next(logits, params, torch.Generator().manual_seed(0)) == 1
