"""The Anthropic Messages API against live servers, driven by the official ``anthropic`` SDK:
messages, streams (the SDK's helper and the raw SSE order), count_tokens and the ``?beta=true``
routes, usage that adds up to count_tokens, forced tool calls and the tool_result round's cache
hit, and every error as the SDK's own exception class with Anthropic's error body.

Two servers: the demo model behind API keys, with an alias and a one-deep queue (so a burst
overloads it; the other tests send one request at a time), and a tiny model with a tool-capable
template. Each cache figure is checked in its own ``cache_salt`` namespace, so test order does
not matter.
"""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anthropic
import httpx
import jsonschema
import pydantic
import pytest
from anthropic import Omit

from tests.proxy.conftest import BLOCK_SIZE, ServerFactory
from tests.proxy.helpers import WEATHER_SCHEMA, expected_cached, salt
from tests.support.chat_templates import QWEN_TOOLS, save_tiny_model_with_template
from tests.support.live_server import LiveServer

KEY = "sk-ant-kvproxy-test-0123456789"
ALIAS = "claude-sonnet-4-5"
TOOL_MODEL = "tiny"
TOOL_CONTEXT = 2048
SYSTEM = "You are a careful assistant for the kvproxy test suite. " * 12  # about 15 blocks
QUESTION = [{"role": "user", "content": "Tell me about caches."}]
USAGE_FIELDS = {
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
    "cache_creation",
}

WEATHER = {"name": "get_weather", "description": "Weather.", "input_schema": WEATHER_SCHEMA}
SEARCH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"query": {"type": "string", "maxLength": 8}},
    "required": ["query"],
    "additionalProperties": False,
}
SEARCH = {"name": "search", "description": "Search.", "input_schema": SEARCH_SCHEMA}
SCHEMAS = {"get_weather": WEATHER_SCHEMA, "search": SEARCH_SCHEMA}
TOOL_SYSTEM = "You are a helpful assistant."
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def demo(module_server_factory: ServerFactory, tmp_path_factory: pytest.TempPathFactory) -> LiveServer:
    keys = tmp_path_factory.mktemp("anthropic-keys") / "keys.txt"
    keys.write_text(f"{KEY} anthro\n")
    return module_server_factory(
        "--no-disk", "--served-model-name", "demo", "--served-model-name", ALIAS,
        "--api-keys", str(keys), "--max-queue", "1", "--max-batch", "1",
    )  # fmt: skip


@pytest.fixture(scope="module")
def tools_server(
    module_server_factory: ServerFactory, tmp_path_factory: pytest.TempPathFactory
) -> LiveServer:
    path = save_tiny_model_with_template(
        "qwen2", QWEN_TOOLS, tmp_path_factory.mktemp("anthropic-qwen"), max_positions=TOOL_CONTEXT
    )
    return module_server_factory(
        "--model", str(path), "--served-model-name", TOOL_MODEL, "--no-disk",
        "--max-context", str(TOOL_CONTEXT),
    )  # fmt: skip


@pytest.fixture(autouse=True)
def _no_ambient_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK reads these when a client is built without credentials: each test names its own."""
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def claude(server: LiveServer, **kwargs: Any) -> anthropic.Anthropic:
    if "auth_token" not in kwargs:
        kwargs.setdefault("api_key", KEY)
    return anthropic.Anthropic(base_url=server.url, max_retries=0, timeout=120, **kwargs)


def text_of(message: Any) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def total_input(usage: Any) -> int:
    return usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens


def usage_figures(usage: Any) -> dict[str, Any]:
    return usage.model_dump(include=USAGE_FIELDS)


def check_error_body(exc: anthropic.APIStatusError, status: int, kind: str) -> str:
    """Anthropic's error shape, exactly; returns the message."""
    assert exc.status_code == status
    body = exc.response.json()
    assert set(body) == {"type", "error"} and body["type"] == "error", body
    assert set(body["error"]) == {"type", "message"}, body
    assert body["error"]["type"] == kind and body["error"]["message"], body
    return str(body["error"]["message"])


