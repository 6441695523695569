"""OpenAI response models (chat + completions, whole and streamed) with kvproxy's extensions:
the standard ``usage`` plus a ``kvproxy`` object that standard clients ignore."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


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


# ---- logprobs --------------------------------------------------------------------------------


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobOut(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None
    refusal: list[TokenLogprobOut] | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


# ---- chat ------------------------------------------------------------------------------------


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None
    function_call: FunctionCallOut | None = None
    """Legacy (the request used ``functions``): the one call."""
    refusal: None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None
    function_call: FunctionCallDelta | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


# ---- completions -----------------------------------------------------------------------------


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


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
