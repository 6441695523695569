"""ChatTemplate: rendering with tools, the tool-call syntax probe, call ids, message normalization.

The central property (``test_a_generated_call_re_renders_as_the_prompt_plus_the_call``): the prompt
plus a call written in ``tool_call_syntax`` is a prefix of the history the client sends back.
"""

from __future__ import annotations

import copy
import json
import random
import re
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from model_runner.chat_template import (
    NINE_ALNUM_CALL_IDS,
    OPENAI_CALL_IDS,
    ChatTemplate,
    ChatTemplateError,
    MessageError,
    ToolSyntaxUnknown,
    render_arguments,
)
from model_runner.tokenizer_builder import CHAT_TEMPLATE, train_bpe_tokenizer
from tests.support.chat_templates import (
    LLAMA3_TOOLS,
    MISTRAL_TOOLS,
    PLAIN_CHATML,
    QWEN3_THINKING,
    QWEN_TOOLS,
    TOOL_TEMPLATES,
    save_tiny_model_with_template,
    with_template,
)
from tests.support.tiny_models import VOCAB, tiny_corpus

EOS = "<|im_end|>"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, TIME]

ARGUMENT_CASES = [
    {"city": "Köln"},
    {"q": {"a": [1, 2.5, None, True]}, "s": 'quote " and \\ backslash\nnewline'},
    {},
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return train_bpe_tokenizer(tiny_corpus(), VOCAB)


def common_prefix(a: str, b: str) -> str:
    n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return a[:n]


def chat(tokenizer: PreTrainedTokenizerBase, template: str | None) -> ChatTemplate:
    return ChatTemplate(with_template(tokenizer, template))  # type: ignore[arg-type]


def openai_call(call_id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """An assistant tool-call message as an OpenAI client sends it back (compact JSON string)."""
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(arguments, separators=(",", ":"))},
            }
        ],
    }


def tool_result(call_id: str, content: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": content}


def conversations(ids: list[str]) -> list[list[dict[str, Any]]]:
    """Conversations the model answers next: fresh, with a system prompt, mid tool loop, and
    after an earlier tool loop and a new question."""
    return [
        [{"role": "user", "content": "Weather in Köln?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Köln?"}],
        [
            {"role": "user", "content": "Weather in Köln?"},
            openai_call(ids[0], "now", {}),
            tool_result(ids[0], "10:00"),
        ],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What time is it?"},
            openai_call(ids[1], "now", {}),
            tool_result(ids[1], "10:00"),
            {"role": "assistant", "content": "It is ten."},
            {"role": "user", "content": "And the weather in Köln?"},
        ],
    ]


# -- the prefix property ----------------------------------------------------------------------


@pytest.mark.parametrize("arguments", ARGUMENT_CASES, ids=["unicode", "nested", "empty"])
@pytest.mark.parametrize("template_name", sorted(TOOL_TEMPLATES))
def test_a_generated_call_re_renders_as_the_prompt_plus_the_call(
    tokenizer: PreTrainedTokenizerBase, template_name: str, arguments: dict[str, Any]
) -> None:
    template = chat(tokenizer, TOOL_TEMPLATES[template_name])
    rng = random.Random(7)
    for conversation in conversations([template.new_call_id(rng) for _ in range(2)]):
        prompt = template.render(template.normalize_messages(conversation), tools=TOOLS)
        call_id = template.new_call_id(rng)
        prefix, suffix = template.tool_call_syntax("get_weather", call_id)
        generated = prefix + render_arguments(arguments) + suffix
        history = [
            *conversation,
            openai_call(call_id, "get_weather", arguments),
            tool_result(call_id, "12 C"),
        ]
        rendered = template.render(template.normalize_messages(history), tools=TOOLS)
        assert rendered.startswith(prompt + generated + EOS), (conversation, rendered)


@pytest.mark.parametrize(
    ("template", "call_id", "expected"),
    [
        (QWEN_TOOLS, "call_x", ('<tool_call>\n{"name": "get_weather", "arguments": ', "}\n</tool_call>")),
        (QWEN3_THINKING, "call_x", ('<tool_call>\n{"name": "get_weather", "arguments": ', "}\n</tool_call>")),
        (LLAMA3_TOOLS, "call_x", ('{"name": "get_weather", "parameters": ', "}")),
        (
            MISTRAL_TOOLS,
            "abcDEF123",
            ('[TOOL_CALLS][{"name": "get_weather", "arguments": ', ', "id": "abcDEF123"}]'),
        ),
    ],
)
def test_tool_call_syntax_is_the_literal_text_around_the_arguments(
    tokenizer: PreTrainedTokenizerBase, template: str, call_id: str, expected: tuple[str, str]
) -> None:
    assert chat(tokenizer, template).tool_call_syntax("get_weather", call_id) == expected


