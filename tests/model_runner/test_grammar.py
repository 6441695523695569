"""Constrained decoding (model_runner.grammar) with a real tiny BPE tokenizer and random logits.

Random logits stand in for a random-weight model: under the mask every sampled run must be valid
JSON for the schema in the ``tojson`` layout; without it, the same sampling never is.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import jsonschema
import pytest
import torch
from transformers import PreTrainedTokenizerFast

from model_runner.grammar import (
    MAX_ERROR_CHARS,
    CompiledGrammar,
    Grammar,
    GrammarCompiler,
    GrammarError,
    TokenMatcher,
    ToolCallSyntax,
    json_object_grammar,
    json_schema_grammar,
    tool_call_grammar,
)
from model_runner.tokenizer_builder import train_bpe_tokenizer
from tests.support.tiny_models import tiny_corpus

TOKENIZER_VOCAB = 384
MODEL_VOCAB = 400
"""Wider than the tokenizer, like an LM head padded to a multiple of 8/64: ids 384..399 decode to nothing."""
EOS = 2
MAX_STEPS = 400

PET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "owner": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 6},
                "zip": {"type": "integer", "minimum": 1000, "maximum": 99999},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "kind", "age", "owner", "tags"],
    "additionalProperties": False,
}

OPTIONAL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "z": {"enum": [1, 2]},
        "m": {"type": "boolean"},
        "a": {"enum": ["x", "y"]},
        "k": {"type": "null"},
    },
    "required": ["a"],
    "additionalProperties": False,
}

WEATHER = ToolCallSyntax(
    prefix='<tool_call>\n{"name": "get_weather", "arguments": ',
    schema={
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 6}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
    suffix="}\n</tool_call>",
)
CLOCK = ToolCallSyntax(
    prefix='<tool_call>\n{"name": "get_time", "arguments": ',
    schema={
        "type": "object",
        "properties": {"zone": {"enum": ["utc", "cet"]}},
        "required": ["zone"],
        "additionalProperties": False,
    },
    suffix="}\n</tool_call>",
)

Sampler = Callable[[torch.Tensor, torch.Generator], int]


def greedy(logits: torch.Tensor, gen: torch.Generator) -> int:
    return int(torch.argmax(logits))


def multinomial(logits: torch.Tensor, gen: torch.Generator) -> int:
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen))


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    tok = train_bpe_tokenizer(tiny_corpus(), TOKENIZER_VOCAB)
    assert len(tok) == TOKENIZER_VOCAB and tok.eos_token_id == EOS
    return tok


@pytest.fixture(scope="module")
def compiler(tokenizer: PreTrainedTokenizerFast) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, MODEL_VOCAB, [EOS])


def drive(matcher: TokenMatcher | None, seed: int, sample: Sampler, steps: int = MAX_STEPS) -> list[int]:
    """Sample from seeded random logits (masked when there is a matcher) until the grammar is
    done, an EOS comes, or ``steps`` tokens; returns the tokens before any EOS."""
    gen = torch.Generator().manual_seed(seed)
    tokens: list[int] = []
    while len(tokens) < steps and not (matcher is not None and matcher.done):
        logits = torch.randn(MODEL_VOCAB, generator=gen) * 4.0
        if matcher is not None:
            matcher.mask_logits(logits)
            assert torch.isinf(logits[TOKENIZER_VOCAB:]).all(), "LM head padding rows must stay masked"
        token = sample(logits, gen)
        if matcher is not None:
            matcher.accept(token)
        if token == EOS:
            break
        tokens.append(token)
    return tokens


def feed(matcher: TokenMatcher, tokenizer: PreTrainedTokenizerFast, text: str) -> bool:
    """Accept the tokens of ``text``; False as soon as one is refused."""
    try:
        for token in tokenizer.encode(text):
            matcher.accept(token)
    except GrammarError:
        return False
    return True


def is_valid(text: str, schema: dict[str, Any]) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def tojson(text: str) -> str:
    return json.dumps(json.loads(text), ensure_ascii=False)


SEEDS = range(6)


@pytest.mark.parametrize("sample", [greedy, multinomial])
@pytest.mark.parametrize("seed", SEEDS)
def test_masked_sampling_yields_schema_valid_json_in_tojson_layout(
    compiler: GrammarCompiler, tokenizer: PreTrainedTokenizerFast, seed: int, sample: Sampler
) -> None:
    matcher = compiler.compile(json_schema_grammar(PET_SCHEMA)).matcher()
    tokens = drive(matcher, seed, sample)
    text = tokenizer.decode(tokens)
    assert matcher.done, f"not complete after {len(tokens)} tokens: {text!r}"
    jsonschema.validate(json.loads(text), PET_SCHEMA)
    assert text == tojson(text)
    assert list(json.loads(text)) == list(PET_SCHEMA["properties"])


@pytest.mark.parametrize("sample", [greedy, multinomial])
def test_unmasked_control_never_yields_valid_json(
    tokenizer: PreTrainedTokenizerFast, sample: Sampler
) -> None:
    for seed in SEEDS:
        text = tokenizer.decode(drive(None, seed, sample, steps=60))
        assert not is_valid(text, PET_SCHEMA), text


def test_optional_properties_keep_the_schema_order(
    compiler: GrammarCompiler, tokenizer: PreTrainedTokenizerFast
) -> None:
    compiled = compiler.compile(json_schema_grammar(OPTIONAL_SCHEMA))
    order = list(OPTIONAL_SCHEMA["properties"])
    key_sets = set()
    for seed in range(12):
        text = tokenizer.decode(drive(compiled.matcher(), seed, multinomial))
        assert is_valid(text, OPTIONAL_SCHEMA) and text == tojson(text), text
        keys = list(json.loads(text))
        assert keys == sorted(keys, key=order.index), text
        key_sets.add(tuple(keys))
    assert len(key_sets) > 1, "optional properties should sometimes be skipped, sometimes not"


@pytest.mark.parametrize(
    ("text", "accepted"),
    [
        ('{"z": 1, "a": "x"}', True),
        ('{"a": "x"}', True),
        ('{"a": "x", "z": 1}', False),  # reordered
        ('{"z": 1}', False),  # missing a required property: the "}" is refused
        ('{"a": "x", "q": 1}', False),  # additionalProperties false
    ],
)
def test_property_order_table(
    compiler: GrammarCompiler, tokenizer: PreTrainedTokenizerFast, text: str, accepted: bool
) -> None:
    matcher = compiler.compile(json_schema_grammar(OPTIONAL_SCHEMA)).matcher()
    assert (feed(matcher, tokenizer, text) and matcher.done) == accepted


OPEN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["b"],
}


@pytest.mark.parametrize(
    ("text", "accepted"),
    [
        ('{"a": 1, "b": 2, "q": 3}', True),
        ('{"b": 2, "q": 3}', True),
        ('{"q": 3, "a": 1, "b": 2}', False),
        ('{"a": 1, "q": 3, "b": 2}', False),
        ('{"b": 2, "a": 1}', False),
    ],
)
def test_unlisted_keys_come_after_the_listed_ones(
    compiler: GrammarCompiler, tokenizer: PreTrainedTokenizerFast, text: str, accepted: bool
) -> None:
    matcher = compiler.compile(json_schema_grammar(OPEN_SCHEMA)).matcher()
    assert (feed(matcher, tokenizer, text) and matcher.done) == accepted


@pytest.mark.parametrize(
    ("text", "accepted"),
    [
        ('{"a": 1, "b": [1, 2], "c": {"d": null}}', True),
        ('{"é": "ü🙂", "n": "a\\nb\\"c"}', True),
        ("{}", True),
        ('{"a":1}', False),  # compact separators
        ('{ "a": 1}', False),
        ('{"a": 1,"b": 2}', False),
        ('{"a": [1,2]}', False),
        ('{"a": 1}\n', False),  # nothing after the object
        ('{"a": "\\u00e9"}', False),  # json.dumps(ensure_ascii=False) writes é raw
        ('{"a": "\\u000a"}', False),  # ... and a newline as \n
        ('{"a": "\\/"}', False),
        ("[1]", False),  # not an object
    ],
)
def test_json_object_layout_table(
    compiler: GrammarCompiler, tokenizer: PreTrainedTokenizerFast, text: str, accepted: bool
) -> None:
    matcher = compiler.compile(json_object_grammar()).matcher()
    ok = feed(matcher, tokenizer, text)
    assert ok == accepted
    if accepted:
        assert matcher.done and text == tojson(text)


def test_tool_call_grammar_produces_either_alternative_with_valid_arguments(
    compiler: GrammarCompiler, tokenizer: PreTrainedTokenizerFast
) -> None:
    compiled = compiler.compile(tool_call_grammar([WEATHER, CLOCK]))
    produced = set()
    for seed in range(12):
        matcher = compiled.matcher()
        text = tokenizer.decode(drive(matcher, seed, multinomial))
        assert matcher.done, text
        call = next(c for c in (WEATHER, CLOCK) if text.startswith(c.prefix))
        assert text.endswith(call.suffix), text
        arguments = text[len(call.prefix) : len(text) - len(call.suffix)]
        jsonschema.validate(json.loads(arguments), call.schema)
        assert arguments == tojson(arguments)
        produced.add(call.prefix)
    assert produced == {WEATHER.prefix, CLOCK.prefix}


@pytest.mark.parametrize("schema", [None, {}])
def test_tool_without_parameters_takes_any_object(
    compiler: GrammarCompiler, tokenizer: PreTrainedTokenizerFast, schema: dict[str, Any] | None
) -> None:
    call = ToolCallSyntax("<f>", schema, "</f>")
    compiled = compiler.compile(tool_call_grammar([call]))
    matcher = compiled.matcher()
    assert feed(matcher, tokenizer, '<f>{"x": [1, "y"]}</f>') and matcher.done
    assert not feed(compiled.matcher(), tokenizer, "<f>[1]</f>")


@pytest.mark.parametrize("eos_ids", [[EOS], [EOS, 1]])
def test_only_eos_may_follow_a_complete_grammar(
    tokenizer: PreTrainedTokenizerFast, eos_ids: list[int]
) -> None:
    compiler = GrammarCompiler(tokenizer, MODEL_VOCAB, eos_ids)
    matcher = compiler.compile(json_schema_grammar(OPTIONAL_SCHEMA)).matcher()
    assert feed(matcher, tokenizer, '{"a": "y"') and not matcher.done
    logits = torch.zeros(MODEL_VOCAB)
    matcher.mask_logits(logits)
    assert not torch.isfinite(logits[eos_ids]).any(), "EOS must wait until the object is closed"
    assert feed(matcher, tokenizer, "}") and matcher.done
    logits = torch.zeros(MODEL_VOCAB)
    matcher.mask_logits(logits)
    assert torch.isfinite(logits).nonzero().flatten().tolist() == sorted(eos_ids)
    matcher.accept(eos_ids[-1])  # the engine accepts the EOS it sampled


def test_accepting_a_forbidden_token_raises_and_stops(
    compiler: GrammarCompiler, tokenizer: PreTrainedTokenizerFast
) -> None:
    matcher = compiler.compile(json_schema_grammar(PET_SCHEMA)).matcher()
    (letter,) = tokenizer.encode("x")
    with pytest.raises(GrammarError, match="not allowed"):
        matcher.accept(letter)  # an object must start with "{"
    assert matcher.done
    with pytest.raises(GrammarError):
        matcher.mask_logits(torch.zeros(MODEL_VOCAB))


@pytest.mark.parametrize("token", [EOS, TOKENIZER_VOCAB, MODEL_VOCAB - 1, MODEL_VOCAB, -1])
def test_eos_padding_and_out_of_range_tokens_are_refused_at_the_start(
    compiler: GrammarCompiler, token: int
) -> None:
    matcher = compiler.compile(json_object_grammar()).matcher()
    with pytest.raises(GrammarError):
        matcher.accept(token)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("contiguous", [True, False])
def test_mask_is_the_same_for_every_dtype_device_and_layout(
    compiler: GrammarCompiler,
    tokenizer: PreTrainedTokenizerFast,
    device: str,
    dtype: torch.dtype,
    contiguous: bool,
) -> None:
    compiled = compiler.compile(json_schema_grammar(PET_SCHEMA))
    reference, matcher = compiled.matcher(), compiled.matcher()
    for m in (reference, matcher):  # inside a string: most of the vocabulary is allowed
        assert feed(m, tokenizer, '{"name": "a')
    expected = torch.zeros(MODEL_VOCAB)
    reference.mask_logits(expected)
    allowed = torch.isfinite(expected)
    assert 100 < int(allowed.sum()) < TOKENIZER_VOCAB
    original = torch.randn(MODEL_VOCAB, generator=torch.Generator().manual_seed(3)).to(dtype)
    backing = torch.stack([original, original], dim=1).to(device)  # [vocab, 2]
    logits = backing[:, 0] if not contiguous else backing[:, 0].clone()
    assert logits.is_contiguous() == contiguous
    for _ in range(2):  # the second call reuses the buffers made by the first
        matcher.mask_logits(logits)
        result = logits.cpu()
        assert torch.equal(torch.isfinite(result), allowed)
        assert torch.equal(result[allowed], original[allowed]), "allowed logits must not change"
        assert (result[~allowed] == float("-inf")).all()


def test_logits_of_the_wrong_width_are_rejected(compiler: GrammarCompiler) -> None:
    matcher = compiler.compile(json_object_grammar()).matcher()
    with pytest.raises(ValueError, match="logits must be"):
        matcher.mask_logits(torch.zeros(TOKENIZER_VOCAB))


def test_lm_head_narrower_than_the_tokenizer(tokenizer: PreTrainedTokenizerFast) -> None:
    narrow = TOKENIZER_VOCAB - 10
    matcher = GrammarCompiler(tokenizer, narrow, [EOS]).compile(json_object_grammar()).matcher()
    logits = torch.zeros(narrow)
    matcher.mask_logits(logits)
    assert tokenizer.convert_ids_to_tokens(torch.isfinite(logits).nonzero().flatten().tolist()) == ["{"]


def test_matchers_of_one_grammar_are_independent(
    compiler: GrammarCompiler, tokenizer: PreTrainedTokenizerFast
) -> None:
    compiled = compiler.compile(json_schema_grammar(OPTIONAL_SCHEMA))
    first = compiled.matcher()
    assert feed(first, tokenizer, '{"a": "x"}') and first.done
    second = compiled.matcher()
    assert not second.done and feed(second, tokenizer, '{"z": 2, "a": "y"}') and second.done


def test_grammars_are_values_and_compiles_are_cached(tokenizer: PreTrainedTokenizerFast) -> None:
    compiler = GrammarCompiler(tokenizer, MODEL_VOCAB, [EOS], cache_size=1)
    one, same = json_schema_grammar(PET_SCHEMA), json_schema_grammar(dict(PET_SCHEMA))
    assert one == same and hash(one) == hash(same) and one != json_object_grammar()
    compiled = compiler.compile(one)
    assert isinstance(compiled, CompiledGrammar) and compiler.compile(same) is compiled
    compiler.compile(json_object_grammar())  # evicts the schema (cache of one)
    assert compiler.compile(one) is not compiled


def test_compile_from_many_threads(tokenizer: PreTrainedTokenizerFast) -> None:
    compiler = GrammarCompiler(tokenizer, MODEL_VOCAB, [EOS], cache_size=2)
    grammars = [json_schema_grammar(PET_SCHEMA), json_object_grammar(), tool_call_grammar([WEATHER])]
    results: list[CompiledGrammar] = []
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for j in range(10):
                results.append(compiler.compile(grammars[(i + j) % len(grammars)]))
        except BaseException as exc:  # surfaced below: a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 60


class _NotJson:
    pass


HUGE_BAD_TYPE = "x" * 10_000


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ("notadict", "must be an object"),
        ([{"type": "object"}], "must be an object"),
        ({"type": "strnig"}, "Invalid type: strnig"),
        ({"type": 5}, "type must be a string"),
        ({"$ref": "#/$defs/nope"}, "does not exist"),
        ({"type": "object", "properties": {"a": {"$ref": "#/definitions/x"}}}, "does not exist"),
        ({"type": "integer", "minimum": 5, "maximum": 1}, "Unsatisfiable"),
        ({"type": "string", "pattern": "(["}, "regex parse error"),
        ({"not": {"type": "string"}}, "Unimplemented keys"),
        ({"type": "array", "uniqueItems": True}, "Unimplemented keys"),
        ({"type": "object", "properties": {"a": _NotJson()}}, "not JSON"),
        ({"type": "number", "maximum": float("nan")}, "not JSON"),
        ({"type": HUGE_BAD_TYPE}, "Invalid type"),
    ],
)
def test_bad_schemas_raise_a_short_grammar_error(schema: Any, message: str) -> None:
    with pytest.raises(GrammarError, match="^.*" + message) as info:
        json_schema_grammar(schema)
    assert len(str(info.value)) <= MAX_ERROR_CHARS + 40


def test_bad_tool_schemas_name_the_tool() -> None:
    with pytest.raises(GrammarError, match="at least one tool"):
        tool_call_grammar([])
    bad = ToolCallSyntax("<f>", {"type": "strnig"}, "</f>")
    with pytest.raises(GrammarError, match=r"^tool 1: .*Invalid type"):
        tool_call_grammar([WEATHER, bad])


@pytest.mark.parametrize(
    ("vocab_size", "eos_ids"),
    [(0, [EOS]), (MODEL_VOCAB, []), (MODEL_VOCAB, [MODEL_VOCAB]), (MODEL_VOCAB, [-1])],
)
def test_compiler_rejects_bad_configuration(
    tokenizer: PreTrainedTokenizerFast, vocab_size: int, eos_ids: list[int]
) -> None:
    with pytest.raises(ValueError):
        GrammarCompiler(tokenizer, vocab_size, eos_ids)


def test_grammar_is_a_plain_value() -> None:
    grammar = json_object_grammar()
    assert isinstance(grammar, Grammar) and grammar.kind == "json_object" and isinstance(grammar.source, str)
