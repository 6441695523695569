"""Incremental detokenization and stop strings never split, lose or leak text."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from model_runner.detokenize import REPLACEMENT, IncrementalDetokenizer, StopMatcher
from model_runner.loading import LoadedModel

TEXTS = [
    "plain ascii text, with spaces",
    "café crème brûlée",
    "emoji 🙂🚀 and more 🎉",
    "日本語のテキスト",
    "mixed: € £ ¥ ± 한국어 🙂 end",
]


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_rebuild_the_text_and_never_split_a_character(
    text: str, load_tiny: Callable[[str], LoadedModel]
) -> None:
    tokenizer = load_tiny("llama").tokenizer
    prompt = tokenizer.encode("Say: ")
    ids = tokenizer.encode(text)
    pieces = [tokenizer.decode([i]) for i in ids]
    if "🙂" in text:
        assert any(REPLACEMENT in p for p in pieces), "the test needs a character split over tokens"
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == text
    assert all(REPLACEMENT not in d for d in deltas)


def test_an_incomplete_character_comes_out_at_the_end(load_tiny: Callable[[str], LoadedModel]) -> None:
    tokenizer = load_tiny("llama").tokenizer
    ids = tokenizer.encode("ok 🙂")
    detok = IncrementalDetokenizer(tokenizer, [])
    head = "".join(detok.push(i) for i in ids[:-1])  # the emoji's last byte never comes
    assert head.startswith("ok") and REPLACEMENT not in head
    tail = detok.flush()
    assert tail.endswith(REPLACEMENT)
    assert head + tail == tokenizer.decode(ids[:-1])


def _stream(stops: list[str], chunks: list[str]) -> tuple[str, bool, list[str]]:
    matcher = StopMatcher(stops)
    out = [matcher.push(c) for c in chunks]
    out.append(matcher.flush())
    return "".join(out), matcher.stopped, out


@pytest.mark.parametrize(
    ("stops", "chunks", "text", "stopped"),
    [
        (["STOP"], ["hello ", "ST", "OP", " never"], "hello ", True),
        (["STOP"], ["hello S", "T", "O", "P"], "hello ", True),
        (["STOP"], ["hello STO", "RM"], "hello STORM", False),
        (["STOP"], ["aSTOPb"], "a", True),
        (["\n\n", "END"], ["line\n", "\nnext"], "line", True),
        (["END", "NDX"], ["aEN", "DX"], "a", True),
        (["ab"], ["a", "a", "a", "b"], "aa", True),
        ([], ["no ", "stops"], "no stops", False),
        (["xyz"], ["xy"], "xy", False),
        (["🙂!"], ["ok 🙂", "!"], "ok ", True),
    ],
)
def test_stop_strings_split_across_chunks(
    stops: list[str], chunks: list[str], text: str, stopped: bool
) -> None:
    out, was_stopped, pieces = _stream(stops, chunks)
    assert out == text
    assert was_stopped is stopped
    for stop in stops:
        assert all(stop not in p for p in pieces)


def test_held_text_is_only_a_possible_stop_prefix() -> None:
    matcher = StopMatcher(["</answer>"])
    assert matcher.push("the answer is 4</ans") == "the answer is 4"
    assert matcher.push("wer>") == ""
    assert matcher.stopped
    assert matcher.push("more") == ""
