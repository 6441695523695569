"""From an OpenAI chat request to what the engine runs and how its output is read back.

A ``ChatPlan`` holds the rendered prompt (the model's own chat template, with ``tools=``), the
constraint that enforces a structured output (``response_format``, or a ``tool_choice`` of
``required`` / a named function: the call is generated in the template's own tool-call syntax,
so the history the client sends back re-renders to the generated text), and what the output
parser needs. Built once per request on a helper thread (rendering and compiling take a while).
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from model_runner.chat_template import ChatTemplate, ChatTemplateError, MessageError, ToolSyntaxUnknown
from model_runner.grammar import (
    GrammarCompiler,
    GrammarError,
    ToolCallSyntax,
    json_object_grammar,
    json_schema_grammar,
    tool_call_grammar,
)
from model_runner.records import Constraint
from model_runner.response_parsing import OutputParser, ParserSpec
from proxy.errors import InvalidRequest
from proxy.schemas import ChatCompletionRequest, ChatMessage, FunctionDef, NamedToolChoice, ToolCallIn

_ROLES = {"developer": "system", "function": "tool"}
"""Roles the chat templates do not know, spelled as the ones they do."""


@dataclass(frozen=True)
class ChatPlan:
    prompt_ids: list[int]
    prompt_text: str
    token_ends: list[int] | None = None
    """Each prompt token's end offset in ``prompt_text``, when asked for (and the tokenizer can)."""
    constraint: Constraint | None = None
    tools: list[dict[str, Any]] | None = None
    """The tools as the template and the parser take them (``{"type": "function", "function": ...}``)."""
    parse_tools: bool = False
    """Read tool calls out of the output (tools given and ``tool_choice`` is not ``none``)."""
    parallel_tool_calls: bool = True
    legacy_functions: bool = False
    """The request used ``functions``: the answer carries ``function_call``, not ``tool_calls``."""
    variables: dict[str, Any] = field(default_factory=dict)


