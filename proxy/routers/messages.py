"""POST /v1/messages and /v1/messages/count_tokens: the Anthropic Messages API.

The SDK's beta client appends ``?beta=true``; query parameters change nothing here. Errors on
these routes come out in Anthropic's shape (``proxy.errors``).
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from model_runner.records import TextDelta
from proxy.anthropic.responses import (
    ContentOut,
    CountTokens,
    Message,
    TextContent,
    ThinkingContent,
    ToolUseContent,
    message_usage,
    stop_reason,
    tool_input,
)
from proxy.anthropic.schemas import CountTokensRequest, MessagesRequest
from proxy.anthropic.streaming import MessageMeta, message_sse
from proxy.body import documented_body, json_body
from proxy.deps import GenerationDep, PrincipalDep, ServicesDep
from proxy.routers.chat import SSE_HEADERS, check_model

router = APIRouter()
ROUTE = "/v1/messages"


@router.post(ROUTE, response_model=None, openapi_extra=documented_body(MessagesRequest))
async def create_message(
    http_request: Request,
    principal: PrincipalDep,
    services: ServicesDep,
    body: Annotated[MessagesRequest, Depends(json_body(MessagesRequest))],
    generation: GenerationDep,
) -> Message | StreamingResponse:
    check_model(services, body.model)
    plan = await generation.plan_messages(body)
    chat = plan.chat
    request = generation.build_request(
        chat.prompt_ids,
        plan.body,
        tenant=principal.tenant,
        constraint=chat.constraint,
        keep_special_tokens=chat.parse_tools,
        pins=plan.pins(),
    )
    output = generation.chat_outputs(chat, plan.body)[0]
    meta = MessageMeta(
        id=f"msg_{uuid.uuid4().hex[:24]}",
        model=body.model,
        route=ROUTE,
        tenant=principal.tenant,
        block_size=services.settings.block_size,
    )
    if body.stream:
        stream = generation.start(request)

        async def warm_next_round() -> None:
            if output.finish_reason == "tool_calls":
                await generation.history.start(
                    generation, chat, plan.body, output.message(), principal.tenant
                )

        return StreamingResponse(
            message_sse(generation, stream, meta, plan, output, on_done=warm_next_round),
            media_type="text/event-stream",
            headers=dict(SSE_HEADERS),
        )
    outcome = await generation.run(
        request, route=ROUTE, tenant=principal.tenant, disconnected=http_request.is_disconnected
    )
    result = outcome.choices[0]
    output.feed(TextDelta(result.text, (), (), index=0))
    output.finish(result.finish_reason)
    message = output.message()
    if output.finish_reason == "tool_calls":
        await generation.history.start(generation, chat, plan.body, message, principal.tenant)
    content: list[ContentOut] = []
    if message.reasoning_content:
        content.append(ThinkingContent(thinking=message.reasoning_content))
    if message.content:
        content.append(TextContent(text=message.content))
    for call in message.tool_calls or []:
        content.append(
            ToolUseContent(id=call.id, name=call.function.name, input=tool_input(call.function.arguments))
        )
    reason = stop_reason(output.finish_reason, result.stop_sequence)
    return Message(
        id=meta.id,
        content=content,
        model=body.model,
        stop_reason=reason,
        stop_sequence=result.stop_sequence if reason == "stop_sequence" else None,
        usage=message_usage(outcome.report, plan, meta.block_size, outcome.usage.kvproxy),
    )


@router.post(ROUTE + "/count_tokens", openapi_extra=documented_body(CountTokensRequest))
async def count_tokens(
    _: PrincipalDep,
    services: ServicesDep,
    body: Annotated[CountTokensRequest, Depends(json_body(CountTokensRequest))],
    generation: GenerationDep,
) -> CountTokens:
    check_model(services, body.model)
    return CountTokens(input_tokens=await generation.count_message_tokens(body))
