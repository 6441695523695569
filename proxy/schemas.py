"""OpenAI request and response models (chat + completions) with kvproxy's extensions.

Requests ignore unknown fields (clients send many we have no use for) but validate every field we
act on, and refuse the OpenAI fields that would change the answer and are not implemented.
Responses carry the standard ``usage`` plus a ``kvproxy`` object that standard clients ignore.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from proxy.errors import InvalidRequest

MAX_STOP_SEQUENCES = 4


def _utf8_clean(value: str) -> str:
    # JSON can carry lone surrogates ("\ud800"); the tokenizer cannot, so refuse them as a 400.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains an invalid Unicode code point (lone surrogate)") from None
    return value


Text = Annotated[str, AfterValidator(_utf8_clean)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class StreamOptions(_Request):
    include_usage: bool = False


class TextPart(_Request):
    type: Literal["text"]
    text: Text


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


_NOT_IMPLEMENTED: Mapping[str, tuple[Any, ...]] = MappingProxyType(
    {
        # field -> the values that leave the answer as it is (accepted: clients send them)
        "tools": (None, []),
        "tool_choice": (None, "none", "auto"),
        "functions": (None, []),
        "function_call": (None, "none", "auto"),
        "response_format": (None, {"type": "text"}),
        "logprobs": (None, False),
        "top_logprobs": (None, 0),
        "logit_bias": (None, {}),
        "frequency_penalty": (None, 0, 0.0),
        "presence_penalty": (None, 0, 0.0),
        "best_of": (None, 1),
        "echo": (None, False),
        "suffix": (None, ""),
        "prediction": (None,),
        "audio": (None,),
        "modalities": (None, ["text"]),
    }
)
"""OpenAI fields that would change the answer and are not implemented: a 400 naming the field
(never silently dropped), unless the value is one that changes nothing."""


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
    n: int = 1
    cache_salt: Text | None = Field(default=None, max_length=1024)

    @model_validator(mode="wrap")
    @classmethod
    def _refuse_not_implemented(cls, data: Any, handler: Any) -> Any:
        if isinstance(data, dict):
            for name, harmless in _NOT_IMPLEMENTED.items():
                if name in data and data[name] not in harmless:
                    raise InvalidRequest(
                        f"'{name}' is not supported by this server yet; remove it or send its default.",
                        param=name,
                        code="unsupported_parameter",
                    )
        return handler(data)

    @field_validator("temperature", "top_p", "top_k", "n", "stream", mode="before")
    @classmethod
    def _null_is_default(cls, value: Any, info: Any) -> Any:
        # Clients often send explicit nulls for "use the default".
        if value is None:
            return cls.model_fields[info.field_name].default
        return value

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is supported")
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

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    @field_validator("messages")
    @classmethod
    def _some_content(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if all(not m.text() for m in value):
            raise ValueError("every message is empty")
        return value

    def requested_max_tokens(self) -> int | None:
        # max_completion_tokens is the newer name; when both are sent the tighter one wins.
        values = [v for v in (self.max_tokens, self.max_completion_tokens) if v is not None]
        return min(values) if values else None


class CompletionRequest(SamplingRequest):
    prompt: Text | list[Text]

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


# ---- responses -------------------------------------------------------------------------------


class KvproxyUsage(BaseModel):
    """What the cache did for this request (ignored by standard clients)."""

    cached_by_tier: dict[str, int]
    ttft_ms: float | None
    miss_reason: str | None
    miss_block: int | None
    prefilled_tokens: int | None = None
    lookup_ms: float | None = None
    """Of ``ttft_ms``: hashing the blocks, reading the tiers, checking every record."""
    queue_ms: float | None = None
    """Of ``ttft_ms``: waiting to join the batch (after the lookup)."""
    restore_ms: float | None = None
    """Of ``ttft_ms``: loading the verified K/V into the request's buffers."""
    prefill_ms: float | None = None
    """Of ``ttft_ms``: the uncached suffix through the model (in one or more steps shared with
    other requests), up to the first sampled token."""
    prefill_steps: int | None = None
    """How many forward steps the prefill took (more than one: it was chunked)."""


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    kvproxy: KvproxyUsage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kvproxy"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