@pytest.mark.parametrize(
    ("template", "call_id"),
    [(PLAIN_CHATML, "call_x"), (None, "call_x"), (MISTRAL_TOOLS, "call_" + "a" * 24)],
    ids=["no-tool-support", "fallback", "id-the-template-refuses"],
)
def test_tool_call_syntax_unknown(
    tokenizer: PreTrainedTokenizerBase, template: str | None, call_id: str
) -> None:
    with pytest.raises(ToolSyntaxUnknown):
        chat(tokenizer, template).tool_call_syntax("get_weather", call_id)


def test_tool_call_syntax_needs_an_eos_token(tokenizer: PreTrainedTokenizerBase) -> None:
    no_eos = with_template(tokenizer, QWEN_TOOLS)
    no_eos.eos_token = None
    with pytest.raises(ToolSyntaxUnknown, match="EOS"):
        ChatTemplate(no_eos).tool_call_syntax("get_weather", "call_x")


# -- Qwen3: where the re-rendered history diverges --------------------------------------------


def test_qwen3_keeps_thinking_within_a_tool_loop(tokenizer: PreTrainedTokenizerBase) -> None:
    template = chat(tokenizer, QWEN3_THINKING)
    user = [{"role": "user", "content": "Weather in Köln?"}]
    prompt = template.render(user, tools=TOOLS)
    prefix, suffix = template.tool_call_syntax("get_weather", "call_1")
    thinking = "<think>\nThe user wants weather.\n</think>\n\n"
    generated = thinking + prefix + '{"city": "Köln"}' + suffix + EOS
    call = openai_call("call_1", "get_weather", {"city": "Köln"})
    call["reasoning_content"] = "The user wants weather."
    history = [*user, call, tool_result("call_1", "12 C")]
    assert template.render(template.normalize_messages(history), tools=TOOLS).startswith(prompt + generated)


def test_qwen3_drops_thinking_of_turns_before_a_new_user_query(tokenizer: PreTrainedTokenizerBase) -> None:
    template = chat(tokenizer, QWEN3_THINKING)
    first = [{"role": "user", "content": "Hi"}]
    prompt = template.render(first)
    generated = "<think>\nGreet back.\n</think>\n\nHello!" + EOS
    answered = {"role": "assistant", "reasoning_content": "Greet back.", "content": "Hello!"}
    second = template.render([*first, answered, {"role": "user", "content": "Bye"}])
    # The new prompt follows the old one up to the generated text, then has no think block.
    assert len(common_prefix(prompt + generated, second)) == len(prompt)
    assert second[len(prompt) :].startswith("Hello!" + EOS + "\n<|im_start|>user\nBye")


def test_qwen3_enable_thinking_false_prompt_is_not_re_rendered(tokenizer: PreTrainedTokenizerBase) -> None:
    template = chat(tokenizer, QWEN3_THINKING)
    user = [{"role": "user", "content": "Hi"}]
    off = {"enable_thinking": False}
    prompt = template.render(user, variables=off)
    empty_think = "<think>\n\n</think>\n\n"
    assert prompt == template.render(user) + empty_think
    history = template.render([*user, {"role": "assistant", "content": "Hello!"}, *user], variables=off)
    assert len(common_prefix(prompt + "Hello!", history)) == len(prompt) - len(empty_think)


def test_qwen3_reads_thinking_out_of_content(tokenizer: PreTrainedTokenizerBase) -> None:
    template = chat(tokenizer, QWEN3_THINKING)
    text = template.render(
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nHello!"},
            {"role": "tool", "tool_call_id": "x", "content": "r"},
        ],
        add_generation_prompt=False,
    )
    assert "<|im_start|>assistant\n<think>\nhmm\n</think>\n\nHello!<|im_end|>" in text


# -- what each template renders ---------------------------------------------------------------


def test_qwen_renders_tools_calls_and_merged_tool_results(tokenizer: PreTrainedTokenizerBase) -> None:
    template = chat(tokenizer, QWEN_TOOLS)
    two_calls = {
        "role": "assistant",
        "content": "Checking.",
        "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "now", "arguments": "{}"}},
            {
                "id": "call_b",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"X"}'},
            },
        ],
    }
    messages = [
        {"role": "user", "content": "Time and weather?"},
        two_calls,
        tool_result("call_a", "10:00"),
        tool_result("call_b", "12 C"),
    ]
    text = template.render(template.normalize_messages(messages), tools=[TIME])
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n<tools>\n"
        + json.dumps(TIME)
        + "\n</tools>\nCall one as <tool_call>\n"
        '{"name": <name>, "arguments": <object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nTime and weather?<|im_end|>\n"
        '<|im_start|>assistant\nChecking.\n<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "X"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n10:00\n</tool_response>\n<tool_response>\n12 C\n</tool_response>"
        "<|im_end|>\n<|im_start|>assistant\n"
    )