# ---- messages.create ----------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["demo", ALIAS])
def test_create_answers_a_text_message_under_the_name_asked_for(demo: LiveServer, model: str) -> None:
    message = claude(demo).messages.create(model=model, max_tokens=4, messages=QUESTION)
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_")
    assert message.model == model
    (block,) = message.content
    assert block.type == "text" and block.text
    assert message.stop_reason == "max_tokens" and message.stop_sequence is None
    assert message.usage.output_tokens == 4
    # Both names serve the one model: the same greedy text.
    other = "demo" if model == ALIAS else ALIAS
    assert text_of(claude(demo).messages.create(model=other, max_tokens=4, messages=QUESTION)) == block.text


def test_an_unknown_model_is_not_found(demo: LiveServer) -> None:
    client = claude(demo)
    with pytest.raises(anthropic.NotFoundError) as err:
        client.messages.create(model="claude-nope", max_tokens=4, messages=QUESTION)
    assert "claude-nope" in check_error_body(err.value, 404, "not_found_error")
    with pytest.raises(anthropic.NotFoundError) as err:
        client.messages.count_tokens(model="claude-nope", messages=QUESTION)
    check_error_body(err.value, 404, "not_found_error")
    # A route of Anthropic's that this server does not serve: the same class and shape.
    with pytest.raises(anthropic.NotFoundError) as err:
        client.messages.batches.create(requests=[])
    check_error_body(err.value, 404, "not_found_error")


def test_a_stop_sequence_ends_the_text_before_it(demo: LiveServer) -> None:
    client = claude(demo)
    full = text_of(client.messages.create(model="demo", max_tokens=40, messages=QUESTION))
    # A word the greedy output contains, past its start.
    words = [w for w in full.split(" ") if re.fullmatch(r"[a-z]{3,}", w) and full.index(w) > 0]
    assert words, f"no plain word to stop on in {full!r}"
    stop = words[0]
    # Five: more than OpenAI's four (Anthropic allows them); the one that matches is the last.
    stops = ["qqqz1", "qqqz2", "qqqz3", "qqqz4", stop]
    request: dict[str, Any] = {
        "model": "demo",
        "max_tokens": 40,
        "messages": QUESTION,
        "stop_sequences": stops,
    }
    message = client.messages.create(**request)
    with client.messages.stream(**request) as stream:
        streamed_text = "".join(stream.text_stream)
        streamed = stream.get_final_message()
    for reply in (message, streamed):
        assert reply.stop_reason == "stop_sequence" and reply.stop_sequence == stop
        assert text_of(reply) == full[: full.index(stop)]
        assert reply.usage.output_tokens < 40
    assert streamed_text == text_of(message)  # nothing of the stop sequence was streamed


def test_a_reply_the_model_ends_itself_is_end_turn(demo: LiveServer) -> None:
    # Found by a search over prompts: the demo model's greedy reply to this one ends with its EOS
    # after 32 tokens.
    request: dict[str, Any] = {
        "model": "demo",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "fibonacci 3"}],
    }
    message = claude(demo).messages.create(**request)
    with claude(demo).messages.stream(**request) as stream:
        streamed = stream.get_final_message()
    for reply in (message, streamed):
        assert reply.stop_reason == "end_turn" and reply.stop_sequence is None, reply
        assert 0 < reply.usage.output_tokens < 64 and text_of(reply)
    assert text_of(streamed) == text_of(message)


