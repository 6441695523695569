"""Output parsing: content / reasoning / tool calls, streamed and whole, for each format.

Every case is parsed whole, one character at a time and in random splits; the events must be the
same each way (adjacent text deltas merged) and must add up to the final message.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from dataclasses import dataclass

import pytest

from model_runner.response_parsing import (
    ContentDelta,
    ParsedMessage,
    ParseEvent,
    ParserSpec,
    ReasoningDelta,
    ToolCallArguments,
    ToolCallStart,
    parser_spec_for,
    spec_from_chat_template,
)
from model_runner.tokenizer_builder import train_bpe_tokenizer
from tests.support.tiny_models import tiny_corpus

CALL_ID = re.compile(r"call_[A-Za-z0-9]{24}")
QWEN_PROMPT = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def _chunkings(text: str) -> list[list[str]]:
    ways = [[text], list(text)]
    for seed in range(4):
        rng = random.Random(seed)
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12)))) if text else []
        bounds = [0, *cuts, len(text)]
        ways.append([text[a:b] for a, b in itertools.pairwise(bounds)])
    return ways


def _merged(events: list[ParseEvent]) -> list[ParseEvent]:
    out: list[ParseEvent] = []
    for e in events:
        last = out[-1] if out else None
        if isinstance(e, ContentDelta) and isinstance(last, ContentDelta):
            out[-1] = ContentDelta(last.text + e.text)
        elif isinstance(e, ReasoningDelta) and isinstance(last, ReasoningDelta):
            out[-1] = ReasoningDelta(last.text + e.text)
        elif (
            isinstance(e, ToolCallArguments) and isinstance(last, ToolCallArguments) and last.index == e.index
        ):
            out[-1] = ToolCallArguments(e.index, last.fragment + e.fragment)
        else:
            out.append(e)
    return out


def _check_events_add_up(message: ParsedMessage, events: list[ParseEvent]) -> None:
    assert all(not isinstance(e, ContentDelta | ReasoningDelta) or e.text for e in events)
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == (message.content or "")
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == (message.reasoning or "")
    starts = [e for e in events if isinstance(e, ToolCallStart)]
    assert [(s.index, s.id, s.name) for s in starts] == [
        (i, c.id, c.name) for i, c in enumerate(message.tool_calls)
    ]
    for i, call in enumerate(message.tool_calls):
        first = next(k for k, e in enumerate(events) if isinstance(e, ToolCallStart) and e.index == i)
        fragments = [
            (k, e.fragment) for k, e in enumerate(events) if isinstance(e, ToolCallArguments) and e.index == i
        ]
        assert all(k > first for k, _ in fragments), "arguments before the call's start"
        assert "".join(f for _, f in fragments) == call.arguments
        assert isinstance(json.loads(call.arguments), dict)


def parse(
    spec: ParserSpec, text: str, *, prompt: str = "", parse_tools: bool = True, tools: list | None = None
) -> ParsedMessage:
    """Parse ``text`` every way it can be split; all ways must agree. Returns the message."""
    results = []
    for chunks in _chunkings(text):
        parser = spec.new(prompt_text=prompt, tools=tools, parse_tools=parse_tools, rng=random.Random(7))
        events = [e for chunk in chunks for e in parser.feed(chunk)]
        message, last = parser.finish()
        events += last
        _check_events_add_up(message, events)
        results.append((message, _merged(events)))
    for other in results[1:]:
        assert other == results[0], "the events depend on how the text was split"
    return results[0][0]


@dataclass(frozen=True)
class Case:
    id: str
    text: str
    content: str | None
    calls: tuple[tuple[str, str], ...] = ()
    reasoning: str | None = None
    prompt: str = ""
    parse_tools: bool = True


def _check(spec: ParserSpec, case: Case) -> ParsedMessage:
    message = parse(spec, case.text, prompt=case.prompt, parse_tools=case.parse_tools)
    assert message.content == case.content
    assert message.reasoning == case.reasoning
    assert tuple((c.name, c.arguments) for c in message.tool_calls) == case.calls
    return message


def hermes(name: str, arguments: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


NESTED = '{"q": {"text": "Grüße 🙂 日本", "tags": ["a", {"b": null}]}, "n": -1.5e3, "ok": true}'
BAD_JSON = '<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>'

HERMES_CASES = [
    Case(
        "one call", hermes("get_weather", '{"city": "Paris"}'), None, (("get_weather", '{"city": "Paris"}'),)
    ),
    Case(
        "two calls",
        hermes("a", '{"x": 1}') + "\n" + hermes("b", "{}"),
        None,
        (("a", '{"x": 1}'), ("b", "{}")),
    ),
    Case(
        "content then call",
        "Let me check.\n\n" + hermes("f", '{"a": 1}'),
        "Let me check.",
        (("f", '{"a": 1}'),),
    ),
    Case(
        "call then content",
        hermes("f", "{}") + "\n\nDone.",
        "Done.",
        (("f", "{}"),),
    ),
    Case("nested args and unicode", hermes("search", NESTED), None, (("search", NESTED),)),
    Case("arguments kept as written", hermes("f", '{ "a" :1 }'), None, (("f", '{ "a" :1 }'),)),
    Case("arguments as a JSON string", hermes("f", '"{\\"a\\": 1}"'), None, (("f", '{"a": 1}'),)),
    Case("no arguments", '<tool_call>{"name": "f"}</tool_call>', None, (("f", "{}"),)),
    Case(
        "a list in one tag",
        '<tool_call>[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": 1}}]</tool_call>',
        None,
        (("a", "{}"), ("b", '{"x": 1}')),
    ),
    Case("an empty list is content", "<tool_call>[]</tool_call>", "<tool_call>[]</tool_call>"),
    Case("unknown tool name is still a call", hermes("nope", "{}"), None, (("nope", "{}"),)),
    Case("malformed JSON is content", "Hi " + BAD_JSON, "Hi " + BAD_JSON),
    Case(
        "malformed call, then a good one",
        BAD_JSON + "\n" + hermes("g", "{}"),
        BAD_JSON,
        (("g", "{}"),),
    ),
    Case(
        "no name is content",
        '<tool_call>{"arguments": {}}</tool_call>',
        '<tool_call>{"arguments": {}}</tool_call>',
    ),
    Case("arguments not an object", hermes("f", "[1]"), hermes("f", "[1]")),
    Case("NaN is not JSON", hermes("f", '{"a": NaN}'), hermes("f", '{"a": NaN}')),
    Case(
        "truncated call is content",
        'Sure <tool_call>\n{"name": "f", "argu',
        'Sure <tool_call>\n{"name": "f", "argu',
    ),
    Case("unclosed but complete call", '<tool_call>\n{"name": "f", "arguments": {}}\n', None, (("f", "{}"),)),
    Case("marker prefix at the end", "a < b and <tool_c", "a < b and <tool_c"),
    Case("plain text is exact", "  two\nlines  \n", "  two\nlines  \n"),
    Case("no tools: markup is content", hermes("f", "{}"), hermes("f", "{}"), parse_tools=False),
    Case(
        "reasoning then call",
        "<think>\nI should call f.\n</think>\n\n" + hermes("f", '{"a": "é"}'),
        None,
        (("f", '{"a": "é"}'),),
        reasoning="I should call f.",
    ),
    Case(
        "reasoning opened by the prompt",
        "plan it\n</think>\n\nThe answer.",
        "The answer.",
        reasoning="plan it",
        prompt=QWEN_PROMPT + "<think>\n",
    ),
    Case(
        "prompt-opened reasoning, then a call",
        "plan</think>" + hermes("f", "{}"),
        None,
        (("f", "{}"),),
        reasoning="plan",
        prompt=QWEN_PROMPT + "<think>\n",
    ),
    Case(
        "reasoning closed by the prompt",
        "\n\nAnswer </think>",
        "Answer </think>",
        prompt=QWEN_PROMPT + "<think>\n\n</think>\n\n",
    ),
    Case(
        "calls inside reasoning are reasoning",
        "<think>" + hermes("f", "{}") + "</think>ok",
        "ok",
        reasoning=hermes("f", "{}"),
    ),
    Case("unterminated reasoning", "<think>\nstill thinking", None, reasoning="still thinking"),
    Case("think later in the reply is content", "Hi <think>x</think>", "Hi <think>x</think>"),
    Case(
        "reasoning without tools",
        "<think>r</think>" + hermes("f", "{}"),
        hermes("f", "{}"),
        reasoning="r",
        parse_tools=False,
    ),
]


@pytest.mark.parametrize("case", HERMES_CASES, ids=lambda c: c.id)
def test_hermes(case: Case) -> None:
    _check(ParserSpec("hermes", reasoning=True), case)


def mistral(*calls: str) -> str:
    return "[TOOL_CALLS][" + ", ".join(calls) + "]"


MISTRAL_CASES = [
    Case(
        "one call",
        mistral('{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abc123def"}'),
        None,
        (("get_weather", '{"city": "Paris"}'),),
    ),
    Case(
        "two calls, content before",
        "Checking both. "
        + mistral('{"name": "a", "arguments": {}}', '{"name": "b", "arguments": {"x": [1]}}'),
        "Checking both.",
        (("a", "{}"), ("b", '{"x": [1]}')),
    ),
    Case(
        "nested args and unicode", mistral(f'{{"name": "s", "arguments": {NESTED}}}'), None, (("s", NESTED),)
    ),
    Case("one call object", '[TOOL_CALLS]{"name": "f", "arguments": {"a": 1}}', None, (("f", '{"a": 1}'),)),
    Case(
        "name and ARGS form",
        '[TOOL_CALLS]f[ARGS]{"a": 1}[TOOL_CALLS]g[ARGS]{}',
        None,
        (("f", '{"a": 1}'), ("g", "{}")),
    ),
    Case(
        "malformed JSON is content",
        '[TOOL_CALLS][{"name": "f", "arguments": {]',
        '[TOOL_CALLS][{"name": "f", "arguments": {]',
    ),
    Case(
        "one bad call spoils the list",
        mistral('{"name": "f"}', '{"arguments": {}}'),
        mistral('{"name": "f"}', '{"arguments": {}}'),
    ),
    Case(
        "truncated is content", 'ok [TOOL_CALLS][{"name": "f", "argum', 'ok [TOOL_CALLS][{"name": "f", "argum'
    ),
    Case("empty list is content", "[TOOL_CALLS][]", "[TOOL_CALLS][]"),
    Case("bad name form is content", "[TOOL_CALLS]not a call", "[TOOL_CALLS]not a call"),
    Case("marker prefix at the end", "see [TOOL_CA", "see [TOOL_CA"),
    Case(
        "no tools: markup is content",
        mistral('{"name": "f", "arguments": {}}'),
        mistral('{"name": "f", "arguments": {}}'),
        parse_tools=False,
    ),
]


@pytest.mark.parametrize("case", MISTRAL_CASES, ids=lambda c: c.id)
def test_mistral(case: Case) -> None:
    _check(ParserSpec("mistral"), case)


def test_mistral_ids_come_from_the_text() -> None:
    text = mistral('{"name": "a", "arguments": {}, "id": "abc123def"}', '{"name": "b", "arguments": {}}')
    first, second = parse(ParserSpec("mistral"), text).tool_calls
    assert first.id == "abc123def"
    assert CALL_ID.fullmatch(second.id)
    assert (
        parse(ParserSpec("mistral"), "[TOOL_CALLS]f[CALL_ID]Xy9abc123[ARGS]{}").tool_calls[0].id
        == "Xy9abc123"
    )


LLAMA_CASES = [
    Case(
        "one call",
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        None,
        (("get_weather", '{"city": "Paris"}'),),
    ),
    Case("arguments spelling", '{"name": "f", "arguments": {"a": 1}}', None, (("f", '{"a": 1}'),)),
    Case(
        "two calls by ';'",
        '{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": 2}}',
        None,
        (("a", "{}"), ("b", '{"x": 2}')),
    ),
    Case(
        "two calls by newline",
        '\n{"name": "a", "parameters": {}}\n{"name": "b", "parameters": {}}\n',
        None,
        (("a", "{}"), ("b", "{}")),
    ),
    Case("python tag", '<|python_tag|>{"name": "f", "parameters": {}}', None, (("f", "{}"),)),
    Case("nested args and unicode", f'{{"name": "s", "parameters": {NESTED}}}', None, (("s", NESTED),)),
    Case("JSON that is no call", '{"name": "Bob", "age": 3}', '{"name": "Bob", "age": 3}'),
    Case("plain text", "Paris is the capital.", "Paris is the capital."),
    Case("text then JSON", 'Sure: {"name": "f", "parameters": {}}', 'Sure: {"name": "f", "parameters": {}}'),
    Case("call then text", '{"name": "f", "parameters": {}} done', '{"name": "f", "parameters": {}} done'),
    Case("truncated is content", '{"name": "f", "parameters": {"a": ', '{"name": "f", "parameters": {"a": '),
    Case("malformed JSON is content", '{"name": "f", "parameters": {a}}', '{"name": "f", "parameters": {a}}'),
    Case(
        "no tools: JSON is content",
        '{"name": "f", "parameters": {}}',
        '{"name": "f", "parameters": {}}',
        parse_tools=False,
    ),
]


@pytest.mark.parametrize("case", LLAMA_CASES, ids=lambda c: c.id)
def test_llama3(case: Case) -> None:
    _check(ParserSpec("llama3"), case)


@pytest.mark.parametrize("tool_format", [None, "hermes", "llama3", "mistral"])
def test_without_reasoning_think_tags_are_content(tool_format: str | None) -> None:
    case = Case("think", "<think>x</think> y", "<think>x</think> y", prompt="<think>\n")
    _check(ParserSpec(tool_format), case)


def test_reasoning_works_with_every_tool_format() -> None:
    for tool_format in (None, "llama3", "mistral"):
        message = parse(ParserSpec(tool_format, reasoning=True), "<think>\nr\n</think>\n\nok")
        assert (message.reasoning, message.content) == ("r", "ok")
    message = parse(ParserSpec("llama3", reasoning=True), '<think>r</think>\n{"name": "f", "parameters": {}}')
    assert (message.reasoning, message.content, message.tool_calls[0].name) == ("r", None, "f")


def test_call_ids_are_fresh_and_reproducible() -> None:
    text = hermes("a", "{}") + hermes("b", "{}")
    message = parse(ParserSpec("hermes"), text)
    ids = [c.id for c in message.tool_calls]
    assert all(CALL_ID.fullmatch(i) for i in ids) and ids[0] != ids[1]
    assert [c.id for c in parse(ParserSpec("hermes"), text).tool_calls] == ids  # same seed, same ids


def test_streams_the_call_before_the_end_and_content_as_it_comes() -> None:
    parser = ParserSpec("hermes").new(prompt_text="", tools=None, parse_tools=True)
    assert parser.feed("Hello wor") == [ContentDelta("Hello wor")]
    assert parser.feed("ld <tool_") == [ContentDelta("ld")]  # the space and "<tool_" may precede a call
    assert parser.feed('call>{"name": "f", "arguments": {}}') == []
    events = parser.feed("</tool_call>")
    assert [type(e) for e in events] == [ToolCallStart, ToolCallArguments]
    message, last = parser.finish()
    assert last == [] and message.content == "Hello world"
    with pytest.raises(RuntimeError):
        parser.feed("more")


# -- transformers' response_template -------------------------------------------------------------

QWEN_RESPONSE_TEMPLATE = {
    "start_anchor": "<|im_start|>assistant\n",
    "defaults": {"role": "assistant"},
    "fields": {
        "reasoning_content": {"open": "<think>", "close": "</think>"},
        "tool_calls": {
            "open": "<tool_call>",
            "close": "</tool_call>",
            "content": "json",
            "repeats": True,
            "transform": {"type": "function", "function": "{content}"},
        },
        "content": {"close": "<|im_end|>"},
    },
}


@pytest.fixture(scope="module")
def tokenizer():
    tok = train_bpe_tokenizer(tiny_corpus(), 384)
    tok.response_template = QWEN_RESPONSE_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def template_spec(tokenizer) -> ParserSpec:
    spec = parser_spec_for(tokenizer)
    assert (spec.tool_format, spec.reasoning) == ("transformers", True)
    return spec


@pytest.mark.parametrize(
    "text",
    [
        "Just an answer.",
        "<think>\nhmm\n</think>\n\nSure.",
        "<think>r</think>" + hermes("get_weather", '{"city": "Köln", "days": [1, 2]}'),
        "Checking. " + hermes("a", '{"x": {"y": null}}') + hermes("b", "{}"),
    ],
)
def test_template_path_agrees_with_transformers(tokenizer, template_spec: ParserSpec, text: str) -> None:
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    ours = parse(template_spec, text, prompt=prompt)
    theirs = tokenizer.parse_response(text, prefix=prompt)
    assert ours.content == theirs.get("content")
    assert ours.reasoning == theirs.get("reasoning_content")
    expected = [(c["function"]["name"], c["function"]["arguments"]) for c in theirs.get("tool_calls", [])]
    assert [(c.name, json.loads(c.arguments)) for c in ours.tool_calls] == expected
    assert all(CALL_ID.fullmatch(c.id) for c in ours.tool_calls)


TEMPLATE_CASES = [
    Case(
        "reasoning opened by the prompt",
        "plan\n</think>\n\nanswer",
        "answer",
        reasoning="plan",
        prompt=QWEN_PROMPT + "<think>\n",
    ),
    Case("unicode arguments re-serialised", hermes("f", '{"a":"é"}'), None, (("f", '{"a": "é"}'),)),
    Case("bad JSON is content, then a call", BAD_JSON + hermes("g", "{}"), BAD_JSON, (("g", "{}"),)),
    Case(
        "truncated call is content",
        'Hi <tool_call>{"name": "f", "arguments": {',
        'Hi <tool_call>{"name": "f", "arguments": {',
    ),
    Case(
        "no name is content",
        '<tool_call>{"arguments": {}}</tool_call>',
        '<tool_call>{"arguments": {}}</tool_call>',
    ),
    Case("no tools: markup is content", hermes("f", "{}"), hermes("f", "{}"), parse_tools=False),
]


@pytest.mark.parametrize("case", TEMPLATE_CASES, ids=lambda c: c.id)
def test_template_path(template_spec: ParserSpec, case: Case) -> None:
    _check(template_spec, case)


def test_template_path_casts_arguments_by_tool_schema(template_spec: ParserSpec) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "f",
                "parameters": {"type": "object", "properties": {"n": {"type": "integer"}}},
            },
        }
    ]
    message = parse(template_spec, hermes("f", '{"n": "7"}'), tools=tools)
    assert message.tool_calls[0].arguments == '{"n": 7}'


def test_template_path_leaves_the_tokenizer_template_alone(tokenizer, template_spec: ParserSpec) -> None:
    parse(template_spec, "x")
    assert "optional" not in tokenizer.response_template["fields"]["content"]


# -- choosing the spec ---------------------------------------------------------------------------

QWEN3_LIKE = '{%- if tools %}<tools></tools> <tool_call>\n{"name": ...}\n</tool_call>{%- endif %}<think>\n'
LLAMA31_LIKE = (
    '<|start_header_id|>ipython<|end_header_id|> Respond in the format {"name": function name, '
    '"parameters": dictionary of argument name and its value}'
)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (QWEN3_LIKE, ParserSpec("hermes", True)),
        ("{{ '<tool_call>' }}", ParserSpec("hermes", False)),
        ("{{ '[TOOL_CALLS]' + tool_calls | tojson }}", ParserSpec("mistral", False)),
        (LLAMA31_LIKE, ParserSpec("llama3", False)),
        ('{"parameters": x}', ParserSpec(None, False)),  # "parameters" alone is no Llama template
        ("{% if '</think>' in content %}{% endif %}", ParserSpec(None, True)),
        ("", ParserSpec(None, False)),
    ],
)
def test_spec_from_chat_template(source: str, expected: ParserSpec) -> None:
    assert spec_from_chat_template(source) == expected


def test_parser_spec_for_reads_the_tokenizer() -> None:
    tok = train_bpe_tokenizer(tiny_corpus(), 384)
    assert parser_spec_for(tok) == ParserSpec(None, False)  # plain ChatML
    tok.chat_template = {"default": "plain", "tool_use": QWEN3_LIKE}
    assert parser_spec_for(tok) == ParserSpec("hermes", True)
    tok.response_template = {"start_anchor": "x", "fields": {"content": {}}}
    assert parser_spec_for(tok).tool_format == "transformers"
    tok.response_template = {"start_anchor": "x", "fields": {"content": {"content": "nope"}}}
    with pytest.raises(ValueError):
        parser_spec_for(tok)


def test_specs_are_hashable() -> None:
    template = {"start_anchor": "x", "fields": {"content": {}}}
    specs = {
        ParserSpec("hermes", True),
        ParserSpec("hermes", True),
        ParserSpec("transformers", False, template),
    }
    assert len(specs) == 2


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tool_format": "xml"},
        {"tool_format": "transformers"},
        {"tool_format": "hermes", "response_template": {}},
    ],
)
def test_spec_rejects_bad_configs(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ParserSpec(**kwargs)