def test_llama_puts_tools_in_the_first_user_message_or_the_system(tokenizer: PreTrainedTokenizerBase) -> None:
    template = chat(tokenizer, LLAMA3_TOOLS)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    in_user = template.render(messages, tools=[TIME])
    in_system = template.render(messages, tools=[TIME], variables={"tools_in_user_message": False})
    tool_json = json.dumps(TIME)
    assert in_user.index(tool_json) > in_user.index("<|im_start|>user")
    assert in_system.index(tool_json) < in_system.index("Be brief.") < in_system.index("<|im_start|>user")
    assert in_user.startswith("<|endoftext|><|im_start|>system\n\nEnvironment: ipython\n")


def test_llama_refuses_parallel_calls_and_tools_without_a_user(tokenizer: PreTrainedTokenizerBase) -> None:
    template = chat(tokenizer, LLAMA3_TOOLS)
    two = openai_call("call_a", "now", {})
    two["tool_calls"] = two["tool_calls"] * 2
    with pytest.raises(ChatTemplateError, match="single tool-calls"):
        template.render(template.normalize_messages([{"role": "user", "content": "Hi"}, two]))
    with pytest.raises(ChatTemplateError, match="first user message"):
        template.render([{"role": "system", "content": "Be brief."}], tools=[TIME])


def test_mistral_offers_tools_before_the_last_user_message(tokenizer: PreTrainedTokenizerBase) -> None:
    template = chat(tokenizer, MISTRAL_TOOLS)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Time?"},
    ]
    text = template.render(messages, tools=[TIME])
    assert text == (
        "<|endoftext|>[INST]Hi[/INST]Hello!<|im_end|>[AVAILABLE_TOOLS]"
        + json.dumps([TIME])
        + "[/AVAILABLE_TOOLS][INST]Be brief.\n\nTime?[/INST]"
    )


def test_mistral_needs_the_function_name_before_its_arguments(tokenizer: PreTrainedTokenizerBase) -> None:
    # The template tojson-s the whole function dict: normalize_messages fixes the key order.
    template = chat(tokenizer, MISTRAL_TOOLS)
    call = openai_call("abcDEF123", "now", {"x": 1})
    call["tool_calls"][0]["function"] = {"arguments": '{"x": 1}', "name": "now"}
    text = template.render(template.normalize_messages([{"role": "user", "content": "Hi"}, call]))
    assert '[TOOL_CALLS][{"name": "now", "arguments": {"x": 1}, "id": "abcDEF123"}]<|im_end|>' in text


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([{"role": "user", "content": "Hi"}, openai_call("call_" + "a" * 24, "now", {})], "length 9"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
    ],
    ids=["long-id", "no-alternation"],
)
def test_mistral_refusals_are_chat_template_errors(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], match: str
) -> None:
    template = chat(tokenizer, MISTRAL_TOOLS)
    with pytest.raises(ChatTemplateError, match=match) as info:
        template.render(template.normalize_messages(messages))
    assert isinstance(info.value, ValueError)


def test_plain_chatml_renders_as_the_tiny_tokenizers_own_template(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    for add in (True, False):
        own = chat(tokenizer, CHAT_TEMPLATE).render(messages, add_generation_prompt=add)
        assert chat(tokenizer, PLAIN_CHATML).render(messages, add_generation_prompt=add) == own
    call = chat(tokenizer, PLAIN_CHATML).render([messages[1], openai_call("call_a", "now", {})])
    assert call.endswith("<|im_start|>assistant\n<|im_end|>\n<|im_start|>assistant\n")


# -- capabilities -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "expected"),
    [(PLAIN_CHATML, False), (CHAT_TEMPLATE, False), (None, False)]
    + [(TOOL_TEMPLATES[name], True) for name in sorted(TOOL_TEMPLATES)],
    ids=["plain", "builder-chatml", "fallback", *sorted(TOOL_TEMPLATES)],
)
def test_supports_tools(tokenizer: PreTrainedTokenizerBase, template: str | None, expected: bool) -> None:
    assert chat(tokenizer, template).supports_tools is expected


