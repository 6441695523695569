"""The server bench's workload generators: seeded, so a figure can always be traced back to the
exact prompts (no timing here: benchmarks are never timed tests)."""

from __future__ import annotations

from collections import Counter

import pytest

from bench.sections_cache import lru_hits
from bench.workloads import (
    CapacityParams,
    ChatParams,
    DivergenceParams,
    DocQAParams,
    FanoutParams,
    chat_script,
    common_prefix,
    divergence,
    doc_qa,
    fanout,
    reusable_tokens,
    zipf_trace,
)

GENERATORS = [
    (doc_qa, DocQAParams(docs=2, doc_words=(20, 30), questions=3)),
    (chat_script, ChatParams(users=2, rounds=3, system_words=10)),
    (fanout, FanoutParams(prefixes=2, prefix_words=20, suffixes=3)),
    (divergence, DivergenceParams(base_words=40, variants=5)),
    (zipf_trace, CapacityParams(prefixes=5, prefix_words=10, requests=30)),
]


@pytest.mark.parametrize(("make", "params"), GENERATORS, ids=lambda x: getattr(x, "__name__", ""))
def test_same_seed_same_workload_other_seed_other(make, params) -> None:  # type: ignore[no-untyped-def]
    assert make(params) == make(params)
    assert make(params) != make(type(params)(**{**params.__dict__, "seed": params.seed + 100}))


def test_doc_qa_asks_every_document_its_questions_in_a_shuffled_order() -> None:
    requests = doc_qa(DocQAParams(docs=3, doc_words=(20, 30), questions=4))
    assert Counter(r.group for r in requests) == {"doc0": 4, "doc1": 4, "doc2": 4}
    assert [r.group for r in requests] != sorted(r.group for r in requests)
    for r in requests:
        assert r.messages is not None and r.messages[0][0] == "system"


def test_divergence_variants_keep_exactly_k_base_words() -> None:
    base, variants = divergence(DivergenceParams(base_words=50, variants=6))
    words = base.split(" ")
    for k, text in variants:
        other = text.split(" ")
        assert len(other) == len(words)
        assert other[:k] == words[:k]


def test_zipf_trace_favours_low_ranks() -> None:
    _, trace = zipf_trace(CapacityParams(prefixes=8, prefix_words=5, requests=400))
    counts = Counter(i for i, _ in trace)
    assert counts[0] > counts[3] > counts[7]


@pytest.mark.parametrize(
    ("ids", "earlier", "block", "expected"),
    [
        ([1, 2, 3, 4, 5], [], 2, (0, 0)),
        ([1, 2, 3, 4, 5], [[1, 2, 3, 9]], 2, (3, 2)),
        ([1, 2, 3, 4], [[1, 2, 3, 4, 5]], 2, (4, 3)),  # one prompt token is always prefilled
        ([1, 2, 3, 4, 5], [[1, 9], [1, 2, 3, 4, 0]], 4, (4, 4)),
    ],
)
def test_reusable_tokens(
    ids: list[int], earlier: list[list[int]], block: int, expected: tuple[int, int]
) -> None:
    assert reusable_tokens(ids, earlier, block) == expected


def test_common_prefix_and_lru() -> None:
    assert common_prefix([1, 2, 3], [1, 2]) == 2
    assert common_prefix([], [1]) == 0
    assert lru_hits([0, 1, 0, 2, 1, 0], capacity=2) == 1