class ChatPlanner:
    """Chat rendering, constraints and output parsing of the one served model."""

    def __init__(
        self,
        template: ChatTemplate,
        compiler: GrammarCompiler | None = None,
        parsers: ParserSpec | None = None,
    ) -> None:
        """Without ``compiler`` and ``parsers`` it only renders prompts (``prompt_ids``,
        ``prompt_text``): what ``kvproxy route`` needs to hash them as the replicas do."""
        self.template = template
        self._compiler = compiler
        self._parsers = parsers

    def plan(
        self,
        body: ChatCompletionRequest,
        variables: Mapping[str, Any] | None = None,
        *,
        offsets: bool = False,
    ) -> ChatPlan:
        """Render and tokenize the prompt and build its constraint; raises ``InvalidRequest``.
        ``variables``: template variables the caller chose (e.g. ``enable_thinking``);
        ``offsets``: also note where each token ends in the text (``ChatPlan.token_ends``)."""
        tools, choice, legacy = _tools_of(body)
        if tools and not self.template.supports_tools:
            raise InvalidRequest(
                "This model's chat template has no tool support (it renders the same prompt with and "
                "without tools), so tools cannot be offered to it.",
                param="functions" if legacy else "tools",
                code="unsupported_parameter",
            )
        if choice is not None and not tools and choice != "none" and choice != "auto":
            raise InvalidRequest("'tool_choice' names a tool but no tools were given.", param="tool_choice")
        for i, tool in enumerate(tools or []):
            _check_schema(tool["function"].get("parameters"), f"tools[{i}].function.parameters")
        variables = self._variables(body, variables)
        text = self._render(body, tools, variables)
        token_ends = None
        if offsets:
            prompt_ids, token_ends = self.template.tokenize_with_offsets(text)
        else:
            prompt_ids = self.template.tokenize(text)
        parse_tools = bool(tools) and choice != "none"
        plan = ChatPlan(
            prompt_ids=prompt_ids,
            prompt_text=text,
            token_ends=token_ends,
            tools=tools or None,
            parse_tools=parse_tools,
            parallel_tool_calls=body.parallel_tool_calls is not False,
            legacy_functions=legacy,
            variables=variables,
        )
        forced = _forced_tools(tools or [], choice)
        if forced:
            call_id = self.template.new_call_id(random.Random())
            syntax = []
            for tool in forced:
                try:
                    prefix, suffix = self.template.tool_call_syntax(tool["function"]["name"], call_id)
                except ToolSyntaxUnknown:
                    raise InvalidRequest(
                        "Cannot force a tool call: the tool-call syntax of this model's chat template "
                        "could not be determined.",
                        param="function_call" if legacy else "tool_choice",
                        code="unsupported_parameter",
                    ) from None
                schema = tool["function"].get("parameters") or {"type": "object"}
                syntax.append(ToolCallSyntax(prefix=prefix, schema=schema, suffix=suffix))
            param = "tool_choice" if not legacy else "function_call"
            return dataclasses.replace(plan, constraint=self._compile(tool_call_grammar(syntax), param))
        fmt = body.response_format
        if fmt is not None and fmt.type == "json_object":
            return dataclasses.replace(
                plan, constraint=self._compile(json_object_grammar(), "response_format")
            )
        if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is not None:
            schema = fmt.json_schema.schema_ if fmt.json_schema.schema_ is not None else {"type": "object"}
            param = "response_format.json_schema.schema"
            _check_schema(schema, param)
            return dataclasses.replace(plan, constraint=self._compile(json_schema_grammar(schema), param))
        return plan

    def prompt_ids(
        self, body: ChatCompletionRequest, variables: Mapping[str, Any] | None = None
    ) -> list[int]:
        """The rendered prompt's token ids alone (no constraint, no tool checks): for counting
        tokens and for finding where a cache breakpoint's prefix ends."""
        return self.template.tokenize(self.prompt_text(body, variables))

    def prompt_text(self, body: ChatCompletionRequest, variables: Mapping[str, Any] | None = None) -> str:
        """The rendered prompt alone (no constraint, no tool checks)."""
        tools, _, _ = _tools_of(body)
        return self._render(body, tools, self._variables(body, variables))

    def _variables(self, body: ChatCompletionRequest, given: Mapping[str, Any] | None) -> dict[str, Any]:
        variables = {k: v for k, v in (given or {}).items() if self.template.accepts(k)}
        if body.reasoning_effort is not None and self.template.accepts("reasoning_effort"):
            variables["reasoning_effort"] = body.reasoning_effort
        return variables

    def _render(
        self, body: ChatCompletionRequest, tools: list[dict[str, Any]], variables: dict[str, Any]
    ) -> str:
        try:
            messages = self.template.normalize_messages(template_messages(body.messages, self.template))
            return self.template.render(messages, tools=tools or None, variables=variables)
        except MessageError as exc:
            raise InvalidRequest(str(exc), param=exc.param) from None
        except ChatTemplateError as exc:
            # The template's own refusal (e.g. roles that must alternate): the client can fix it.
            raise InvalidRequest(
                f"The model's chat template refused the conversation: {exc}", param="messages"
            ) from None

    def parser(self, plan: ChatPlan, rng: random.Random | None = None) -> OutputParser:
        """A fresh output parser for one choice of ``plan``."""
        if self._parsers is None:
            raise RuntimeError("this planner only renders prompts")
        return self._parsers.new(
            prompt_text=plan.prompt_text, tools=plan.tools, parse_tools=plan.parse_tools, rng=rng
        )

    def _compile(self, grammar: Any, param: str) -> Constraint:
        if self._compiler is None:
            raise RuntimeError("this planner only renders prompts")
        try:
            return self._compiler.compile(grammar)
        except GrammarError as exc:
            raise InvalidRequest(
                f"Cannot enforce this schema: {exc}", param=param, code="invalid_schema"
            ) from None


def _check_schema(schema: Any, param: str) -> None:
    if schema is None:
        return
    if not isinstance(schema, dict):
        raise InvalidRequest("A JSON schema must be an object.", param=param, code="invalid_schema")
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "(top level)"
        raise InvalidRequest(
            f"Invalid JSON schema at {where}: {exc.message[:200]}", param=param, code="invalid_schema"
        ) from None