REASONING_EFFORT = (
    "{% if reasoning_effort is defined %}Reasoning: {{ reasoning_effort }}\n{% endif %}"
    "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
)
WITH_GENERATION_TAG = (
    "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}"
    "{{ reasoning_effort }}"
)


@pytest.mark.parametrize(
    ("template", "variable", "expected"),
    [
        (QWEN3_THINKING, "enable_thinking", True),
        (QWEN_TOOLS, "enable_thinking", False),
        (QWEN3_THINKING, "reasoning_effort", False),
        (REASONING_EFFORT, "reasoning_effort", True),
        (LLAMA3_TOOLS, "tools_in_user_message", True),
        (LLAMA3_TOOLS, "content", False),  # an attribute, not a variable
        (WITH_GENERATION_TAG, "reasoning_effort", True),
        (WITH_GENERATION_TAG, "enable_thinking", False),
        (None, "add_generation_prompt", True),
    ],
)
def test_accepts(
    tokenizer: PreTrainedTokenizerBase, template: str | None, variable: str, expected: bool
) -> None:
    assert chat(tokenizer, template).accepts(variable) is expected


def test_variables_reach_the_template_and_may_not_shadow_parameters(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    template = chat(tokenizer, REASONING_EFFORT)
    hi = [{"role": "user", "content": "hi"}]
    assert template.render(hi, variables={"reasoning_effort": "high"}).startswith("Reasoning: high\n")
    for name in ("tools", "messages", "tokenize", "add_generation_prompt"):
        with pytest.raises(ValueError, match="clash"):
            template.render(hi, variables={name: None})


def test_fallback_template_for_a_base_model(tokenizer: PreTrainedTokenizerBase) -> None:
    template = chat(tokenizer, None)
    assert template.is_fallback
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]
    assert template.render(messages) == "user: hi\nassistant: \nassistant: "
    assert not chat(tokenizer, PLAIN_CHATML).is_fallback


def test_a_named_tool_use_template_is_used_when_tools_are_given(tokenizer: PreTrainedTokenizerBase) -> None:
    template = chat(tokenizer, {"default": PLAIN_CHATML, "tool_use": QWEN_TOOLS})  # type: ignore[arg-type]
    hi = [{"role": "user", "content": "hi"}]
    assert template.supports_tools
    assert template.render(hi) == chat(tokenizer, PLAIN_CHATML).render(hi)
    assert "<tools>" in template.render(hi, tools=[TIME])
    assert template.accepts("tools")


def test_encode_tokenizes_without_adding_special_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    hi = [{"role": "user", "content": "hi"}]
    plain = chat(tokenizer, PLAIN_CHATML)
    assert plain.encode(hi) == plain.tokenize(plain.render(hi))
    assert plain.encode(hi)[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    llama = chat(tokenizer, LLAMA3_TOOLS).encode(hi)
    assert llama[:2] == [tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids("<|im_start|>")]


# -- call ids ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "style", "pattern"),
    [
        (MISTRAL_TOOLS, NINE_ALNUM_CALL_IDS, r"[A-Za-z0-9]{9}"),
        (QWEN_TOOLS, OPENAI_CALL_IDS, r"call_[A-Za-z0-9]{24}"),
        (LLAMA3_TOOLS, OPENAI_CALL_IDS, r"call_[A-Za-z0-9]{24}"),
        (PLAIN_CHATML, OPENAI_CALL_IDS, r"call_[A-Za-z0-9]{24}"),
    ],
)
def test_call_ids_take_the_shape_the_template_accepts(
    tokenizer: PreTrainedTokenizerBase, template: str, style: object, pattern: str
) -> None:
    chat_template = chat(tokenizer, template)
    assert chat_template.call_id_style == style
    ids = {chat_template.new_call_id() for _ in range(20)}
    assert len(ids) == 20
    assert all(re.fullmatch(pattern, i) for i in ids)
    assert chat_template.new_call_id(random.Random(3)) == chat_template.new_call_id(random.Random(3))


@pytest.mark.parametrize(
    ("style", "call_id", "expected"),
    [
        (NINE_ALNUM_CALL_IDS, "abcDEF123", True),
        (NINE_ALNUM_CALL_IDS, "abcDEF12", False),
        (NINE_ALNUM_CALL_IDS, "abcDEF12-", False),
        (OPENAI_CALL_IDS, "call_" + "a1" * 12, True),
        (OPENAI_CALL_IDS, "call-" + "a1" * 12, False),
        (OPENAI_CALL_IDS, "a1" * 12, False),
    ],
)
def test_call_id_style_matches(style: Any, call_id: str, expected: bool) -> None:
    assert style.matches(call_id) is expected


