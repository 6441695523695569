"""OpenAI request models (chat + completions) with kvproxy's extensions.

Requests ignore unknown fields when they cannot change the answer (``user``, ``metadata``,
``store``, ``service_tier``, ``prompt_cache_key``...), validate every field we act on, and refuse
with a 400 naming it any field that would change the answer and is not implemented (never a
silent drop). Response models are in ``proxy.responses``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from model_runner.records import MAX_CHOICES
from model_runner.sampling import MAX_TOP_LOGPROBS
from proxy.errors import InvalidRequest

MAX_STOP_SEQUENCES = 4
MAX_TOOLS = 128
MAX_LOGIT_BIAS = 300
MAX_COMPLETION_LOGPROBS = 5
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _utf8_clean(value: str) -> str:
    # JSON can carry lone surrogates ("\ud800"); the tokenizer cannot, so refuse them as a 400.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains an invalid Unicode code point (lone surrogate)") from None
    return value


Text = Annotated[str, AfterValidator(_utf8_clean)]


def _unsupported(name: str, why: str = "is not supported by this server") -> InvalidRequest:
    return InvalidRequest(
        f"'{name}' {why}; remove it or send its default.", param=name, code="unsupported_parameter"
    )


def _refuse(
    data: Any, table: Mapping[str, tuple[Any, ...]], why: str = "is not supported by this server"
) -> None:
    if isinstance(data, dict):
        for name, harmless in table.items():
            if name in data and data[name] not in harmless:
                raise _unsupported(name, why)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class StreamOptions(_Request):
    include_usage: bool = False


# ---- messages --------------------------------------------------------------------------------


class TextPart(_Request):
    type: Literal["text"]
    text: Text


_PART_TYPES = ("text",)


def _refuse_non_text_parts(data: Any) -> None:
    """Images, audio and files in ``content`` would change the answer: a 400 naming the part."""
    messages = data.get("messages") if isinstance(data, dict) else None
    if not isinstance(messages, list):
        return
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind not in _PART_TYPES:
                raise InvalidRequest(
                    f"Content parts of type '{kind[:40]}' are not supported by this server; send text parts.",
                    param=f"messages[{i}].content[{j}].type",
                    code="unsupported_parameter",
                )


class FunctionCallIn(_Request):
    name: Text = Field(min_length=1, max_length=64)
    arguments: Text = "{}"
    """A JSON object, as a string (OpenAI's shape); a mapping is accepted too."""

    @field_validator("arguments", mode="before")
    @classmethod
    def _mapping_to_json(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return json.dumps(value, ensure_ascii=False)
        return value


class ToolCallIn(_Request):
    id: Text = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: Text | None = Field(default=None, max_length=256)
    function_call: FunctionCallIn | None = None
    """Legacy: an assistant's one function call (mapped onto ``tool_calls``)."""
    reasoning_content: Text | None = None
    """An assistant turn's thinking, as this server returned it (rendered when the template does)."""

    @model_validator(mode="after")
    def _roles(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a 'tool' message needs the 'tool_call_id' of the call it answers")
        if self.role == "function" and not self.name:
            raise ValueError("a 'function' message needs the function's 'name'")
        if (self.tool_calls or self.function_call) and self.role != "assistant":
            raise ValueError("only assistant messages carry tool calls")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def has_payload(self) -> bool:
        return bool(self.text() or self.tool_calls or self.function_call)


# ---- tools and structured output -------------------------------------------------------------


def _json_schema_object(value: Any) -> Any:
    if value is not None and not isinstance(value, dict):
        raise ValueError("must be a JSON schema object")
    return value


def _tool_name(value: str) -> str:
    if not _TOOL_NAME.match(value):
        raise ValueError("must be 1-64 characters of a-z, A-Z, 0-9, '_' and '-'")
    return value


ToolName = Annotated[str, AfterValidator(_tool_name)]
"""A tool's name as both APIs (and the chat templates' call syntax) take it."""


class FunctionDef(_Request):
    name: ToolName
    description: Text | None = None
    parameters: Annotated[dict[str, Any] | None, AfterValidator(_json_schema_object)] = None
    strict: bool | None = None


class ToolDef(_Request):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Request):
    name: str = Field(min_length=1, max_length=64)


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class JsonSchemaFormat(_Request):
    name: str = Field(default="response", min_length=1, max_length=64)
    description: Text | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a 'json_schema' object")
        return self


# ---- the sampling fields both routes share ---------------------------------------------------


def _logit_bias(value: dict[str, float] | None) -> dict[str, float] | None:
    if value is None:
        return None
    if len(value) > MAX_LOGIT_BIAS:
        raise ValueError(f"at most {MAX_LOGIT_BIAS} entries")
    for key, bias in value.items():
        if not key.isdigit():
            raise ValueError(f"keys are token ids; got '{key[:20]}'")
        if not -100.0 <= bias <= 100.0:
            raise ValueError("values must be in [-100, 100]")
    return value


class SamplingRequest(_Request):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, description="kvproxy extension: 0 = off")
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)  # torch's seed range
    stop: Text | list[Text] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: Annotated[dict[str, float] | None, AfterValidator(_logit_bias)] = None
    cache_salt: Text | None = Field(default=None, max_length=1024)
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    """Keep this prompt's prefix in memory: ``in_memory`` for 10 minutes, ``24h`` for a day,
    refreshed whenever a request reads it (a pin of the caller's tenant)."""
    prompt_cache_key: str | None = Field(default=None, max_length=1024)
    """A routing hint, kept in the request log; it never widens sharing beyond the tenant."""

    @field_validator(
        "temperature", "top_p", "top_k", "n", "stream", "frequency_penalty", "presence_penalty", mode="before"
    )
    @classmethod
    def _null_is_default(cls, value: Any, info: Any) -> Any:
        # Clients often send explicit nulls for "use the default".
        if value is None:
            return cls.model_fields[info.field_name].default
        return value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if (isinstance(value, list) and any(not s for s in value)) or value == "":
            raise ValueError("stop sequences must not be empty")
        return value

    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), float(v)) for k, v in (self.logit_bias or {}).items())

    def logprobs_wanted(self) -> tuple[bool, int]:
        """(report logprobs, how many alternatives per token)."""
        return False, 0

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


