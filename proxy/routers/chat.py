"""POST /v1/chat/completions."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from proxy.body import documented_body, json_body
from proxy.deps import GenerationDep, PrincipalDep, ServicesDep
from proxy.errors import ModelNotFound
from proxy.schemas import AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionRequest
from proxy.streaming import StreamMeta, stream_sse

router = APIRouter()
ROUTE = "/v1/chat/completions"

SSE_HEADERS: Mapping[str, str] = MappingProxyType({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def check_model(services: ServicesDep, model: str) -> None:
    if model != services.settings.model_name:
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
    prompt_ids = await generation.encode_chat(body.messages)
    request = generation.build_request(prompt_ids, body, tenant=principal.tenant)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        meta = StreamMeta(
            "chat", completion_id, created, body.model, body.include_usage, ROUTE, principal.tenant
        )
        stream = generation.start(request)
        return StreamingResponse(
            stream_sse(generation, stream, meta), media_type="text/event-stream", headers=dict(SSE_HEADERS)
        )
    outcome = await generation.run(
        request, route=ROUTE, tenant=principal.tenant, disconnected=http_request.is_disconnected
    )
    return ChatCompletion(
        id=completion_id,
        created=created,
        model=body.model,
        choices=[
            ChatChoice(message=AssistantMessage(content=outcome.text), finish_reason=outcome.finish_reason)
        ],
        usage=outcome.usage,
    )
