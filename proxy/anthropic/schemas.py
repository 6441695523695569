"""Anthropic Messages API request models (``POST /v1/messages``, ``/v1/messages/count_tokens``).

What the official SDK sends is validated here; fields that would change the answer and are not
implemented (images, documents, server tools, MCP servers, assistant prefill...) are a 400 naming
them, never a silent drop. Fields that cannot change the answer (``metadata``, ``service_tier``,
``container``...) are accepted and ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from proxy.errors import InvalidRequest
from proxy.schemas import Text, ToolName

MAX_BREAKPOINTS = 4
MAX_STOP_SEQUENCES = 16
TTL_SECONDS: Mapping[str, int] = MappingProxyType({"5m": 300, "1h": 3600})


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class CacheControl(_Model):
    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] = "5m"

    @property
    def ttl_s(self) -> int:
        return TTL_SECONDS[self.ttl]


def _non_empty(value: str) -> str:
    if not value:
        raise ValueError("text content blocks must be non-empty")
    return value


class TextBlock(_Model):
    type: Literal["text"]
    text: Annotated[Text, AfterValidator(_non_empty)]
    cache_control: CacheControl | None = None


class ToolUseBlock(_Model):
    type: Literal["tool_use"]
    id: Text = Field(min_length=1, max_length=256)
    name: Text = Field(min_length=1, max_length=128)
    input: dict[str, Any]
    cache_control: CacheControl | None = None


class ToolResultBlock(_Model):
    type: Literal["tool_result"]
    tool_use_id: Text = Field(min_length=1, max_length=256)
    content: Text | list[TextBlock] = ""
    is_error: bool = False
    cache_control: CacheControl | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ThinkingBlock(_Model):
    """An earlier assistant turn's reasoning, as this server returned it."""

    type: Literal["thinking"]
    thinking: Text
    signature: str = ""
    cache_control: CacheControl | None = None


class RedactedThinkingBlock(_Model):
    """Opaque reasoning from Anthropic's own models: nothing a chat template can render."""

    type: Literal["redacted_thinking"]
    data: str = ""


def _block_tag(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return f"{kind} block" if isinstance(kind, str) else None


# Tagged "<type> block": a validation error's location then reads ("content", 0, "text block",
# "text"), and ``proxy.errors.loc_to_param`` drops the tag (no field name has a space).
ContentBlock = Annotated[
    Annotated[TextBlock, Tag("text block")]
    | Annotated[ToolUseBlock, Tag("tool_use block")]
    | Annotated[ToolResultBlock, Tag("tool_result block")]
    | Annotated[ThinkingBlock, Tag("thinking block")]
    | Annotated[RedactedThinkingBlock, Tag("redacted_thinking block")],
    Discriminator(_block_tag),
]
_BLOCK_TYPES = ("text", "tool_use", "tool_result", "thinking", "redacted_thinking")


class Message(_Model):
    role: Literal["user", "assistant"]
    content: Text | list[ContentBlock]

    def blocks(self) -> list[Any]:
        if isinstance(self.content, str):
            return [TextBlock(type="text", text=self.content)] if self.content else []
        return list(self.content)


class Tool(_Model):
    type: Literal["custom"] | None = None
    name: ToolName
    description: Text | None = None
    input_schema: dict[str, Any]
    cache_control: CacheControl | None = None

    @field_validator("input_schema")
    @classmethod
    def _object_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        if value.get("type", "object") != "object":
            raise ValueError("input_schema must describe an object ('type': 'object')")
        return value


class ToolChoice(_Model):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = Field(default=None, min_length=1, max_length=64)
    disable_parallel_tool_use: bool = False

    @model_validator(mode="after")
    def _named(self) -> ToolChoice:
        if self.type == "tool" and not self.name:
            raise ValueError("tool_choice of type 'tool' needs the tool's 'name'")
        return self


class Thinking(_Model):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(default=None, ge=0)


_NOT_IMPLEMENTED: Mapping[str, tuple[Any, ...]] = MappingProxyType(
    {
        # field -> the values that leave the answer as it is
        "mcp_servers": (None, []),
        "context_management": (None,),
    }
)
_BLOCKS_NOT_IMPLEMENTED = ("image", "document", "search_result", "server_tool_use", "web_search_tool_result")


def refuse_not_implemented(data: Any) -> None:
    """A 400 naming the first field or content block that would change the answer and is not
    implemented (before the schema, so the message names the field, not a union branch)."""
    if not isinstance(data, dict):
        return
    for name, harmless in _NOT_IMPLEMENTED.items():
        if name in data and data[name] not in harmless:
            raise InvalidRequest(f"{name}: not supported by this server.", param=name)
    tools = data.get("tools")
    if isinstance(tools, list):
        for i, tool in enumerate(tools):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind not in (None, "custom"):
                raise InvalidRequest(
                    f"tools.{i}.type: server tools ('{str(kind)[:60]}') are not supported by this "
                    "server; send custom tools (name, description, input_schema).",
                    param=f"tools.{i}.type",
                )
    places: list[tuple[str, Any]] = []
    messages = data.get("messages")
    if isinstance(messages, list):
        for i, message in enumerate(messages):
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):
                places += [(f"messages.{i}.content.{j}", block) for j, block in enumerate(content)]
                for j, block in enumerate(content):
                    inner = block.get("content") if isinstance(block, dict) else None
                    if isinstance(inner, list):
                        places += [(f"messages.{i}.content.{j}.content.{k}", b) for k, b in enumerate(inner)]
    system = data.get("system")
    if isinstance(system, list):
        places += [(f"system.{j}", block) for j, block in enumerate(system)]
    for where, block in places:
        if isinstance(block, dict) and not isinstance(block.get("type"), str):
            raise InvalidRequest(
                f"{where}.type: Field required (a content block names its type).", param=f"{where}.type"
            )
        kind = block.get("type") if isinstance(block, dict) else None
        if kind in _BLOCKS_NOT_IMPLEMENTED or (isinstance(kind, str) and kind not in _BLOCK_TYPES):
            raise InvalidRequest(
                f"{where}.type: content blocks of type '{str(kind)[:60]}' are not supported by this "
                "server; send text.",
                param=f"{where}.type",
            )


