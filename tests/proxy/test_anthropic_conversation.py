"""An Anthropic conversation as the chat template sees it, and where its breakpoints fall: the
validation Anthropic does (at most 4, 1h before 5m), tool results and calls as the template's
tool messages, the billing-header block, and breakpoint prefixes found by rendering (so a
template that writes the tools after the system text gives the tools' breakpoint only what
precedes them in the prompt)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError
from transformers import PreTrainedTokenizerBase

from model_runner.chat_template import ChatTemplate
from model_runner.grammar import GrammarCompiler
from model_runner.response_parsing import parser_spec_for
from model_runner.tokenizer_builder import CHAT_TEMPLATE, train_bpe_tokenizer
from proxy.anthropic.conversation import breakpoints, chat_body
from proxy.anthropic.plan import MessagesPlanner
from proxy.anthropic.schemas import MessagesRequest
from proxy.chat_plan import ChatPlanner
from proxy.errors import InvalidRequest, from_pydantic
from tests.support.chat_templates import QWEN3_THINKING, QWEN_TOOLS, with_template
from tests.support.tiny_models import VOCAB, tiny_corpus

EPHEMERAL = {"type": "ephemeral"}
HOUR = {"type": "ephemeral", "ttl": "1h"}
TOOL = {
    "name": "get_weather",
    "description": "Weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def request(**fields: Any) -> MessagesRequest:
    body = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hello"}], **fields}
    return MessagesRequest.model_validate(body)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return train_bpe_tokenizer(tiny_corpus(), VOCAB)


def planner(tokenizer: PreTrainedTokenizerBase, template: str, **options: Any) -> MessagesPlanner:
    tok = with_template(tokenizer, template)
    eos = frozenset({tok.convert_tokens_to_ids("<|im_end|>")})
    chat = ChatPlanner(ChatTemplate(tok), GrammarCompiler(tok, VOCAB, eos), parser_spec_for(tok))
    return MessagesPlanner(
        chat, keep_billing_header=options.get("keep", False), sampling_defaults=(0.0, 1.0, 0)
    )


def test_breakpoints_in_anthropic_order_with_the_automatic_one_last() -> None:
    req = request(
        tools=[{**TOOL, "cache_control": HOUR}],
        system=[{"type": "text", "text": "sys", "cache_control": EPHEMERAL}],
        messages=[
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": [{"type": "text", "text": "c"}, {"type": "text", "text": "d"}]},
        ],
        cache_control=EPHEMERAL,
    )
    found = breakpoints(req)
    assert [(b.where, b.ttl, b.ttl_s) for b in found] == [
        ("tools.0", "1h", 3600),
        ("system.0", "5m", 300),
        ("cache_control", "5m", 300),
    ]
    assert found[-1].at == (2, 2, 1)  # the last block of the last message


def test_an_explicit_breakpoint_on_the_last_block_is_not_counted_twice() -> None:
    req = request(
        messages=[{"role": "user", "content": [{"type": "text", "text": "x", "cache_control": EPHEMERAL}]}],
        cache_control=EPHEMERAL,
    )
    assert [b.where for b in breakpoints(req)] == ["messages.0.content.0"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"system": [{"type": "text", "text": f"s{i}", "cache_control": EPHEMERAL} for i in range(5)]},
            "A maximum of 4 blocks with cache_control may be provided. Found 5.",
        ),
        (
            {
                "system": [{"type": "text", "text": f"s{i}", "cache_control": EPHEMERAL} for i in range(4)],
                "cache_control": EPHEMERAL,
            },
            "A maximum of 4 blocks with cache_control may be provided. Found 5.",
        ),
        (
            {
                "system": [
                    {"type": "text", "text": "a", "cache_control": EPHEMERAL},
                    {"type": "text", "text": "b", "cache_control": HOUR},
                ]
            },
            "system.1.cache_control: a ttl='1h' cache_control block must not come after a ttl='5m' "
            "cache_control block (system.0).",
        ),
    ],
)
def test_breakpoint_rules(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        breakpoints(request(**fields))
    assert str(err.value) == message


@pytest.mark.parametrize(
    "bad",
    [
        {"type": "ephemeral", "ttl": "2h"},
        {"type": "persistent"},
    ],
)
def test_bad_cache_control_is_a_schema_error(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        request(system=[{"type": "text", "text": "s", "cache_control": bad}])


def test_tool_use_and_results_become_the_templates_tool_messages() -> None:
    req = request(
        tools=[TOOL],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        messages=[
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "need a tool", "signature": "sig"},
                    {"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}},
                    {"type": "redacted_thinking", "data": "opaque"},
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_1",
                        "content": [{"type": "text", "text": "rain"}],
                    },
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "boom", "is_error": True},
                    {"type": "text", "text": "thanks"},
                ],
            },
        ],
    )
    body = chat_body(req)
    assert body["tool_choice"] == "required" and body["parallel_tool_calls"] is False
    assert body["tools"][0]["function"]["parameters"] == TOOL["input_schema"]
    assert body["messages"][1] == {
        "role": "assistant",
        "content": "Let me look.",
        "reasoning_content": "need a tool",
        "tool_calls": [
            {
                "id": "toolu_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
            }
        ],
    }
    assert body["messages"][2:] == [
        {"role": "tool", "tool_call_id": "toolu_1", "content": "rain"},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "Error: boom"},
        {"role": "user", "content": "thanks"},
    ]


def test_the_billing_header_block_is_dropped_unless_kept() -> None:
    system = [
        {
            "type": "text",
            "text": "x-anthropic-billing-header: cc_version=2; cch=abc12;",
            "cache_control": EPHEMERAL,
        },
        {"type": "text", "text": "You are an agent."},
    ]
    req = request(system=system)
    assert chat_body(req)["messages"][0] == {"role": "system", "content": "You are an agent."}
    assert breakpoints(req) == []  # its breakpoint went with it
    kept = chat_body(req, keep_billing_header=True)["messages"][0]["content"]
    assert kept.startswith("x-anthropic-billing-header:")
    assert [b.where for b in breakpoints(req, keep_billing_header=True)] == ["system.0"]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (
            {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
            "messages.0.content.0.type",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "image"}]}
                        ],
                    }
                ]
            },
            "messages.0.content.0.content.0.type",
        ),
        ({"system": [{"type": "document", "source": {}}]}, "system.0.type"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0.type"),
        ({"mcp_servers": [{"type": "url", "url": "http://x", "name": "x"}]}, "mcp_servers"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "prefill"}]},
            "messages.1.role",
        ),
    ],
)
def test_what_would_change_the_answer_is_refused_by_name(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        request(**fields)
    assert err.value.param == param


def test_breakpoint_prefixes_follow_the_rendered_order(tokenizer: PreTrainedTokenizerBase) -> None:
    """Qwen's template writes the system text first and the tools after it: a breakpoint on the
    tools covers only what comes before the system text in the prompt; one on the system covers
    the tools too; one on the user turn covers more. Each prefix is a prefix of the prompt."""
    plan = planner(tokenizer, QWEN_TOOLS).plan(
        request(
            tools=[{**TOOL, "cache_control": HOUR}],
            system=[{"type": "text", "text": "You are terse.", "cache_control": HOUR}],
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "weather?", "cache_control": EPHEMERAL}],
                }
            ],
        )
    )
    tokens = [p.tokens for p in plan.breakpoints]
    text = plan.chat.prompt_text
    assert tokens[0] < tokens[1] < tokens[2] <= plan.prompt_tokens
    ids = plan.chat.prompt_ids
    decoded = [tokenizer.decode(ids[:t]) for t in tokens]
    assert "You are terse." not in decoded[0]
    assert "You are terse." in decoded[1] and "get_weather" in decoded[1] and "weather?" not in decoded[1]
    assert "weather?" in decoded[2] and text.startswith(decoded[2])
    assert [p.ttl_s for p in plan.pins()] == [3600, 3600, 300]


def test_a_system_breakpoint_covers_the_system_turn(tokenizer: PreTrainedTokenizerBase) -> None:
    planned = planner(tokenizer, CHAT_TEMPLATE)
    req = request(system=[{"type": "text", "text": "Stable instructions.", "cache_control": EPHEMERAL}])
    plan = planned.plan(req)
    [placed] = plan.breakpoints
    prefix = tokenizer.decode(plan.chat.prompt_ids[: placed.tokens])
    assert "Stable instructions." in prefix and "hello" not in prefix
    assert planned.count(req) == plan.prompt_tokens


@pytest.mark.parametrize(
    ("content", "param"),
    [
        ([{"type": "text", "text": ""}], "messages[0].content[0].text"),
        ([{"type": "tool_use", "id": "x", "name": "n"}], "messages[0].content[0].input"),
    ],
)
def test_schema_errors_name_the_field_not_the_union_tag(content: list[dict[str, Any]], param: str) -> None:
    with pytest.raises(ValidationError) as err:
        request(messages=[{"role": "user", "content": content}])
    assert from_pydantic(err.value).param == param


def test_a_block_without_a_type_is_named() -> None:
    with pytest.raises(InvalidRequest) as err:
        request(messages=[{"role": "user", "content": [{"text": "x"}]}])
    assert err.value.param == "messages.0.content.0.type"


def test_structured_output_becomes_the_chat_requests_response_format() -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}}
    for fields in (
        {"output_config": {"format": {"type": "json_schema", "schema": schema}, "effort": "low"}},
        {"output_format": {"type": "json_schema", "schema": schema}},
    ):
        body = chat_body(request(**fields))
        assert body["response_format"] == {
            "type": "json_schema",
            "json_schema": {"name": "output", "schema": schema},
        }
    assert chat_body(request(output_config={"effort": "high"}))["reasoning_effort"] == "high"


def test_thinking_reaches_a_template_with_a_switch(tokenizer: PreTrainedTokenizerBase) -> None:
    planned = planner(tokenizer, QWEN3_THINKING)
    off = planned.plan(request(thinking={"type": "disabled"})).chat.prompt_text
    on = planned.plan(request(thinking={"type": "enabled", "budget_tokens": 2048})).chat.prompt_text
    default = planned.plan(request()).chat.prompt_text
    assert off != on and on == default  # the template thinks unless told not to
    assert off.endswith("<think>\n\n</think>\n\n")