BREAKPOINTS: list[tuple[str, dict[str, Any], str | None]] = [
    ("no-breakpoint", {"system": SYSTEM}, None),
    (
        "system-5m",
        {"system": [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}]},
        "5m",
    ),
    (
        "system-1h",
        {"system": [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral", "ttl": "1h"}}]},
        "1h",
    ),
    ("automatic", {"system": SYSTEM, "cache_control": {"type": "ephemeral"}}, "5m"),
]


@pytest.mark.parametrize(
    ("conversation", "ttl"), [(c, t) for _, c, t in BREAKPOINTS], ids=[i for i, *_ in BREAKPOINTS]
)
def test_usage_adds_up_to_count_tokens_cold_and_warm(
    demo: LiveServer, conversation: dict[str, Any], ttl: str | None
) -> None:
    client = claude(demo)
    counted = client.messages.count_tokens(model="demo", messages=QUESTION, **conversation).input_tokens
    cache_salt = salt()

    def ask() -> Any:
        return client.messages.create(
            model="demo",
            max_tokens=3,
            messages=QUESTION,
            extra_body={"cache_salt": cache_salt},
            **conversation,
        ).usage

    cold, warm = ask(), ask()
    for usage in (cold, warm):
        assert total_input(usage) == counted, usage
        assert usage.output_tokens == 3
        created = usage.cache_creation
        assert created.ephemeral_5m_input_tokens + created.ephemeral_1h_input_tokens == (
            usage.cache_creation_input_tokens
        )
    assert cold.cache_read_input_tokens == 0
    assert warm.cache_read_input_tokens == expected_cached(counted)
    assert warm.cache_creation_input_tokens == 0  # stored by the first request already
    if ttl is None:
        assert cold.cache_creation_input_tokens == 0
    else:
        written = cold.cache_creation_input_tokens
        assert written > 0 and written % BLOCK_SIZE == 0, cold
        by_ttl = cold.cache_creation.model_dump()
        assert by_ttl[f"ephemeral_{ttl}_input_tokens"] == written, cold


def test_temperature_zero_repeats_itself_and_reads_the_cache_the_second_time(demo: LiveServer) -> None:
    client = claude(demo)
    extra = {"temperature": 0, "cache_salt": salt()}
    first, second = (
        client.messages.create(
            model="demo", max_tokens=24, system=SYSTEM, messages=QUESTION, extra_body=extra
        )
        for _ in range(2)
    )
    assert text_of(first) == text_of(second) != ""
    assert first.usage.cache_read_input_tokens == 0
    prompt = total_input(first.usage)
    assert prompt > 10 * BLOCK_SIZE  # the long system prompt
    assert second.usage.cache_read_input_tokens == expected_cached(prompt) > 0
    assert total_input(second.usage) == prompt


# ---- messages.stream ----------------------------------------------------------------------------


def test_the_stream_helper_gives_the_non_streamed_message(demo: LiveServer) -> None:
    client = claude(demo)
    common: dict[str, Any] = {
        "model": "demo",
        "max_tokens": 24,
        "system": SYSTEM,
        "messages": QUESTION,
        "extra_body": {"temperature": 0, "cache_salt": salt()},
    }
    plain = client.messages.create(**common)  # cold: the two below both read what it stored
    with client.messages.stream(**common) as stream:
        streamed_text = "".join(stream.text_stream)
        final = stream.get_final_message()
    again = client.messages.create(**common)
    assert streamed_text == text_of(final) == text_of(plain) == text_of(again) != ""
    assert final.model == "demo" and final.id.startswith("msg_")
    assert final.stop_reason == again.stop_reason == "max_tokens"
    assert usage_figures(final.usage) == usage_figures(again.usage)
    assert final.usage.cache_read_input_tokens > 0


def _sse_events(server: LiveServer, body: dict[str, Any]) -> list[tuple[str, Any]]:
    """(event name, data) of each frame of a raw streamed response."""
    events: list[tuple[str, Any]] = []
    name = None
    with httpx.stream(
        "POST", server.url + "/v1/messages", json=body, headers={"x-api-key": KEY}, timeout=60
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                assert name is not None, "a data line without its event line"
                events.append((name, json.loads(line.removeprefix("data: "))))
                name = None
    return events


def test_raw_sse_events_come_in_anthropics_order(demo: LiveServer) -> None:
    body = {"model": "demo", "max_tokens": 12, "messages": QUESTION, "stream": True}
    events = _sse_events(demo, body)
    for name, data in events:
        assert data["type"] == name
    names = [name for name, _ in events]
    # A ping may also come whenever nothing else was sent for a while.
    body_names = names[:2] + [n for n in names[2:] if n != "ping"]
    deltas = len(body_names) - 6
    assert deltas >= 1
    assert body_names == [
        "message_start",
        "ping",
        "content_block_start",
        *["content_block_delta"] * deltas,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ], names
    by_name = dict(events)
    assert by_name["message_start"]["message"]["content"] == []
    assert by_name["content_block_start"] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert all(d["delta"]["type"] == "text_delta" for n, d in events if n == "content_block_delta")
    assert by_name["message_delta"]["delta"]["stop_reason"] == "max_tokens"
    assert by_name["message_delta"]["usage"]["output_tokens"] == 12
    plain = claude(demo).messages.create(model="demo", max_tokens=12, messages=QUESTION)
    assert text == text_of(plain)


# ---- how a conversation may be written ------------------------------------------------------------


def test_system_and_content_as_strings_or_text_blocks_are_the_same_prompt(demo: LiveServer) -> None:
    client = claude(demo)
    user = "Tell me about caches."
    forms: list[dict[str, Any]] = [
        {"system": SYSTEM, "messages": [{"role": "user", "content": user}]},
        {"system": [{"type": "text", "text": SYSTEM}], "messages": [{"role": "user", "content": user}]},
        {
            "system": [{"type": "text", "text": SYSTEM}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": user}]}],
        },
    ]
    counts = [client.messages.count_tokens(model="demo", **form).input_tokens for form in forms]
    texts = [text_of(client.messages.create(model="demo", max_tokens=8, **form)) for form in forms]
    assert len(set(counts)) == 1 and len(set(texts)) == 1, (counts, texts)
    # Control: the system text does reach the prompt, and a second block adds to it.
    assert client.messages.count_tokens(model="demo", messages=forms[0]["messages"]).input_tokens < counts[0]
    two_blocks = [{"type": "text", "text": SYSTEM}, {"type": "text", "text": "Answer briefly."}]
    longer = client.messages.count_tokens(model="demo", system=two_blocks, messages=forms[0]["messages"])
    assert longer.input_tokens > counts[0]


def test_a_multi_turn_conversation_reuses_the_earlier_turn(demo: LiveServer) -> None:
    client = claude(demo)
    cache_salt = salt()
    first = client.messages.create(
        model="demo", max_tokens=4, system=SYSTEM, messages=QUESTION, extra_body={"cache_salt": cache_salt}
    )
    history = [
        *QUESTION,
        {"role": "assistant", "content": "Caches keep data close to where it is used."},
        {"role": "user", "content": [{"type": "text", "text": "And when do they miss?"}]},
    ]
    counted = client.messages.count_tokens(model="demo", system=SYSTEM, messages=history).input_tokens
    first_prompt = total_input(first.usage)
    assert counted > first_prompt
    second = client.messages.create(
        model="demo", max_tokens=4, system=SYSTEM, messages=history, extra_body={"cache_salt": cache_salt}
    )
    assert text_of(second) and total_input(second.usage) == counted
    assert second.usage.cache_read_input_tokens >= first_prompt // BLOCK_SIZE * BLOCK_SIZE


def test_thinking_is_accepted_where_the_template_has_no_switch(demo: LiveServer) -> None:
    client = claude(demo)
    thinking: Any = {"type": "enabled", "budget_tokens": 1024}
    with_thinking = client.messages.create(model="demo", max_tokens=8, messages=QUESTION, thinking=thinking)
    without = client.messages.create(model="demo", max_tokens=8, messages=QUESTION)
    assert [b.type for b in with_thinking.content] == ["text"]
    assert text_of(with_thinking) == text_of(without) != ""
    assert client.messages.count_tokens(model="demo", messages=QUESTION, thinking=thinking).input_tokens == (
        total_input(without.usage)
    )


# ---- count_tokens and the beta routes -------------------------------------------------------------


def test_count_tokens_and_the_beta_routes(demo: LiveServer) -> None:
    client = claude(demo)
    counted = client.messages.count_tokens(model="demo", system=SYSTEM, messages=QUESTION).input_tokens
    assert (
        client.beta.messages.count_tokens(model="demo", system=SYSTEM, messages=QUESTION).input_tokens
        == counted
    )
    # The SDK (2.17) keeps ``beta=true`` as a telemetry qualifier and no longer puts it in the
    # URL (the calls above went to the plain routes); older SDKs and other clients do: say it.
    beta = {"beta": "true"}
    raw = client.beta.messages.with_raw_response.count_tokens(
        model="demo", system=SYSTEM, messages=QUESTION, extra_query=beta
    )
    assert raw.http_request.url.params["beta"] == "true"
    assert raw.parse().input_tokens == counted
    raw_message = client.beta.messages.with_raw_response.create(
        model="demo", max_tokens=4, system=SYSTEM, messages=QUESTION, extra_query=beta
    )
    assert raw_message.http_request.url.params["beta"] == "true"
    message = raw_message.parse()
    assert message.stop_reason == "max_tokens" and text_of(message)
    assert total_input(message.usage) == counted
    # The beta client's stream too.
    with client.beta.messages.stream(
        model="demo", max_tokens=4, system=SYSTEM, messages=QUESTION, extra_query=beta
    ) as stream:
        assert stream.get_final_message().content[0].text == text_of(message)


# ---- tools ----------------------------------------------------------------------------------------


def _tool_uses(message: Any) -> list[Any]:
    return [block for block in message.content if block.type == "tool_use"]


def _valid_tool_use(block: Any) -> None:
    assert block.id and block.name in SCHEMAS, block
    jsonschema.validate(block.input, SCHEMAS[block.name])


def test_a_forced_tool_use_round_trip_reads_the_earlier_turns(tools_server: LiveServer) -> None:
    client = claude(tools_server)
    cache_salt = salt()
    forced: dict[str, Any] = {
        "model": TOOL_MODEL,
        "system": TOOL_SYSTEM,
        "tools": [WEATHER],
        "extra_body": {"cache_salt": cache_salt},
    }
    first = client.messages.create(
        **forced,
        max_tokens=120,
        messages=WEATHER_QUESTION,
        tool_choice={"type": "tool", "name": "get_weather"},
    )
    assert first.stop_reason == "tool_use", first
    (call,) = _tool_uses(first)
    assert call.name == "get_weather"
    _valid_tool_use(call)
    counted = client.messages.count_tokens(
        model=TOOL_MODEL, system=TOOL_SYSTEM, tools=[WEATHER], messages=WEATHER_QUESTION
    ).input_tokens
    assert total_input(first.usage) == counted

    result = '{"temperature": 21}'
    assistant = {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]}

    def answered(content: Any) -> list[dict[str, Any]]:
        tool_result = {"type": "tool_result", "tool_use_id": call.id, "content": content}
        return [*WEATHER_QUESTION, assistant, {"role": "user", "content": [tool_result]}]

    def count(messages: list[dict[str, Any]]) -> int:
        return client.messages.count_tokens(
            model=TOOL_MODEL, system=TOOL_SYSTEM, tools=[WEATHER], messages=messages
        ).input_tokens

    history = answered(result)
    # A tool_result's content as text blocks is the same prompt as the string.
    assert count(answered([{"type": "text", "text": result}])) == count(history) > counted
    second = client.messages.create(**forced, max_tokens=4, messages=history)
    assert second.content and second.stop_reason in ("end_turn", "max_tokens"), second
    assert total_input(second.usage) == count(history)
    # The earlier prompt and the call it generated, in whole blocks, come back from the cache.
    earlier = counted + first.usage.output_tokens
    assert second.usage.cache_read_input_tokens >= earlier // BLOCK_SIZE * BLOCK_SIZE, (second.usage, earlier)


def test_the_streamed_forced_call_assembles_a_tool_use_block(tools_server: LiveServer) -> None:
    with claude(tools_server).messages.stream(
        model=TOOL_MODEL,
        max_tokens=120,
        system=TOOL_SYSTEM,
        messages=WEATHER_QUESTION,
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"},
        extra_body={"cache_salt": salt()},
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert "input_json" in kinds
    assert final.stop_reason == "tool_use"
    (call,) = _tool_uses(final)
    assert call.name == "get_weather"
    _valid_tool_use(call)


@pytest.mark.parametrize(
    ("choice", "calls"),
    [({"type": "any"}, True), ({"type": "none"}, False), ({"type": "auto"}, False)],
    ids=["any", "none", "auto"],
)
def test_tool_choice_any_forces_a_call_and_none_writes_text(
    tools_server: LiveServer, choice: dict[str, Any], calls: bool
) -> None:
    """``auto`` is the control: the random model writes no call of its own, so ``any`` calling is
    the grammar's doing, and ``none`` writing text is not a mask left on."""
    message = claude(tools_server).messages.create(
        model=TOOL_MODEL,
        max_tokens=120,
        system=TOOL_SYSTEM,
        messages=WEATHER_QUESTION,
        tools=[WEATHER, SEARCH],
        tool_choice=choice,
        extra_body={"cache_salt": salt()},
    )
    uses = _tool_uses(message)
    if calls:
        assert message.stop_reason == "tool_use" and len(uses) >= 1, message
        for use in uses:
            _valid_tool_use(use)
    else:
        assert not uses and message.stop_reason != "tool_use", message
        assert text_of(message)


# ---- errors -------------------------------------------------------------------------------------

_CC = {"type": "ephemeral"}
_IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}}
# (id, fields, what the message says, whether the fields are the conversation's, which
# count_tokens then refuses the same way, or only the generation's)
BAD_REQUESTS: list[tuple[str, dict[str, Any], str, bool]] = [
    ("max-tokens-0", {"max_tokens": 0}, "max_tokens", False),
    ("temperature-over-1", {"extra_body": {"temperature": 1.5}}, "temperature", False),
    ("empty-stop-sequence", {"stop_sequences": [""]}, "stop_sequences", False),
    (
        "image-block",
        {"messages": [{"role": "user", "content": [_IMAGE]}]},
        "messages.0.content.0.type: content blocks of type 'image' are not supported",
        True,
    ),
    (
        "five-breakpoints",
        {"system": [{"type": "text", "text": f"part {i}", "cache_control": _CC} for i in range(5)]},
        "A maximum of 4 blocks with cache_control may be provided. Found 5.",
        True,
    ),
    (
        "four-and-automatic",
        {
            "system": [{"type": "text", "text": f"part {i}", "cache_control": _CC} for i in range(4)],
            "cache_control": _CC,
        },
        "A maximum of 4 blocks with cache_control may be provided. Found 5.",
        True,
    ),
    (
        "1h-after-5m",
        {
            "system": [
                {"type": "text", "text": "a", "cache_control": {"type": "ephemeral", "ttl": "5m"}},
                {"type": "text", "text": "b", "cache_control": {"type": "ephemeral", "ttl": "1h"}},
            ]
        },
        "system.1.cache_control: a ttl='1h' cache_control block must not come after a ttl='5m'",
        True,
    ),
    (
        "assistant-prefill",
        {"messages": [*QUESTION, {"role": "assistant", "content": "Sure"}]},
        "the last message must be a user message",
        True,
    ),
    (
        "mcp-servers",
        {"extra_body": {"mcp_servers": [{"type": "url", "url": "http://127.0.0.1:9", "name": "x"}]}},
        "mcp_servers: not supported",
        True,
    ),
]


@pytest.mark.parametrize(
    ("fields", "message", "conversation"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_requests_are_bad_request_errors(
    demo: LiveServer, fields: dict[str, Any], message: str, conversation: bool
) -> None:
    client = claude(demo)
    request: dict[str, Any] = {"model": "demo", "max_tokens": 4, "messages": QUESTION, **fields}
    with pytest.raises(anthropic.BadRequestError) as err:
        client.messages.create(**request)
    assert message in check_error_body(err.value, 400, "invalid_request_error")
    if conversation:
        request.pop("max_tokens")
        with pytest.raises(anthropic.BadRequestError) as err:
            client.messages.count_tokens(**request)
        assert message in check_error_body(err.value, 400, "invalid_request_error")


FORMAT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}},
    "required": ["ok"],
    "additionalProperties": False,
}


