"""The agent API against live servers, driven by the official openai client: tools and tool calls
(forced by the grammar mask in each template family's own syntax, streamed and not, assembled
by the SDK's stream helper), the next round's cache hit, structured outputs, logprobs, n > 1,
and the 400s for what is not implemented.

The tiny random-weight models can only write a valid call or object through the mask: every test
that checks a masked output also has a control run without the mask that fails the same check.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import jsonschema
import pytest
import torch
from openai import BadRequestError, OpenAI
from pydantic import BaseModel, Field
from transformers import AutoModelForCausalLM, AutoTokenizer

from model_runner.chat_template import ChatTemplate
from model_runner.detokenize import TokenPieces
from tests.proxy.conftest import BLOCK_SIZE, ServerFactory
from tests.proxy.helpers import WEATHER_SCHEMA, salt
from tests.support.chat_templates import (
    LLAMA3_TOOLS,
    MISTRAL_TOOLS,
    PLAIN_CHATML,
    QWEN_TOOLS,
    save_tiny_model_with_template,
)
from tests.support.live_server import LiveServer

MODEL = "tiny"
CONTEXT = 2048
TEMPLATES = {"qwen": QWEN_TOOLS, "llama3": LLAMA3_TOOLS, "mistral": MISTRAL_TOOLS}

WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Weather.", "parameters": WEATHER_SCHEMA},
}
SEARCH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"query": {"type": "string", "maxLength": 8}},
    "required": ["query"],
    "additionalProperties": False,
}
SEARCH = {
    "type": "function",
    "function": {"name": "search", "description": "Search.", "parameters": SEARCH_SCHEMA},
}
SCHEMAS = {"get_weather": WEATHER_SCHEMA, "search": SEARCH_SCHEMA}
THINKING_CHATML = PLAIN_CHATML.replace("'<|im_start|>assistant\\n'", "'<|im_start|>assistant\\n<think>\\n'")
"""ChatML whose generation prompt opens a thinking block (as DeepSeek-R1's template does): the
reply is reasoning until the model closes it."""
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the weather in Paris?"},
]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    dirs = {}
    for name, template in {**TEMPLATES, "plain": PLAIN_CHATML, "thinking": THINKING_CHATML}.items():
        dirs[name] = save_tiny_model_with_template(
            "qwen2", template, tmp_path_factory.mktemp(f"agent-{name}"), max_positions=CONTEXT
        )
    return dirs


@pytest.fixture(scope="module")
def servers(
    module_server_factory: ServerFactory, model_dirs: dict[str, Path]
) -> Iterator[dict[str, LiveServer]]:
    started = {}
    for name, path in model_dirs.items():
        started[name] = module_server_factory(
            "--model", str(path), "--served-model-name", MODEL, "--no-disk", "--max-context", str(CONTEXT)
        )
    yield started


def client_for(server: LiveServer) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def valid_call(call: Any) -> bool:
    """Whether a returned tool call names a tool and its arguments validate against its schema."""
    schema = SCHEMAS.get(call.function.name)
    if schema is None:
        return False
    try:
        jsonschema.validate(json.loads(call.function.arguments), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def _forced(**extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": MESSAGES,
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "max_tokens": 120,
        "temperature": 1.0,
        "seed": 7,
        "extra_body": {"cache_salt": salt()},
        **extra,
    }


@pytest.mark.parametrize("family", list(TEMPLATES))
def test_a_forced_tool_call_comes_back_valid_whole_and_streamed(
    servers: dict[str, LiveServer], family: str
) -> None:
    client = client_for(servers[family])
    resp = client.chat.completions.create(**_forced())
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id and valid_call(call), call

    # Streamed: id and name first, then argument fragments, in OpenAI's delta shape.
    deltas = []
    finish = None
    for chunk in client.chat.completions.create(**_forced(), stream=True):
        for c in chunk.choices:
            deltas.extend(c.delta.tool_calls or [])
            finish = c.finish_reason or finish
    assert finish == "tool_calls"
    assert deltas and deltas[0].id and deltas[0].function.name == "get_weather"
    assert all(d.index == 0 for d in deltas)
    arguments = "".join(d.function.arguments or "" for d in deltas)
    assert len([d for d in deltas if d.function.arguments]) >= 1
    jsonschema.validate(json.loads(arguments), WEATHER_SCHEMA)

    # The SDK's stream helper assembles the same kind of call.
    with client.chat.completions.stream(**_forced()) as stream:
        final = stream.get_final_completion()
    (assembled,) = final.choices[0].message.tool_calls
    assert valid_call(assembled) and final.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("family", list(TEMPLATES))
def test_without_the_mask_the_same_request_fails_the_check(
    servers: dict[str, LiveServer], family: str
) -> None:
    """The control run: the random model writes no valid call of its own."""
    client = client_for(servers[family])
    for seed in (7, 8, 9):
        resp = client.chat.completions.create(**_forced(tool_choice="auto", seed=seed, max_tokens=60))
        calls = resp.choices[0].message.tool_calls or []
        assert not any(valid_call(c) for c in calls)


@pytest.mark.parametrize("family", list(TEMPLATES))
def test_required_picks_one_of_the_tools(servers: dict[str, LiveServer], family: str) -> None:
    client = client_for(servers[family])
    names = set()
    for seed in range(4):
        resp = client.chat.completions.create(
            **_forced(tools=[WEATHER, SEARCH], tool_choice="required", seed=seed)
        )
        (call,) = resp.choices[0].message.tool_calls
        assert valid_call(call)
        names.add(call.function.name)
    assert names <= {"get_weather", "search"}


@pytest.mark.parametrize("family", list(TEMPLATES))
def test_the_next_round_hits_the_prompt_and_the_generated_call(
    servers: dict[str, LiveServer], family: str
) -> None:
    cached, expected = _round_trip_cached(servers[family])
    assert cached >= expected, (cached, expected)


def _round_trip_cached(server: LiveServer) -> tuple[int, int]:
    """(cached tokens of the next round, the previous prompt + generated call in whole blocks)."""
    client = client_for(server)
    cache_salt = salt()
    first = client.chat.completions.create(**_forced(extra_body={"cache_salt": cache_salt}))
    call = first.choices[0].message.tool_calls[0]
    history = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump(exclude_none=True)]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    second = client.chat.completions.create(
        model=MODEL,
        messages=history,
        tools=[WEATHER],
        max_tokens=2,
        temperature=0,
        extra_body={"cache_salt": cache_salt},
    )
    reused = first.usage.prompt_tokens + first.usage.completion_tokens
    return second.usage.prompt_tokens_details.cached_tokens, reused // BLOCK_SIZE * BLOCK_SIZE


def test_without_history_warming_the_re_tokenized_markers_miss(
    module_server_factory: ServerFactory, model_dirs: dict[str, Path]
) -> None:
    """The control for the warming: under the mask the tiny model spells the Hermes markers byte by
    byte, which re-tokenize differently, so without warming the next round misses from there."""
    server = module_server_factory(
        "--model", str(model_dirs["qwen"]), "--served-model-name", MODEL, "--no-disk",
        "--max-context", str(CONTEXT), "--no-history-warming",
    )  # fmt: skip
    cached, expected = _round_trip_cached(server)
    assert cached < expected


def test_tools_on_a_template_without_tool_support_are_a_400(servers: dict[str, LiveServer]) -> None:
    client = client_for(servers["plain"])
    with pytest.raises(BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[WEATHER], max_tokens=4)
    assert err.value.body["param"] == "tools"
    # Without tools the same server answers.
    assert client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2).choices


class Forecast(BaseModel):
    city: Literal["Paris", "Tokyo"]
    rainy: bool
    note: str = Field(max_length=6)


def test_parse_with_a_pydantic_model_returns_a_parsed_object(servers: dict[str, LiveServer]) -> None:
    client = client_for(servers["qwen"])
    completion = client.chat.completions.parse(
        model=MODEL, messages=MESSAGES, response_format=Forecast, max_tokens=120, temperature=1.0, seed=3
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Forecast)
    # Control: the same request without the schema does not give a Forecast.
    plain = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=60, temperature=1.0, seed=3
    )
    with pytest.raises(ValueError):
        Forecast.model_validate_json(plain.choices[0].message.content or "")


def test_json_object_output_is_valid_json(
    servers: dict[str, LiveServer], reference_model: tuple[Any, Any]
) -> None:
    """Every output that ends with "stop" is a JSON object. Unbounded keys let a random model run
    to max_tokens inside the object, so a logit bias towards '"' and '}' makes it close them
    (the bias is applied before the mask: the grammar still decides what is allowed). Without
    the mask the same biased request is not JSON."""
    _, tokenizer = reference_model
    bias = {str(tokenizer.convert_tokens_to_ids(t)): 4 for t in ('"', "}")}
    client = client_for(servers["qwen"])
    stops = 0
    for seed in range(4):
        common = {"model": MODEL, "messages": MESSAGES, "max_tokens": 150, "temperature": 1.0, "seed": seed}
        resp = client.chat.completions.create(
            **common, response_format={"type": "json_object"}, logit_bias=bias
        )
        choice = resp.choices[0]
        if choice.finish_reason == "stop":
            stops += 1
            assert isinstance(json.loads(choice.message.content), dict)
        else:
            assert choice.finish_reason == "length"
        control = client.chat.completions.create(**common, logit_bias=bias).choices[0].message.content
        with pytest.raises(ValueError):
            json.loads(control or "")
    assert stops >= 3, "objects did not close within max_tokens: pick other seeds"


def test_a_response_cut_by_max_tokens_ends_with_length_and_claims_nothing(
    servers: dict[str, LiveServer],
) -> None:
    client = client_for(servers["qwen"])
    resp = client.chat.completions.create(**_forced(max_tokens=3))
    choice = resp.choices[0]
    assert choice.finish_reason == "length"
    assert not choice.message.tool_calls


@pytest.fixture(scope="module")
def reference_model(model_dirs: dict[str, Path]) -> tuple[Any, Any]:
    path = model_dirs["qwen"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logprobs_match_plain_transformers(
    servers: dict[str, LiveServer], reference_model: tuple[Any, Any], temperature: float
) -> None:
    """Chat logprobs (their bytes name the exact token) against a log-softmax of the logits of a
    plain transformers forward over the same prompt and the tokens generated so far."""
    model, tokenizer = reference_model
    pieces = TokenPieces(tokenizer)
    by_bytes: dict[bytes, int] = {}
    for token_id in range(len(tokenizer)):
        by_bytes.setdefault(pieces.piece(token_id)[1], token_id)
    client = client_for(servers["qwen"])
    resp = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=6,
        temperature=temperature,
        seed=11,
        logprobs=True,
        top_logprobs=5,
    )
    template = ChatTemplate(tokenizer)
    prompt_ids = template.encode(template.normalize_messages(MESSAGES))
    generated: list[int] = []
    entries = resp.choices[0].logprobs.content
    assert len(entries) == resp.usage.completion_tokens or len(entries) == resp.usage.completion_tokens - 1
    for entry in entries:
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + generated])).logits[0, -1].float()
        expected = torch.log_softmax(logits, dim=-1)
        token_id = by_bytes[bytes(entry.bytes)]
        assert abs(float(expected[token_id]) - entry.logprob) < 1e-4
        best = torch.topk(expected, 5)
        assert [by_bytes[bytes(t.bytes)] for t in entry.top_logprobs] == best.indices.tolist()
        for t, v in zip(entry.top_logprobs, best.values.tolist(), strict=True):
            assert abs(t.logprob - v) < 1e-4
        if temperature == 0.0:
            assert token_id == int(best.indices[0]), "at temperature 0 the sampled token is the top-1"
        generated.append(token_id)


def test_completion_logprobs_in_the_legacy_shape(servers: dict[str, LiveServer]) -> None:
    client = client_for(servers["qwen"])
    for stream in (False, True):
        kwargs = {
            "model": MODEL,
            "prompt": "The quick brown fox",
            "max_tokens": 6,
            "temperature": 0,
            "logprobs": 3,
        }
        if stream:
            tokens, values, tops, offsets, text = [], [], [], [], ""
            for chunk in client.completions.create(**kwargs, stream=True):
                for c in chunk.choices:
                    text += c.text
                    if c.logprobs is not None:
                        tokens += c.logprobs.tokens
                        values += c.logprobs.token_logprobs
                        tops += c.logprobs.top_logprobs
                        offsets += c.logprobs.text_offset
        else:
            choice = client.completions.create(**kwargs).choices[0]
            lp = choice.logprobs
            tokens, values, tops, offsets, text = (
                lp.tokens,
                lp.token_logprobs,
                lp.top_logprobs,
                lp.text_offset,
                choice.text,
            )
        assert tokens and len(tokens) == len(values) == len(tops) == len(offsets)
        assert offsets[0] == 0 and offsets == sorted(offsets)
        for _token, value, top in zip(tokens, values, tops, strict=True):
            assert 1 <= len(top) <= 3
            assert max(top.values()) == pytest.approx(value)  # greedy: the sampled token is the top-1


def test_chat_logprobs_shape_streamed_and_not(servers: dict[str, LiveServer]) -> None:
    client = client_for(servers["qwen"])
    common = {
        "model": MODEL,
        "messages": MESSAGES,
        "max_tokens": 5,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 3,
    }
    resp = client.chat.completions.create(**common)
    content = resp.choices[0].logprobs.content
    assert content and all(len(e.top_logprobs) == 3 for e in content)
    for entry in content:
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy: the top-1
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token
    streamed = []
    for chunk in client.chat.completions.create(**common, stream=True):
        for c in chunk.choices:
            if c.logprobs is not None and c.logprobs.content:
                streamed.extend(c.logprobs.content)
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [
        (e.token, round(e.logprob, 5)) for e in content
    ]


def _metric(server: LiveServer, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(name + " ") or line.startswith(name + "{")
    )


def test_n_choices_share_one_prefill_and_equal_single_runs(servers: dict[str, LiveServer]) -> None:
    client = client_for(servers["qwen"])
    cache_salt = salt()
    common = {"model": MODEL, "messages": MESSAGES, "max_tokens": 8, "temperature": 1.0}
    resp = client.chat.completions.create(**common, n=3, seed=100, extra_body={"cache_salt": cache_salt})
    assert [c.index for c in resp.choices] == [0, 1, 2]
    texts = [c.message.content for c in resp.choices]
    assert len(set(texts)) == 3, texts
    usage = resp.usage
    assert usage.prompt_tokens == usage.model_extra["kvproxy"]["prefilled_tokens"]  # counted once, cold
    assert usage.completion_tokens == sum(1 for _ in range(3)) * 0 + usage.completion_tokens
    for i in range(3):
        single = client.chat.completions.create(**common, seed=100 + i, extra_body={"cache_salt": salt()})
        assert single.choices[0].message.content == texts[i], i
    # Streamed: every choice's deltas carry its index, each ends with its own finish_reason.
    finishes: dict[int, str] = {}
    parts: dict[int, list[str]] = {0: [], 1: [], 2: []}
    for chunk in client.chat.completions.create(
        **common, n=3, seed=100, stream=True, extra_body={"cache_salt": salt()}
    ):
        for c in chunk.choices:
            parts[c.index].append(c.delta.content or "")
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert set(finishes) == {0, 1, 2}
    assert ["".join(parts[i]) for i in range(3)] == texts


def test_penalties_and_logit_bias_are_applied(
    servers: dict[str, LiveServer], reference_model: tuple[Any, Any]
) -> None:
    _, tokenizer = reference_model
    client = client_for(servers["qwen"])
    forced = tokenizer.convert_tokens_to_ids("a")
    resp = client.completions.create(
        model=MODEL, prompt="hello", max_tokens=4, temperature=1.0, seed=1, logit_bias={str(forced): 100}
    )
    assert resp.choices[0].text == "aaaa"
    plain = client.completions.create(model=MODEL, prompt="hello there", max_tokens=12, temperature=0)
    penalized = client.completions.create(
        model=MODEL,
        prompt="hello there",
        max_tokens=12,
        temperature=0,
        frequency_penalty=2.0,
        presence_penalty=2.0,
    )
    assert penalized.choices[0].text != plain.choices[0].text


BAD: list[tuple[str, str, dict[str, Any], str]] = [
    ("audio", "chat", {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ("modalities", "chat", {"modalities": ["text", "audio"]}, "modalities"),
    ("prediction", "chat", {"prediction": {"type": "content", "content": "x"}}, "prediction"),
    (
        "image-part",
        "chat",
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}
            ]
        },
        "messages[0].content[0].type",
    ),
    ("echo", "completions", {"echo": True}, "echo"),
    ("best_of", "completions", {"best_of": 3}, "best_of"),
    ("suffix", "completions", {"suffix": "tail"}, "suffix"),
    ("tools-on-completions", "completions", {"tools": [WEATHER]}, "tools"),
    ("top-logprobs-over-20", "chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("top-logprobs-without-logprobs", "chat", {"top_logprobs": 2}, "top_logprobs"),
    ("completion-logprobs-over-5", "completions", {"logprobs": 6}, "logprobs"),
    ("n-too-many", "chat", {"n": 1000}, "n"),
    ("logit-bias-key", "chat", {"logit_bias": {"abc": 1}}, "logit_bias"),
    ("logit-bias-value", "chat", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("logit-bias-unknown-token", "chat", {"logit_bias": {"99999": 1}}, "logit_bias"),
    ("penalty-range", "chat", {"frequency_penalty": 3}, "frequency_penalty"),
    (
        "unknown-named-tool",
        "chat",
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice",
    ),
    ("required-without-tools", "chat", {"tool_choice": "required"}, "tool_choice"),
    (
        "bad-tool-schema",
        "chat",
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]},
        "tools[0].function.parameters",
    ),
    (
        "bad-response-schema",
        "chat",
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
        "response_format.json_schema.schema",
    ),
    (
        "bad-call-arguments",
        "chat",
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": "{not json"},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "x"},
            ],
            "tools": [WEATHER],
        },
        "messages[1].tool_calls[0].function.arguments",
    ),
    ("tool-message-without-id", "chat", {"messages": [{"role": "tool", "content": "x"}]}, "messages[0]"),
]


@pytest.mark.parametrize(("case", "route", "fields", "param"), BAD, ids=[b[0] for b in BAD])
def test_bad_agent_fields_are_a_400_naming_the_field(
    servers: dict[str, LiveServer], case: str, route: str, fields: dict[str, Any], param: str
) -> None:
    base: dict[str, Any] = {"model": MODEL, "max_tokens": 2}
    base.update({"messages": MESSAGES} if route == "chat" else {"prompt": "hi"})
    body = {**base, **fields}
    path = "/v1/chat/completions" if route == "chat" else "/v1/completions"
    resp = httpx.post(servers["qwen"].url + path, json=body, timeout=60)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"


def test_harmless_fields_are_accepted(servers: dict[str, LiveServer]) -> None:
    body = {
        "model": MODEL,
        "messages": MESSAGES,
        "max_tokens": 2,
        "user": "u1",
        "metadata": {"k": "v"},
        "store": False,
        "service_tier": "auto",
        "prompt_cache_key": "agent-1",
        "tools": [],
        "reasoning_effort": "low",
        "parallel_tool_calls": True,
        "response_format": {"type": "text"},
    }
    resp = httpx.post(servers["qwen"].url + "/v1/chat/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text


Check = Callable[[Any], bool]


def test_reasoning_goes_to_reasoning_content_whole_and_streamed(servers: dict[str, LiveServer]) -> None:
    assert "<think>" in THINKING_CHATML
    client = client_for(servers["thinking"])
    common = {"model": MODEL, "messages": MESSAGES, "max_tokens": 12, "temperature": 0}
    message = client.chat.completions.create(**common).choices[0].message
    reasoning = (message.model_extra or {}).get("reasoning_content")
    assert reasoning and not message.content  # the block never closed: all of it is thinking
    streamed: list[str] = []
    for chunk in client.chat.completions.create(**common, stream=True):
        for c in chunk.choices:
            assert not c.delta.content
            streamed.append((c.delta.model_extra or {}).get("reasoning_content") or "")
    assert "".join(streamed) == reasoning
    # The same text from a template without a thinking block is plain content.
    plain = client_for(servers["plain"]).chat.completions.create(**common).choices[0].message
    assert plain.content and not (plain.model_extra or {}).get("reasoning_content")


def test_legacy_functions_map_onto_tools(servers: dict[str, LiveServer]) -> None:
    body = {
        "model": MODEL,
        "messages": MESSAGES,
        "functions": [WEATHER["function"]],
        "function_call": {"name": "get_weather"},
        "max_tokens": 120,
        "temperature": 1.0,
        "seed": 3,
    }
    resp = httpx.post(servers["qwen"].url + "/v1/chat/completions", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    assert choice["finish_reason"] == "function_call"
    call = choice["message"]["function_call"]
    assert call["name"] == "get_weather" and not choice["message"]["tool_calls"]
    jsonschema.validate(json.loads(call["arguments"]), WEATHER_SCHEMA)
    # The legacy history (assistant function_call + a function message) renders and answers.
    history = [
        *MESSAGES,
        {"role": "assistant", "content": None, "function_call": call},
        {"role": "function", "name": "get_weather", "content": '{"temperature": 21}'},
    ]
    again = httpx.post(
        servers["qwen"].url + "/v1/chat/completions",
        json={"model": MODEL, "messages": history, "functions": [WEATHER["function"]], "max_tokens": 3},
        timeout=120,
    )
    assert again.status_code == 200, again.text


def test_tool_choice_none_leaves_tool_markup_as_text(servers: dict[str, LiveServer]) -> None:
    client = client_for(servers["qwen"])
    resp = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=[WEATHER], tool_choice="none", max_tokens=8, temperature=0
    )
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert not resp.choices[0].message.tool_calls


def test_parallel_tool_calls_false_keeps_one_call(servers: dict[str, LiveServer]) -> None:
    client = client_for(servers["qwen"])
    resp = client.chat.completions.create(
        **_forced(tools=[WEATHER, SEARCH], tool_choice="required", parallel_tool_calls=False)
    )
    assert len(resp.choices[0].message.tool_calls) == 1
