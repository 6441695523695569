"""POST /v1/completions."""

from __future__ import annotations

import time
import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from proxy.body import documented_body, json_body
from proxy.deps import GenerationDep, PrincipalDep, ServicesDep
from proxy.responses import Completion, CompletionChoice
from proxy.routers.chat import SSE_HEADERS, check_model
from proxy.schemas import CompletionRequest
from proxy.streaming import CompletionEncoder, StreamMeta, stream_sse

router = APIRouter()
ROUTE = "/v1/completions"


@router.post(ROUTE, response_model=None, openapi_extra=documented_body(CompletionRequest))
async def completions(
    http_request: Request,
    principal: PrincipalDep,
    services: ServicesDep,
    body: Annotated[CompletionRequest, Depends(json_body(CompletionRequest))],
    generation: GenerationDep,
) -> Completion | StreamingResponse:
    check_model(services, body.model)
    prompt_ids = await generation.encode_prompt(body.prompt_text())
    request = generation.build_request(prompt_ids, body, tenant=principal.tenant)
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    logprobs, top = body.logprobs_wanted()
    formatter = generation.logprobs if logprobs else None
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
        return StreamingResponse(
            stream_sse(generation, stream, meta, CompletionEncoder(meta, formatter, top > 0)),
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
    choices = [
        CompletionChoice(
            index=c.index,
            text=c.text,
            finish_reason=c.finish_reason,
            logprobs=formatter.completion(c.logprobs, 0, top > 0) if formatter is not None else None,
        )
        for c in outcome.choices
    ]
    return Completion(
        id=completion_id, created=created, model=body.model, choices=choices, usage=outcome.usage
    )