def test_structured_output_is_enforced(demo: LiveServer) -> None:
    """``output_config.format`` (what the SDK's ``messages.parse`` sends) and the beta's
    ``output_format`` are enforced by constrained decoding: the text always validates."""
    client = claude(demo)
    output_config: Any = {"format": {"type": "json_schema", "schema": FORMAT_SCHEMA}}
    message = client.messages.create(
        model="demo", max_tokens=40, messages=QUESTION, output_config=output_config
    )
    assert message.stop_reason == "end_turn"
    jsonschema.validate(json.loads(text_of(message)), FORMAT_SCHEMA)
    beta = client.messages.create(
        model="demo",
        max_tokens=40,
        messages=QUESTION,
        extra_body={"output_format": {"type": "json_schema", "schema": FORMAT_SCHEMA}},
    )
    assert text_of(beta) == text_of(message)

    class Answer(pydantic.BaseModel):
        ok: bool

    parsed = client.messages.parse(model="demo", max_tokens=40, messages=QUESTION, output_format=Answer)
    assert isinstance(parsed.parsed_output, Answer)
    # Control: without the format the same question is not JSON.
    with pytest.raises(ValueError):
        json.loads(text_of(client.messages.create(model="demo", max_tokens=40, messages=QUESTION)))


def test_api_keys_by_header_and_bearer(demo: LiveServer) -> None:
    for client, headers in (
        (claude(demo, api_key="placeholder"), {"X-Api-Key": Omit(), "Authorization": Omit()}),
        (claude(demo, api_key="sk-ant-wrong-0123456789"), {}),
        (claude(demo, auth_token="sk-ant-wrong-0123456789"), {}),
    ):
        with pytest.raises(anthropic.AuthenticationError) as err:
            client.messages.create(model="demo", max_tokens=2, messages=QUESTION, extra_headers=headers)
        check_error_body(err.value, 401, "authentication_error")
        with pytest.raises(anthropic.AuthenticationError):
            client.messages.count_tokens(model="demo", messages=QUESTION, extra_headers=headers)
    by_header = claude(demo, api_key=KEY)
    by_bearer = claude(demo, auth_token=KEY)
    sent = by_bearer.messages.with_raw_response.create(model="demo", max_tokens=2, messages=QUESTION)
    assert sent.http_request.headers["authorization"] == f"Bearer {KEY}"
    assert "x-api-key" not in sent.http_request.headers
    assert text_of(sent.parse()) == text_of(
        by_header.messages.create(model="demo", max_tokens=2, messages=QUESTION)
    )


