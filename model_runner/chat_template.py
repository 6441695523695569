"""The chat template of one served tokenizer: rendering with tools, and what it writes for a tool call.

Rendering goes through ``tokenizer.apply_chat_template(tokenize=False)``, so a template sees what
transformers gives it (``tools`` as ``{"type": "function", "function": {...}}`` dicts, keys whose
value is None dropped, ``reasoning_content`` aliased, the special tokens as variables). What the
template does with tools, tool calls and call ids is learned by rendering probe conversations,
never by recognising a model family: any template that writes a tool call as literal text around
``arguments | tojson`` works.
"""

from __future__ import annotations

import inspect
import json
import random
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from types import MappingProxyType
from typing import Any

import jinja2
import jinja2.meta
from transformers import PreTrainedTokenizerBase

FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] + ': ' + (message['content'] if message['content'] is string else '') + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)
"""For tokenizers that ship no chat template (base models). It knows no tools."""

_ALNUM = string.ascii_letters + string.digits
_PROBE_NAME = "kvproxy_probe_fn"
_SENTINEL_ARGS: Mapping[str, str] = MappingProxyType({"kvproxy_probe_key": "kvproxy_probe_value"})
_PROBE_USER: Mapping[str, str] = MappingProxyType({"role": "user", "content": "kvproxy probe"})


class ChatTemplateError(ValueError):
    """The template refused the conversation (its ``raise_exception``, or a Jinja error)."""


class ToolSyntaxUnknown(ValueError):
    """The template's tool-call text could not be located in a probe rendering."""


class MessageError(ValueError):
    """A message is malformed; ``param`` names the field, e.g.
    ``messages[1].tool_calls[0].function.arguments``."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass(frozen=True)
class CallIdStyle:
    """Tool call ids a template accepts: ``prefix`` then ``length`` random ASCII letters/digits."""

    prefix: str
    length: int

    def new(self, rng: random.Random | None = None) -> str:
        """A fresh id (from ``rng`` when given, for reproducible tests; else from the OS)."""
        source = rng if rng is not None else random.SystemRandom()
        return self.prefix + "".join(source.choice(_ALNUM) for _ in range(self.length))

    def matches(self, call_id: str) -> bool:
        body = call_id[len(self.prefix) :]
        return call_id.startswith(self.prefix) and len(body) == self.length and all(c in _ALNUM for c in body)


OPENAI_CALL_IDS = CallIdStyle(prefix="call_", length=24)
"""What OpenAI sends; the default."""
NINE_ALNUM_CALL_IDS = CallIdStyle(prefix="", length=9)
"""Mistral's templates refuse any other id."""


def render_arguments(arguments: Mapping[str, Any]) -> str:
    """``arguments | tojson`` as transformers renders it (``json.dumps``, non-ASCII kept): the text a
    generated arguments object must equal for the history to re-render to the generated text."""
    return json.dumps(dict(arguments), ensure_ascii=False)


def probe_tool(name: str) -> dict[str, Any]:
    """A minimal tool definition named ``name``, in the shape transformers passes as ``tools``."""
    return {
        "type": "function",
        "function": {"name": name, "description": "", "parameters": {"type": "object", "properties": {}}},
    }


