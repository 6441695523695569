"""The agent bench's script (pure): the families, the conversation, each request's body and
the tool results and messages the client sends back (see ``bench.agent_bench``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from tests.support.chat_templates import LLAMA3_TOOLS, MISTRAL_TOOLS, QWEN3_THINKING, QWEN_TOOLS

MODEL = "tiny"
BLOCK = 16
CONTEXT = 4096
USER_EVERY = 3
CALL_MAX_TOKENS = 200
ANSWER_MAX_TOKENS = 12


@dataclass(frozen=True)
class Family:
    name: str
    template: str
    model_kind: str
    """A ``tests.support.tiny_models.TINY_MODELS`` key."""
    echoes_reasoning: bool = False


FAMILIES = (
    Family("qwen", QWEN_TOOLS, "qwen2"),
    Family("llama3", LLAMA3_TOOLS, "llama"),
    Family("mistral", MISTRAL_TOOLS, "mistral"),
    Family("qwen3-thinking", QWEN3_THINKING, "qwen2", echoes_reasoning=True),
)

SYSTEM = "You are a travel agent. Use one tool at a time, then answer in one sentence."
USERS = (
    "Plan three days in Paris for me.",
    "Now compare it with Lima next week.",
    "Which one should I pick, and what do I pack?",
    "Book nothing yet; summarize the plan.",
)
TOOLS: tuple[dict[str, Any], ...] = (
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Forecast for a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "enum": ["Paris", "Lima", "Tokyo"]},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                },
                "required": ["city", "days"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search travel notes.",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string", "pattern": "^[a-z]{1,10}$"}},
                "required": ["query"],
                "additionalProperties": False,
            },
        },
    },
)


# -- the script (pure) ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One request: ``call`` forces ``tool``; ``answer`` asks for text (``tool_choice: none``) and
    is followed by the user message ``user``."""

    kind: Literal["call", "answer"]
    round: int
    tool: str | None = None
    user: str | None = None


def schedule(rounds: int, user_every: int = USER_EVERY) -> tuple[Step, ...]:
    """``rounds`` forced calls alternating between the tools; before every ``user_every``-th round
    (the 3rd, 6th...) an answer and a new user message."""
    if rounds < 1 or user_every < 1:
        raise ValueError(f"rounds and user_every must be positive, got {rounds}, {user_every}")
    steps: list[Step] = []
    for r in range(rounds):
        if r % user_every == user_every - 1:
            user = USERS[(r // user_every + 1) % len(USERS)]
            steps.append(Step("answer", r, user=user))
        steps.append(Step("call", r, tool=TOOLS[r % len(TOOLS)]["function"]["name"]))
    return tuple(steps)


def tool_result(name: str, arguments: str, round_index: int) -> str:
    """The tool's deterministic short JSON answer."""
    args = json.loads(arguments)
    if name == "get_weather":
        sky = ("sunny", "cloudy", "rain")[round_index % 3]
        return json.dumps({"city": args.get("city"), "sky": sky, "high_c": 15 + round_index})
    return json.dumps({"query": args.get("query"), "hits": [f"note{round_index}a", f"note{round_index}b"]})


def reasoning_for(step: Step) -> str:
    """What the qwen3-thinking client echoes as the turn's thinking."""
    if step.kind == "call":
        return f"Round {step.round}: I still need facts, so I call {step.tool}."
    return "I have enough to answer briefly."


def request_body(messages: list[dict[str, Any]], step: Step) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": messages,
        "tools": list(TOOLS),
        "temperature": 1.0,
        "seed": 1000 + step.round,
        "logprobs": True,
    }
    if step.kind == "call":
        body["tool_choice"] = {"type": "function", "function": {"name": step.tool}}
        body["max_tokens"] = CALL_MAX_TOKENS
    else:
        body["tool_choice"] = "none"
        body["max_tokens"] = ANSWER_MAX_TOKENS
    return body


def client_reply(reply: dict[str, Any], step: Step, family: Family) -> dict[str, Any]:
    """The assistant message the client sends back: as returned (plus its own thinking)."""
    message = dict(reply)
    if family.echoes_reasoning:
        message["reasoning_content"] = reasoning_for(step)
    return message