class JsonOutputFormat(_Model):
    """Structured outputs: the answer is JSON that validates against ``schema`` (enforced by
    constrained decoding, as ``response_format`` on the OpenAI routes)."""

    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Model):
    format: JsonOutputFormat | None = None
    effort: Literal["low", "medium", "high", "max"] | None = None
    """Handed to the chat template as ``reasoning_effort`` when it reads that variable."""


class Conversation(_Model):
    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    system: Text | list[TextBlock] | None = None
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    cache_control: CacheControl | None = None
    """Automatic caching: a breakpoint on the last cacheable block."""
    output_config: OutputConfig | None = None
    output_format: JsonOutputFormat | None = None
    """The structured-outputs beta's spelling of ``output_config.format``."""

    @model_validator(mode="wrap")
    @classmethod
    def _refuse(cls, data: Any, handler: Any) -> Any:
        refuse_not_implemented(data)
        return handler(data)

    @model_validator(mode="after")
    def _consistent(self) -> Conversation:
        names = [t.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise InvalidRequest("tools: tool names must be unique.", param="tools")
        choice = self.tool_choice
        if choice is not None and choice.type == "tool" and choice.name not in names:
            raise InvalidRequest(
                f"tool_choice: the tool '{choice.name}' is not among the tools.", param="tool_choice.name"
            )
        if choice is not None and choice.type == "any" and not names:
            raise InvalidRequest("tool_choice: 'any' needs at least one tool.", param="tool_choice")
        if self.messages[-1].role != "user":
            raise InvalidRequest(
                "messages: the last message must be a user message (assistant prefill is not "
                "supported by this server).",
                param=f"messages.{len(self.messages) - 1}.role",
            )
        if not any(m.blocks() for m in self.messages):
            raise InvalidRequest("messages: every message is empty.", param="messages")
        if self.output_format is not None and self.output_config is not None and self.output_config.format:
            raise InvalidRequest(
                "output_format: send output_config.format or the older output_format, not both.",
                param="output_format",
            )
        return self

    def json_format(self) -> JsonOutputFormat | None:
        if self.output_config is not None and self.output_config.format is not None:
            return self.output_config.format
        return self.output_format

    def system_blocks(self) -> list[TextBlock]:
        if self.system is None:
            return []
        if isinstance(self.system, str):
            return [TextBlock(type="text", text=self.system)] if self.system else []
        return list(self.system)


class CountTokensRequest(Conversation):
    """``POST /v1/messages/count_tokens``: the conversation without ``max_tokens``."""


class MessagesRequest(Conversation):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[Text] | None = Field(default=None, max_length=MAX_STOP_SEQUENCES)
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    metadata: dict[str, Any] | None = None
    cache_salt: Text | None = Field(default=None, max_length=1024)
    """kvproxy extension (as on the OpenAI routes): a partition within the caller's tenant."""

    @field_validator("stop_sequences")
    @classmethod
    def _stops(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(not s for s in value):
            raise ValueError("stop sequences must not be empty")
        return value