class ChatTemplate:
    """Renders conversations with the tokenizer's chat template (or ``FALLBACK_CHAT_TEMPLATE``).

    Messages follow HF conventions (tool call ``arguments`` as a mapping); OpenAI-shaped ones go
    through ``normalize_messages`` first. Probes run once and are cached on the instance.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        own = getattr(tokenizer, "chat_template", None)
        self._sources: Mapping[str, str] = (
            dict(own) if isinstance(own, Mapping) else {"default": own or FALLBACK_CHAT_TEMPLATE}
        )
        self.is_fallback = not own
        params = inspect.signature(tokenizer.apply_chat_template).parameters
        # Template variables travel as apply_chat_template's **kwargs: they may not shadow its own.
        self._reserved = frozenset(p for p in params if p != "kwargs") | {"messages"}

    @property
    def source(self) -> str:
        """The Jinja source used for conversations without tools."""
        return self._source_for(None)

    # -- capabilities --------------------------------------------------------------------------

    @cached_property
    def supports_tools(self) -> bool:
        """Whether the template renders tools at all: a probe conversation renders differently with
        and without ``tools=``. False when either rendering fails."""
        try:
            bare = self.render([_PROBE_USER])
            offered = self.render([_PROBE_USER], tools=[probe_tool(_PROBE_NAME)])
        except ValueError:
            return False
        return bare != offered

    def accepts(self, variable: str) -> bool:
        """Whether the template source reads the top-level variable ``variable`` (e.g.
        ``enable_thinking``, ``reasoning_effort``)."""
        return variable in self._variables

    @cached_property
    def _variables(self) -> frozenset[str]:
        found: set[str] = set()
        for source in self._sources.values():
            found |= _template_variables(source)
        return frozenset(found)

    @cached_property
    def call_id_style(self) -> CallIdStyle:
        """How call ids must look: the first style a probe tool-call conversation renders with."""
        for style in (OPENAI_CALL_IDS, NINE_ALNUM_CALL_IDS):
            call_id = style.new(random.Random(0))
            try:
                self.render(
                    _probe_call_conversation(_PROBE_NAME, call_id, dict(_SENTINEL_ARGS)),
                    tools=[probe_tool(_PROBE_NAME)],
                )
            except ValueError:
                continue
            return style
        return OPENAI_CALL_IDS

    def new_call_id(self, rng: random.Random | None = None) -> str:
        """A fresh tool call id this template accepts."""
        return self.call_id_style.new(rng)

    @cached_property
    def wants_mapping_arguments(self) -> bool:
        """Whether tool call arguments are rendered from a mapping (``arguments | tojson``, HF's
        convention) rather than from the JSON string as given. True when the probe cannot tell."""
        call_id = self.new_call_id(random.Random(0))
        sentinel = render_arguments(_SENTINEL_ARGS)
        texts = {}
        for shape, args in (("mapping", dict(_SENTINEL_ARGS)), ("string", sentinel)):
            try:
                texts[shape] = self.render(
                    _probe_call_conversation(_PROBE_NAME, call_id, args), tools=[probe_tool(_PROBE_NAME)]
                )
            except ValueError:
                texts[shape] = ""
        return not (sentinel in texts["string"] and sentinel not in texts["mapping"])

    # -- rendering -----------------------------------------------------------------------------

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        variables: Mapping[str, Any] | None = None,
    ) -> str:
        """The prompt text for ``messages`` (HF conventions). ``variables`` are extra template
        variables (``enable_thinking=False``...). Raises ``ChatTemplateError`` when the template
        refuses the conversation, ``ValueError`` for an empty one or a variable that shadows an
        ``apply_chat_template`` parameter."""
        extra = dict(variables or {})
        clash = sorted(self._reserved & extra.keys())
        if clash:
            raise ValueError(f"template variables {clash} clash with apply_chat_template's own parameters")
        try:
            text = self._tokenizer.apply_chat_template(
                [dict(m) for m in messages],
                tools=tools,
                chat_template=self._source_for(tools),
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
                **extra,
            )
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"the chat template refused this conversation: {exc}") from exc
        return str(text)

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of a plain completion prompt: the tokenizer adds its own special tokens (BOS,
        when it has one). The engine and the router (``proxy.route``) both encode through here."""
        return list(self._tokenizer(text)["input_ids"])

    def tokenize(self, text: str) -> list[int]:
        """Token ids of rendered text; the template wrote its own special tokens (BOS too, if any)."""
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def tokenize_with_offsets(self, text: str) -> tuple[list[int], list[int] | None]:
        """``tokenize(text)`` and each token's end offset in ``text`` (``None`` when the tokenizer
        is not a fast one and cannot tell)."""
        if not getattr(self._tokenizer, "is_fast", False):
            return self.tokenize(text), None
        encoded = self._tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(encoded["input_ids"]), [int(end) for _, end in encoded["offset_mapping"]]

    def encode(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        variables: Mapping[str, Any] | None = None,
    ) -> list[int]:
        """``tokenize(render(...))``."""
        text = self.render(
            messages, tools=tools, add_generation_prompt=add_generation_prompt, variables=variables
        )
        return self.tokenize(text)

    # -- tool calls ----------------------------------------------------------------------------

    def tool_call_syntax(self, name: str, call_id: str) -> tuple[str, str]:
        """``(prefix, suffix)``: the literal text the template writes for one assistant tool call of
        ``name`` with id ``call_id`` before and after ``arguments | tojson``, from right after the
        generation prompt to just before the end-of-turn (EOS) text.

        Found by rendering ``[user]`` with the generation prompt and ``[user, assistant call, tool
        result]`` without it (the call is not the last message, as when a client sends the history
        back) and locating the sentinel arguments. Raises ``ToolSyntaxUnknown`` when the history
        does not extend the prompt, or the sentinel or EOS text is not found exactly where expected.
        """
        eos = self._tokenizer.eos_token
        if not eos:
            raise ToolSyntaxUnknown("the tokenizer has no EOS token to end a tool-call turn")
        tools = [probe_tool(name)]
        sentinel = render_arguments(_SENTINEL_ARGS)
        arguments = dict(_SENTINEL_ARGS) if self.wants_mapping_arguments else sentinel
        try:
            prompt = self.render([_PROBE_USER], tools=tools)
            history = self.render(
                _probe_call_conversation(name, call_id, arguments),
                tools=tools,
                add_generation_prompt=False,
            )
        except ValueError as exc:
            raise ToolSyntaxUnknown(
                f"the template cannot render a call of {name!r} with id {call_id!r}: {exc}"
            ) from exc
        if not history.startswith(prompt):
            raise ToolSyntaxUnknown("the history with a tool call does not start with the generation prompt")
        turn = history[len(prompt) :]
        if turn.count(sentinel) != 1:
            raise ToolSyntaxUnknown(
                f"the call's arguments appear {turn.count(sentinel)} times in the turn, not once as tojson"
            )
        prefix, after = turn.split(sentinel)
        if eos in prefix or eos not in after:
            raise ToolSyntaxUnknown("the tool-call turn does not end with the EOS text after its arguments")
        return prefix, after[: after.index(eos)]

    def normalize_messages(self, messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """OpenAI messages to HF conventions (new dicts; the input is not changed; idempotent).

        Assistant ``tool_calls`` become ``{"id", "type", "function": {"name", "arguments"}}`` (name
        first, as templates that ``tojson`` the whole function expect); a JSON-string ``arguments``
        is parsed to a mapping when ``wants_mapping_arguments`` (else a mapping is dumped to a
        string). An empty ``tool_calls`` list is dropped. A ``tool`` message without ``name`` gets
        the name of the call its ``tool_call_id`` answers. Raises ``MessageError`` naming the field.
        """
        names: dict[str, str] = {}
        out: list[dict[str, Any]] = []
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping):
                raise MessageError("a message must be an object", f"messages[{i}]")
            item = dict(message)
            calls = item.pop("tool_calls", None)
            if calls:
                if not isinstance(calls, Sequence) or isinstance(calls, str):
                    raise MessageError("must be a list of tool calls", f"messages[{i}].tool_calls")
                item["tool_calls"] = [
                    self._normalize_call(call, f"messages[{i}].tool_calls[{j}]")
                    for j, call in enumerate(calls)
                ]
                for call in item["tool_calls"]:
                    if isinstance(call.get("id"), str):
                        names[call["id"]] = call["function"]["name"]
            if item.get("role") == "tool" and not item.get("name") and item.get("tool_call_id") in names:
                item["name"] = names[item["tool_call_id"]]
            out.append(item)
        return out

    # -- helpers -------------------------------------------------------------------------------

    def _source_for(self, tools: list[dict[str, Any]] | None) -> str:
        if tools and "tool_use" in self._sources:
            return self._sources["tool_use"]
        return self._sources.get("default") or next(iter(self._sources.values()))

    def _normalize_call(self, call: Any, where: str) -> dict[str, Any]:
        if not isinstance(call, Mapping):
            raise MessageError("a tool call must be an object", where)
        function = call.get("function")
        if not isinstance(function, Mapping):
            raise MessageError("a tool call needs a 'function' object", f"{where}.function")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise MessageError("a tool call needs a function name", f"{where}.function.name")
        arguments = _arguments_mapping(function.get("arguments"), f"{where}.function.arguments")
        normalized: dict[str, Any] = {}
        if call.get("id") is not None:
            normalized["id"] = call["id"]
        normalized["type"] = call.get("type") or "function"
        normalized["function"] = {
            "name": name,
            "arguments": arguments if self.wants_mapping_arguments else render_arguments(arguments),
        }
        return normalized


def _arguments_mapping(arguments: Any, param: str) -> dict[str, Any]:
    if isinstance(arguments, Mapping):
        return dict(arguments)
    if not isinstance(arguments, str):
        raise MessageError("tool call arguments must be a JSON object (as a string)", param)
    try:
        parsed = json.loads(arguments)
    except ValueError:
        raise MessageError("tool call arguments are not valid JSON", param) from None
    if not isinstance(parsed, dict):
        raise MessageError("tool call arguments must be a JSON object", param)
    return parsed


def _probe_call_conversation(name: str, call_id: str, arguments: Any) -> list[dict[str, Any]]:
    """User message, assistant with one tool call (no content), and its tool result."""
    call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
    return [
        dict(_PROBE_USER),
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call_id, "name": name, "content": "kvproxy probe result"},
    ]


def _template_variables(source: str) -> frozenset[str]:
    """Undeclared (caller-supplied) variables of a Jinja template. Templates using tags a plain
    environment cannot parse (transformers' ``{% generation %}``) fall back to a word search."""
    env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
    try:
        return frozenset(jinja2.meta.find_undeclared_variables(env.parse(source)))
    except jinja2.TemplateSyntaxError:
        return frozenset(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", source))
