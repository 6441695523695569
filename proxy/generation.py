"""From a validated OpenAI request to engine work on the model thread, and back to figures.

Tokenizing runs in a helper thread (it can take a while for a long prompt, and the event loop
must keep answering /health); generation runs in the engine's batch. Every finished request is
counted here, in the metrics and the request log, whichever route it came from.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from model_runner.detokenize import TokenPieces
from model_runner.engine import Engine
from model_runner.grammar import GrammarCompiler
from model_runner.model_facts import sampling_defaults
from model_runner.records import (
    Constraint,
    Finished,
    FinishReason,
    GenerationRequest,
    InvalidTokens,
    PinRequest,
    TextDelta,
    UsageReport,
)
from model_runner.records import ContextLengthExceeded as EngineContextLengthExceeded
from model_runner.response_parsing import parser_spec_for
from model_runner.sampling import SamplingParams, TokenLogprob
from proxy.anthropic.plan import MessagesPlan, MessagesPlanner
from proxy.anthropic.schemas import CountTokensRequest, MessagesRequest
from proxy.batch_stats import BatchMonitor
from proxy.chat_output import ChoiceOutput
from proxy.chat_plan import ChatPlan, ChatPlanner, template_messages
from proxy.errors import ContextLengthExceeded, InvalidRequest, ServiceUnavailable
from proxy.history_warming import HistoryWarmer
from proxy.logprobs import LogprobFormatter
from proxy.metrics import Metrics
from proxy.request_log import RequestLog, RequestRecord, classify
from proxy.responses import KvproxyUsage, PromptTokensDetails, Usage
from proxy.schemas import ChatCompletionRequest, SamplingRequest, WarmupItem
from proxy.worker import EngineClosed, JobStream, QueueFull, open_stream

_DISCONNECT_POLL_S = 0.25

RETENTION_TTL_S: Mapping[str, float] = MappingProxyType({"in_memory": 600.0, "24h": 86400.0})
"""OpenAI's ``prompt_cache_retention`` values as pin TTLs."""


@dataclass
class ChoiceResult:
    """One choice of a finished generation."""

    index: int
    text: str = ""
    finish_reason: FinishReason = "stop"
    logprobs: list[TokenLogprob] = field(default_factory=list)
    stop_sequence: str | None = None


@dataclass(frozen=True)
class Outcome:
    """A finished generation: every choice (by index), the request's usage, and the engine's
    report it came from."""

    choices: list[ChoiceResult]
    usage: Usage
    report: UsageReport


def merge_finished(finishes: Sequence[Finished]) -> Finished:
    """One request's figures from its choices' ``Finished`` events: the prompt side once (every
    choice reports the same), the completion tokens of all choices."""
    first = min(finishes, key=lambda f: f.index)
    completion = sum(f.usage.completion_tokens for f in finishes)
    return dataclasses.replace(first, usage=dataclasses.replace(first.usage, completion_tokens=completion))


def usage_from(finished: Finished) -> Usage:
    report = finished.usage
    return Usage(
        prompt_tokens=report.prompt_tokens,
        completion_tokens=report.completion_tokens,
        total_tokens=report.prompt_tokens + report.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=report.cached_tokens),
        kvproxy=KvproxyUsage(
            cached_by_tier=dict(report.cached_by_tier),
            ttft_ms=round(report.ttft_s * 1000, 3) if report.ttft_s is not None else None,
            miss_reason=report.miss_reason,
            miss_block=report.miss_block,
            prefilled_tokens=report.prefilled_tokens,
            lookup_ms=round(report.lookup_s * 1000, 3),
            queue_ms=round(report.queue_s * 1000, 3),
            prefill_steps=report.prefill_steps,
            restore_ms=round(report.restore_s * 1000, 3),
            prefill_ms=round(report.prefill_s * 1000, 3),
        ),
    )


def overloaded(exc: QueueFull | EngineClosed) -> ServiceUnavailable:
    if isinstance(exc, QueueFull):
        return ServiceUnavailable(
            "The server is busy: too many requests are waiting. Retry shortly.",
            code="queue_full",
            retry_after_s=1,
        )
    return ServiceUnavailable("The server is shutting down.", code="shutting_down", retry_after_s=5)