def test_a_body_over_16_mib_is_content_too_large(demo: LiveServer) -> None:
    # The SDK's class for 413 is ContentTooLargeError (RequestTooLargeError is its old name).
    assert anthropic.RequestTooLargeError is anthropic.ContentTooLargeError
    filler = "x" * (17 * 1024 * 1024)
    with pytest.raises(anthropic.ContentTooLargeError) as err:
        claude(demo).messages.create(
            model="demo", max_tokens=2, messages=[{"role": "user", "content": filler}]
        )
    check_error_body(err.value, 413, "request_too_large")


def test_a_full_queue_is_overloaded_with_retry_after(demo: LiveServer) -> None:
    """One request runs and one may wait (--max-batch 1 --max-queue 1): a burst of long ones,
    streamed and not, released together, gets 529s. Bounded: at most three bursts."""
    burst = 6
    clients = [claude(demo) for _ in range(burst)]  # built first: building one takes a while
    start = threading.Barrier(burst)

    def send(i: int) -> str | anthropic.OverloadedError:
        common: dict[str, Any] = {
            "model": "demo",
            "max_tokens": 64,
            "messages": [{"role": "user", "content": f"burst {i}"}],
            "extra_body": {"cache_salt": salt()},
        }
        start.wait(timeout=30)
        try:
            if i % 2:
                with clients[i].messages.stream(**common) as stream:
                    return text_of(stream.get_final_message())
            return text_of(clients[i].messages.create(**common))
        except anthropic.OverloadedError as exc:
            return exc

    overloaded: list[anthropic.OverloadedError] = []
    answered: list[str] = []
    for _ in range(3):
        with ThreadPoolExecutor(max_workers=burst) as pool:
            results = list(pool.map(send, range(burst)))
        overloaded += [r for r in results if isinstance(r, anthropic.OverloadedError)]
        answered += [r for r in results if isinstance(r, str)]
        if overloaded and answered:
            break
    assert overloaded and answered, (len(overloaded), len(answered))
    for exc in overloaded:
        check_error_body(exc, 529, "overloaded_error")
        assert int(exc.response.headers["retry-after"]) >= 1
    # Still serving afterwards.
    assert text_of(claude(demo).messages.create(model="demo", max_tokens=2, messages=QUESTION))
