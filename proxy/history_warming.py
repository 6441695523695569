"""Warm the next round of a tool loop while the client runs the tool.

A client that gets tool calls sends the whole conversation back with the calls and their results.
That next prompt starts with the template's rendering of this round's reply, which is not always
the tokens the model generated: a marker the model spelled byte by byte (``<tool_call>`` under a
grammar mask) tokenizes as one added token when re-rendered, and the reply's last token was
never fed to the model. So once a choice ends with tool calls, the rendered history up to where
the tool result will go is prefilled through the normal warmup path (shared batch, same tenant
and salt): blocks that match are found in the cache and cost nothing, the rest is computed now
instead of in the next request's time to first token.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from model_runner.records import WarmupResult
from proxy.chat_plan import ChatPlan, template_messages
from proxy.responses import AssistantMessage
from proxy.schemas import ChatCompletionRequest, ChatMessage, ToolCallIn
from proxy.worker import JobStream, start_warmup

log = logging.getLogger("kvproxy")

SENTINEL = "\u2063kvproxy-tool-result\u2063"
"""Stands in for the tool's result (which only the client will know); the prefix ends before it."""


def next_round_prefix(
    generation: Any, plan: ChatPlan, body: ChatCompletionRequest, message: AssistantMessage
) -> list[int] | None:
    """Token ids of the next request's prompt up to its first tool result (None: nothing to warm)."""
    calls = message.tool_calls or []
    if not calls:
        return None
    template = generation.engine.chat
    reply = ChatMessage(
        role="assistant",
        content=message.content,
        tool_calls=[
            ToolCallIn(id=c.id, function={"name": c.function.name, "arguments": c.function.arguments})  # type: ignore[arg-type]
            for c in calls
        ],
        reasoning_content=message.reasoning_content,
    )
    results = [
        ChatMessage(role="tool", tool_call_id=c.id, name=c.function.name, content=SENTINEL) for c in calls
    ]
    messages = template.normalize_messages(template_messages([*body.messages, reply, *results], template))
    text = template.render(messages, tools=plan.tools, add_generation_prompt=True, variables=plan.variables)
    cut = text.find(SENTINEL)
    if cut <= len(plan.prompt_text) // 2:
        return None  # the template does not render results after the call: nothing sensible to warm
    return template.tokenize(text[:cut])


class HistoryWarmer:
    """Warmups of tool loops' next rounds. ``start`` renders the prefix and queues its warmup
    before the response goes out (so the next request, which the client can only send after it,
    finds the blocks cached or being computed); nobody waits for the warmup itself, and a failure
    only costs the cache."""

    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled
        """``--no-history-warming`` turns it off."""
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(
        self,
        generation: Any,
        plan: ChatPlan,
        body: ChatCompletionRequest,
        message: AssistantMessage,
        tenant: str,
    ) -> None:
        engine = generation.engine
        if not self.enabled or not message.tool_calls or not engine.caching:
            return
        try:
            ids = await asyncio.to_thread(next_round_prefix, generation, plan, body, message)
            if not ids or len(ids) >= generation.max_context:
                return
            stream = start_warmup(engine, ids, tenant=tenant, cache_salt=body.cache_salt or "")
        except Exception:
            log.warning("warming the next round of a tool loop failed", exc_info=True)
            return
        task = asyncio.get_running_loop().create_task(_drain(stream))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def _drain(stream: JobStream[WarmupResult]) -> None:
    try:
        async for _ in stream:
            pass
    except Exception:
        log.warning("warming the next round of a tool loop failed", exc_info=True)