class GenerationService:
    def __init__(
        self,
        engine: Engine,
        batch: BatchMonitor,
        metrics: Metrics,
        requests: RequestLog,
        *,
        max_context: int,
        default_max_tokens: int,
        block_size: int,
        history_warming: bool = True,
        keep_billing_header: bool = False,
    ) -> None:
        self.engine = engine
        self._batch = batch
        self._metrics = metrics
        self._requests = requests
        self.max_context = max_context
        self._default_max_tokens = default_max_tokens
        self._block_size = block_size
        tokenizer = engine.loaded.tokenizer
        self.planner = ChatPlanner(
            engine.chat,
            GrammarCompiler(tokenizer, engine.vocab_size, engine.eos_ids),
            parser_spec_for(tokenizer),
        )
        self.messages = MessagesPlanner(
            self.planner,
            keep_billing_header=keep_billing_header,
            sampling_defaults=sampling_defaults(engine.loaded),
        )
        """The Anthropic Messages API's conversations and cache breakpoints."""
        self.logprobs = LogprobFormatter(TokenPieces(tokenizer))
        self.history = HistoryWarmer(enabled=history_warming)
        """Prefills a tool loop's next round while the client runs the tool."""

    async def plan_chat(self, body: ChatCompletionRequest) -> ChatPlan:
        """Render the prompt (tools included) and build its constraint, off the event loop."""
        return await asyncio.to_thread(self.planner.plan, body)

    async def plan_messages(self, body: MessagesRequest) -> MessagesPlan:
        """The same for an Anthropic request, with its breakpoints placed."""
        return await asyncio.to_thread(self.messages.plan, body)

    async def count_message_tokens(self, body: CountTokensRequest) -> int:
        return await asyncio.to_thread(self.messages.count, body)

    def chat_outputs(self, plan: ChatPlan, body: ChatCompletionRequest) -> list[ChoiceOutput]:
        """One output assembler per choice (parser state, logprobs)."""
        formatter = self.logprobs if body.logprobs else None
        rng = random.Random(body.seed) if body.seed is not None else random.Random()
        return [ChoiceOutput(i, plan, self.planner.parser(plan, rng), formatter) for i in range(body.n)]

    async def encode_chat(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """Render template messages (``proxy.chat_plan.template_messages``) without tools."""
        return await asyncio.to_thread(self.engine.encode_chat, list(messages))

    async def encode_prompt(self, text: str) -> list[int]:
        return await asyncio.to_thread(self.engine.encode_prompt, text)

    async def encode_item(self, item: WarmupItem, param: str) -> list[int]:
        """A warmup or pin item's token ids (its prompt, or its messages rendered by the chat
        template); a 400 naming ``param`` when it does not fit the context."""
        if item.messages is not None:
            ids = await self.encode_chat(template_messages(item.messages, self.engine.chat))
        else:
            ids = await self.encode_prompt(item.prompt or "")
        if len(ids) >= self.max_context:
            raise InvalidRequest(
                f"{param} is longer than the model's context ({self.max_context} tokens).",
                param=param,
                code="context_length_exceeded",
            )
        return ids

    def build_request(
        self,
        prompt_ids: list[int],
        body: SamplingRequest,
        *,
        tenant: str,
        constraint: Constraint | None = None,
        keep_special_tokens: bool = False,
        pins: tuple[PinRequest, ...] = (),
    ) -> GenerationRequest:
        """Check the context budget and turn the body into an engine request. ``pins``: the
        prefixes to pin (cache breakpoints); ``prompt_cache_retention`` adds one of the whole
        prompt."""
        n_prompt = len(prompt_ids)
        requested = body.requested_max_tokens()
        param = "max_tokens"
        if requested is None:
            # No explicit budget: the default, shortened to what the context leaves.
            max_tokens = min(self._default_max_tokens, self.max_context - n_prompt)
            param = "messages" if hasattr(body, "messages") else "prompt"
        else:
            max_tokens = requested
            if getattr(body, "max_completion_tokens", None) == requested and body.max_tokens != requested:
                param = "max_completion_tokens"
        if n_prompt >= self.max_context or max_tokens < 1 or n_prompt + max_tokens > self.max_context:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.max_context} tokens. However, you "
                f"requested {n_prompt + max(max_tokens, 1)} tokens ({n_prompt} in the prompt, "
                f"{max(max_tokens, 1)} for the completion). Shorten the prompt or lower max_tokens.",
                param=param,
            )
        logprobs, top_logprobs = body.logprobs_wanted()
        sampling = SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            seed=body.seed,
            stop=body.stop_sequences(),
            frequency_penalty=body.frequency_penalty,
            presence_penalty=body.presence_penalty,
            logit_bias=body.logit_bias_pairs(),
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            skip_special_tokens=not keep_special_tokens,
        )
        if body.prompt_cache_retention is not None:
            ttl_s = RETENTION_TTL_S[body.prompt_cache_retention]
            pins = (*pins, PinRequest(n_prompt, ttl_s, "prompt_cache_retention"))
        return GenerationRequest(
            prompt_ids=prompt_ids,
            sampling=sampling,
            tenant=tenant,
            cache_salt=body.cache_salt or "",
            n=body.n,
            constraint=constraint,
            pins=pins,
        )

    def batch_figures(self) -> dict[str, Any]:
        """What the batch is doing (for /v1/cache/stats and the dashboard)."""
        return self._batch.figures(self.engine)

    def start(self, request: GenerationRequest) -> JobStream[TextDelta | Finished]:
        """Submit the generation; raises 503 at once when the queue is full. The caller must
        ``cancel()`` the stream when it stops reading early (the request leaves the batch)."""
        try:
            return open_stream(self.engine, request)
        except (QueueFull, EngineClosed) as exc:
            raise overloaded(exc) from None
        except EngineContextLengthExceeded as exc:
            raise ContextLengthExceeded(str(exc), param="max_tokens") from None
        except InvalidTokens as exc:
            raise InvalidRequest(str(exc), param="logit_bias") from None

    async def run(
        self,
        request: GenerationRequest,
        *,
        route: str,
        tenant: str,
        disconnected: Callable[[], Awaitable[bool]] | None = None,
        cache_key: str | None = None,
    ) -> Outcome:
        """Generate every choice to its end and collect the text. ``disconnected``
        (``Request.is_disconnected``) is polled meanwhile: nobody will read a long answer whose
        client has gone."""
        choices = [ChoiceResult(i) for i in range(request.n)]
        parts: list[list[str]] = [[] for _ in range(request.n)]
        finishes: list[Finished] = []
        stream = self.start(request)
        watcher = asyncio.create_task(_cancel_on_disconnect(stream, disconnected)) if disconnected else None
        try:
            async for event in stream:
                if isinstance(event, TextDelta):
                    parts[event.index].append(event.text)
                    choices[event.index].logprobs.extend(event.logprobs)
                elif isinstance(event, Finished):
                    finishes.append(event)
                    choices[event.index].finish_reason = event.finish_reason
                    choices[event.index].stop_sequence = event.stop_sequence
                    if len(finishes) < request.n:
                        continue
                    for choice, texts in zip(choices, parts, strict=True):
                        choice.text = "".join(texts)
                    usage = self.record(finishes, route=route, tenant=tenant, cache_key=cache_key)
                    return Outcome(choices, usage, merge_finished(finishes).usage)
        except EngineClosed as exc:
            raise overloaded(exc) from None
        finally:
            stream.cancel()
            if watcher is not None:
                watcher.cancel()
        raise ServiceUnavailable("Generation stopped before it finished.", code="generation_aborted")

    def record(
        self, finishes: Sequence[Finished], *, route: str, tenant: str, cache_key: str | None = None
    ) -> Usage:
        """Count a finished generation (all its choices) in the metrics and the request log;
        returns its usage."""
        finished = merge_finished(finishes)
        report = finished.usage
        cache = classify(report.prompt_tokens, report.cached_tokens, self._block_size, report.miss_reason)
        self._metrics.observe_generation(
            prompt_tokens=report.prompt_tokens,
            cached_by_tier=report.cached_by_tier,
            cache=cache,
            ttft_s=report.ttft_s,
        )
        self._requests.add(
            RequestRecord(
                at=time.time(),
                route=route,
                tenant=tenant,
                prompt_tokens=report.prompt_tokens,
                cached_tokens=report.cached_tokens,
                completion_tokens=report.completion_tokens,
                cached_by_tier=dict(report.cached_by_tier),
                cache=cache,
                miss_reason=report.miss_reason,
                miss_block=report.miss_block,
                ttft_ms=round(report.ttft_s * 1000, 3) if report.ttft_s is not None else None,
                finish_reason=finished.finish_reason,
                cache_key=cache_key,
            )
        )
        return usage_from(finished)


async def _cancel_on_disconnect(
    stream: JobStream[TextDelta | Finished], disconnected: Callable[[], Awaitable[bool]]
) -> None:
    while not stream.cancelled:
        if await disconnected():
            stream.cancel()
            return
        await asyncio.sleep(_DISCONNECT_POLL_S)
