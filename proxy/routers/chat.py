"""POST /v1/chat/completions."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from model_runner.records import TextDelta
from proxy.body import documented_body, json_body
from proxy.deps import GenerationDep, PrincipalDep, ServicesDep
from proxy.errors import ModelNotFound
from proxy.responses import ChatChoice, ChatCompletion
from proxy.schemas import ChatCompletionRequest
from proxy.streaming import ChatEncoder, StreamMeta, stream_sse

router = APIRouter()
ROUTE = "/v1/chat/completions"

SSE_HEADERS: Mapping[str, str] = MappingProxyType({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def check_model(services: ServicesDep, model: str) -> None:
    if model not in services.settings.served_model_names:
        raise ModelNotFound(f"The model '{model[:200]}' does not exist on this server.", param="model")


@router.post(ROUTE, response_model=None, openapi_extra=documented_body(ChatCompletionRequest))
async def chat_completions(
    http_request: Request,
    principal: PrincipalDep,
    services: ServicesDep,
    body: Annotated[ChatCompletionRequest, Depends(json_body(ChatCompletionRequest))],
    generation: GenerationDep,
) -> ChatCompletion | StreamingResponse:
    check_model(services, body.model)
    plan = await generation.plan_chat(body)
    request = generation.build_request(
        plan.prompt_ids,
        body,
        tenant=principal.tenant,
        constraint=plan.constraint,
        keep_special_tokens=plan.parse_tools,
    )
    outputs = generation.chat_outputs(plan, body)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        meta = StreamMeta(
            completion_id,
            created,
            body.model,
            body.include_usage,
            ROUTE,
            principal.tenant,
            body.n,
            body.prompt_cache_key,
        )
        stream = generation.start(request)

        async def warm_next_round() -> None:
            if outputs[0].finish_reason == "tool_calls":
                await generation.history.start(generation, plan, body, outputs[0].message(), principal.tenant)

        return StreamingResponse(
            stream_sse(generation, stream, meta, ChatEncoder(meta, outputs), on_done=warm_next_round),
            media_type="text/event-stream",
            headers=dict(SSE_HEADERS),
        )
    outcome = await generation.run(
        request,
        route=ROUTE,
        tenant=principal.tenant,
        disconnected=http_request.is_disconnected,
        cache_key=body.prompt_cache_key,
    )
    choices = []
    for result, output in zip(outcome.choices, outputs, strict=True):
        output.feed(TextDelta(result.text, (), tuple(result.logprobs), index=result.index))
        output.finish(result.finish_reason)
        choices.append(
            ChatChoice(
                index=result.index,
                message=output.message(),
                finish_reason=output.finish_reason,
                logprobs=output.logprobs(),
            )
        )
    if choices[0].finish_reason == "tool_calls":
        await generation.history.start(generation, plan, body, choices[0].message, principal.tenant)
    return ChatCompletion(
        id=completion_id, created=created, model=body.model, choices=choices, usage=outcome.usage
    )