# -- normalize_messages -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("function", "param", "match"),
    [
        (
            {"name": "now", "arguments": "{not json"},
            "messages[1].tool_calls[0].function.arguments",
            "valid JSON",
        ),
        ({"name": "now", "arguments": "[1, 2]"}, "messages[1].tool_calls[0].function.arguments", "object"),
        ({"name": "now", "arguments": None}, "messages[1].tool_calls[0].function.arguments", "object"),
        ({"arguments": "{}"}, "messages[1].tool_calls[0].function.name", "name"),
        ("now", "messages[1].tool_calls[0].function", "function"),
    ],
)
def test_bad_tool_calls_name_the_field(
    tokenizer: PreTrainedTokenizerBase, function: Any, param: str, match: str
) -> None:
    call = {"role": "assistant", "tool_calls": [{"id": "call_a", "type": "function", "function": function}]}
    with pytest.raises(MessageError, match=match) as info:
        chat(tokenizer, QWEN_TOOLS).normalize_messages([{"role": "user", "content": "Hi"}, call])
    assert info.value.param == param
    assert isinstance(info.value, ValueError)


def test_normalize_messages_converts_to_hf_conventions(tokenizer: PreTrainedTokenizerBase) -> None:
    template = chat(tokenizer, QWEN_TOOLS)
    call = openai_call("call_a", "get_weather", {"city": "Köln"})
    call["tool_calls"][0]["function"] = {"arguments": '{"city":"Köln"}', "name": "get_weather", "extra": 1}
    messages = [
        {"role": "user", "content": "Hi"},
        call,
        tool_result("call_a", "12 C"),
        {"role": "tool", "tool_call_id": "call_a", "name": "mine", "content": "x"},
        {"role": "assistant", "content": "Done.", "tool_calls": []},
    ]
    before = copy.deepcopy(messages)
    normalized = template.normalize_messages(messages)
    assert messages == before
    assert normalized[1]["tool_calls"] == [
        {
            "id": "call_a",
            "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Köln"}},
        }
    ]
    assert list(normalized[1]["tool_calls"][0]["function"]) == ["name", "arguments"]
    assert normalized[2]["name"] == "get_weather"
    assert normalized[3]["name"] == "mine"
    assert "tool_calls" not in normalized[4]
    assert template.normalize_messages(normalized) == normalized


STRING_ARGUMENTS = (
    "{% for m in messages %}{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "CALL {{ c.function.name }} {{ c.function.arguments }}<|im_end|>{% endfor %}"
    "{% else %}{{ m.role }}: {{ m.content }}\n{% endif %}{% endfor %}"
)
"""A template that writes the arguments as given (a JSON string), not through tojson."""


def test_a_template_wanting_strings_keeps_arguments_as_strings(tokenizer: PreTrainedTokenizerBase) -> None:
    template = chat(tokenizer, STRING_ARGUMENTS)
    assert template.wants_mapping_arguments is False
    assert chat(tokenizer, QWEN_TOOLS).wants_mapping_arguments is True
    assert chat(tokenizer, QWEN3_THINKING).wants_mapping_arguments is True  # it takes both; tojson wins
    hf_call = {
        "role": "assistant",
        "tool_calls": [{"id": "call_a", "function": {"name": "now", "arguments": {"tz": "UTC"}}}],
    }
    normalized = template.normalize_messages([hf_call, openai_call("call_b", "now", {"tz": "UTC"})])
    assert [m["tool_calls"][0]["function"]["arguments"] for m in normalized] == ['{"tz": "UTC"}'] * 2
    assert normalized[0]["tool_calls"][0]["type"] == "function"
    # The probe writes its arguments as a string too, so the syntax is still found.
    assert template.tool_call_syntax("now", "call_a") == ("CALL now ", "")


# -- the support helpers ----------------------------------------------------------------------


def test_with_template_leaves_the_original_alone(tokenizer: PreTrainedTokenizerBase) -> None:
    copied = with_template(tokenizer, QWEN_TOOLS)
    assert copied.chat_template == QWEN_TOOLS
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert copied("hi")["input_ids"] == tokenizer("hi")["input_ids"]


def test_a_saved_tiny_model_reloads_with_its_template(tmp_path: Path) -> None:
    path = save_tiny_model_with_template("qwen2", QWEN_TOOLS, tmp_path / "qwen-tools")
    reloaded = AutoTokenizer.from_pretrained(path)
    assert reloaded.chat_template == QWEN_TOOLS
    text = reloaded.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tools=[TIME], add_generation_prompt=True, tokenize=False
    )
    assert json.dumps(TIME) in text
    assert ChatTemplate(reloaded).supports_tools
    assert (path / "config.json").is_file()