def _tools_of(body: ChatCompletionRequest) -> tuple[list[dict[str, Any]], Any, bool]:
    """The tools (HF/OpenAI dicts), the tool choice ("none" | "auto" | "required" | a name), and
    whether the legacy ``functions`` spelling was used."""
    if body.functions:
        tools = [_tool_dict(f) for f in body.functions]
        fc = body.function_call
        choice = fc if isinstance(fc, str) or fc is None else {"name": fc.name}
        return tools, _choice(choice, tools, "function_call"), True
    tools = [_tool_dict(t.function) for t in body.tools or []]
    tc = body.tool_choice
    choice = {"name": tc.function.name} if isinstance(tc, NamedToolChoice) else tc
    return tools, _choice(choice, tools, "tool_choice"), False


def _choice(choice: Any, tools: list[dict[str, Any]], param: str) -> Any:
    if isinstance(choice, dict):
        names = [t["function"]["name"] for t in tools]
        if choice["name"] not in names:
            raise InvalidRequest(f"'{param}' names a function that is not among the tools.", param=param)
    elif choice == "required" and not tools:
        raise InvalidRequest(f"'{param}' is 'required' but no tools were given.", param=param)
    return choice


def _forced_tools(tools: list[dict[str, Any]], choice: Any) -> list[dict[str, Any]]:
    if isinstance(choice, dict):
        return [t for t in tools if t["function"]["name"] == choice["name"]]
    if choice == "required":
        return tools
    return []


def _tool_dict(fn: FunctionDef) -> dict[str, Any]:
    function: dict[str, Any] = {"name": fn.name}
    if fn.description is not None:
        function["description"] = fn.description
    function["parameters"] = (
        fn.parameters if fn.parameters is not None else {"type": "object", "properties": {}}
    )
    return {"type": "function", "function": function}


def template_messages(
    messages: list[ChatMessage], template: ChatTemplate | None = None
) -> list[dict[str, Any]]:
    """OpenAI messages as chat templates take them (HF conventions; arguments still JSON strings,
    checked here so a bad one is a 400 naming it; ``ChatTemplate.normalize_messages`` parses them
    when the template wants a mapping)."""
    out: list[dict[str, Any]] = []
    last_call_ids: dict[str, str] = {}
    for i, m in enumerate(messages):
        role = _ROLES.get(m.role, m.role)
        item: dict[str, Any] = {"role": role, "content": m.text() if m.content is not None else None}
        if role != "assistant" and item["content"] is None:
            item["content"] = ""
        calls = list(m.tool_calls or [])
        if m.function_call is not None:
            # The legacy single call gets an id the template accepts (Mistral wants 9 alphanumerics).
            legacy_id = template.new_call_id(random.Random(i)) if template is not None else f"call_{i}"
            calls.append(ToolCallIn(id=legacy_id, function=m.function_call))
        if calls:
            item["tool_calls"] = []
            for j, call in enumerate(calls):
                _check_arguments(call.function.arguments, f"messages[{i}].tool_calls[{j}].function.arguments")
                item["tool_calls"].append(
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.function.name, "arguments": call.function.arguments},
                    }
                )
                last_call_ids[call.function.name] = call.id
        if m.reasoning_content is not None and role == "assistant":
            item["reasoning_content"] = m.reasoning_content
        if m.role == "function":
            item["name"] = m.name
            item["tool_call_id"] = last_call_ids.get(m.name or "", f"call_{m.name}")
        elif role == "tool":
            item["tool_call_id"] = m.tool_call_id
            if m.name:
                item["name"] = m.name
        elif m.name:
            item["name"] = m.name
        out.append(item)
    return out


def _check_arguments(arguments: str, param: str) -> None:
    try:
        value = json.loads(arguments)
    except ValueError:
        raise InvalidRequest(
            "Tool call arguments must be a JSON object (as a string).", param=param
        ) from None
    if not isinstance(value, dict):
        raise InvalidRequest("Tool call arguments must be a JSON object (as a string).", param=param)