_CHAT_NOT_IMPLEMENTED: Mapping[str, tuple[Any, ...]] = MappingProxyType(
    {
        # field -> the values that leave the answer as it is (accepted: clients send them)
        "prediction": (None,),
        "audio": (None,),
        "modalities": (None, ["text"]),
        "web_search_options": (None,),
    }
)
"""Chat fields that would change the answer and are not implemented: a 400 naming the field."""


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[ToolDef] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[FunctionDef] | None = Field(default=None, max_length=MAX_TOOLS)
    """Legacy spelling of ``tools`` (mapped onto them)."""
    function_call: Literal["none", "auto"] | NamedFunction | None = None
    """Legacy spelling of ``tool_choice``."""
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    reasoning_effort: str | None = Field(default=None, max_length=32)
    """Handed to the chat template when it reads ``reasoning_effort``; otherwise it changes nothing."""

    @model_validator(mode="wrap")
    @classmethod
    def _refuse_not_implemented(cls, data: Any, handler: Any) -> Any:
        _refuse(data, _CHAT_NOT_IMPLEMENTED)
        _refuse_non_text_parts(data)
        return handler(data)

    @field_validator("messages")
    @classmethod
    def _some_content(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if all(not m.has_payload() for m in value):
            raise ValueError("every message is empty")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.tools and self.functions:
            raise InvalidRequest("Send 'tools' or the legacy 'functions', not both.", param="functions")
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequest("'top_logprobs' needs 'logprobs': true.", param="top_logprobs")
        names = [t.function.name for t in self.tools or []] + [f.name for f in self.functions or []]
        if len(set(names)) != len(names):
            raise InvalidRequest("Tool names must be unique.", param="tools" if self.tools else "functions")
        return self

    def requested_max_tokens(self) -> int | None:
        # max_completion_tokens is the newer name; when both are sent the tighter one wins.
        values = [v for v in (self.max_tokens, self.max_completion_tokens) if v is not None]
        return min(values) if values else None

    def logprobs_wanted(self) -> tuple[bool, int]:
        return bool(self.logprobs), int(self.top_logprobs or 0) if self.logprobs else 0


_COMPLETIONS_NOT_IMPLEMENTED: Mapping[str, tuple[Any, ...]] = MappingProxyType(
    {
        "best_of": (None, 1),
        "echo": (None, False),
        "suffix": (None, ""),
    }
)
_NOT_COMPLETIONS_FIELDS: Mapping[str, tuple[Any, ...]] = MappingProxyType(
    {
        "tools": (None, []),
        "tool_choice": (None, "none", "auto"),
        "functions": (None, []),
        "function_call": (None, "none", "auto"),
        "response_format": (None, {"type": "text"}),
        "messages": (None,),
    }
)
"""Chat fields sent to /v1/completions: refused rather than ignored (they would change the answer)."""


class CompletionRequest(SamplingRequest):
    prompt: Text | list[Text]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    """Report the sampled token's logprob and this many alternatives (OpenAI: at most 5)."""

    @model_validator(mode="wrap")
    @classmethod
    def _refuse_not_implemented(cls, data: Any, handler: Any) -> Any:
        _refuse(data, _COMPLETIONS_NOT_IMPLEMENTED)
        _refuse(data, _NOT_COMPLETIONS_FIELDS, "is a /v1/chat/completions field")
        return handler(data)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("exactly one prompt is supported")
        text = value if isinstance(value, str) else value[0]
        if not text:
            raise ValueError("must not be empty")
        return value

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def logprobs_wanted(self) -> tuple[bool, int]:
        return self.logprobs is not None, int(self.logprobs or 0)


class WarmupItem(_Request):
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _exactly_one(self) -> WarmupItem:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("each item needs exactly one of 'prompt' or 'messages'")
        if self.prompt == "":
            raise ValueError("prompt must not be empty")
        return self


class WarmupRequest(_Request):
    items: list[WarmupItem] = Field(min_length=1, max_length=10_000)
    tenant: str | None = Field(default=None, min_length=1, max_length=256)
    cache_salt: Text | None = Field(default=None, max_length=1024)


PIN_TTL_MAX_S = 7 * 24 * 3600


class PinCreateRequest(WarmupItem):
    """``POST /v1/cache/pins``: prefill a prompt (or a conversation) and keep its prefix in memory
    for ``ttl_s`` seconds, refreshed on every hit, for ``tenant`` (default: the caller's)."""

    ttl_s: float = Field(gt=0, le=PIN_TTL_MAX_S)
    tenant: str | None = Field(default=None, min_length=1, max_length=256)
    cache_salt: Text | None = Field(default=None, max_length=1024)
