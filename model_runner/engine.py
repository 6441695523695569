"""The engine: one request from token ids to a stream of text, restoring the cached prefix.

Request path (DESIGN.md): namespace -> block hashes -> ``PrefixCache.lookup`` -> restore the
verified blocks into a ``DynamicCache`` (cropped so at least one prompt token is prefilled) ->
prefill only the suffix, logits for the last position only -> decode token by token -> store the
new full blocks (prompt right after prefill, generated ones at the end). The matched blocks stay
pinned until the request ends, whatever way it ends.

Synchronous and single-threaded: the proxy runs it on one worker thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
from transformers import DynamicCache

from cache_store.hashing import block_hashes, namespace_hash
from cache_store.prefix_cache import PrefixCache, PrefixHit
from model_runner import kv
from model_runner.detokenize import IncrementalDetokenizer, StopMatcher
from model_runner.loading import LoadedModel
from model_runner.records import (
    ContextLengthExceeded,
    Finished,
    FinishReason,
    GenerationRequest,
    InvalidTokens,
    TextDelta,
    UsageReport,
    WarmupResult,
)
from model_runner.sampling import make_generator, sample_next

log = logging.getLogger(__name__)

FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)
"""For tokenizers that ship no chat template (base models)."""


class Engine:
    """Serves one loaded model, with prefix caching when ``cache`` is given and the model allows it."""

    def __init__(self, loaded: LoadedModel, cache: PrefixCache | None, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if cache is not None and cache.block_size != block_size:
            raise ValueError(f"block_size {block_size} differs from the cache's {cache.block_size}")
        self.loaded = loaded
        self.block_size = block_size
        self._model = loaded.model
        self._tokenizer = loaded.tokenizer
        self._device = loaded.device
        self._cache = cache if loaded.cacheable else None
        if cache is not None and not loaded.cacheable:
            log.warning("serving %s without prefix caching: %s", loaded.model_id, loaded.cache_reason)
        self._eos = _eos_ids(loaded)
        self._vocab_size = int(self._model.get_input_embeddings().num_embeddings)
        self._cache_kw = kv.cache_argument(self._model)
        self._layer_shapes = self._probe_layer_shapes() if self._cache is not None else None

    # -- what the proxy reads ----------------------------------------------------------------

    @property
    def model_id(self) -> str:
        return self.loaded.model_id

    @property
    def fingerprint(self) -> str:
        return self.loaded.fingerprint

    @property
    def max_context(self) -> int:
        return self.loaded.max_context

    @property
    def cacheable(self) -> bool:
        """Whether the model can be prefix-cached at all (see ``LoadedModel.cache_reason``)."""
        return self.loaded.cacheable

    @property
    def caching(self) -> bool:
        """Whether requests actually go through the prefix cache (cacheable and a cache given)."""
        return self._cache is not None

    @property
    def prefix_cache(self) -> PrefixCache | None:
        return self._cache

    # -- tokenization --------------------------------------------------------------------------

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Render ``messages`` with the chat template (plus the assistant turn opener), tokenize."""
        template = getattr(self._tokenizer, "chat_template", None) or FALLBACK_CHAT_TEMPLATE
        text = self._tokenizer.apply_chat_template(
            list(messages), chat_template=template, add_generation_prompt=True, tokenize=False
        )
        # The rendered template already holds its special tokens (BOS included where it wants one).
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_prompt(self, text: str) -> list[int]:
        """Tokenize a plain completion prompt (with the tokenizer's BOS when it adds one)."""
        return list(self._tokenizer(text)["input_ids"])

    # -- generation ----------------------------------------------------------------------------

    def generate(
        self, request: GenerationRequest, cancel: threading.Event | None = None
    ) -> Iterator[TextDelta | Finished]:
        """Stream ``TextDelta``s and, last, one ``Finished``. Raises ``ContextLengthExceeded`` at
        once (before any work) when prompt + ``max_tokens`` exceeds ``max_context``."""
        self._check_prompt(request.prompt_ids, request.sampling.max_tokens)
        return self._generate(request, cancel)

    def _check_prompt(self, prompt_ids: Sequence[int], max_tokens: int) -> None:
        if len(prompt_ids) + max_tokens > self.max_context:
            raise ContextLengthExceeded(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) "
                f"exceeds the context of {self.max_context} tokens"
            )
        if prompt_ids and (min(prompt_ids) < 0 or max(prompt_ids) >= self._vocab_size):
            raise InvalidTokens(f"prompt token ids must be in [0, {self._vocab_size})")

    def _generate(
        self, request: GenerationRequest, cancel: threading.Event | None
    ) -> Iterator[TextDelta | Finished]:
        started = time.perf_counter()
        prompt = list(request.prompt_ids)
        params = request.sampling
        namespace, hit = self._lookup(prompt, request.tenant, request.cache_salt)
        looked_up = time.perf_counter()
        try:
            cached = self._cached_tokens(hit, len(prompt))
            past = self._restore(hit, cached)
            phases = _Phases(started, looked_up, time.perf_counter())
            if cancel is not None and cancel.is_set():
                usage = self._usage(prompt, [], cached, hit, phases, None)
                if hit is not None:
                    hit.release()
                yield Finished("cancelled", usage)
                return
            logits = self._forward(prompt[cached:], past, cached)  # [vocab]
            # The prompt's new blocks are stored right after the first delta went out, so the
            # store never delays the first token; the generated ones at the end.
            stored_blocks = len(hit.blocks) if hit is not None else 0

            generator = make_generator(params.seed, self._device)
            detok = IncrementalDetokenizer(self._tokenizer, prompt)
            stopper = StopMatcher(params.stop)
            generated: list[int] = []
            unsent: list[int] = []
            first_token_at: float | None = None
            finish: FinishReason
            while True:
                token = sample_next(logits, params, generator)
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                generated.append(token)
                if token in self._eos:
                    finish = "stop"
                    break
                unsent.append(token)
                text = stopper.push(detok.push(token))
                if stopper.stopped:
                    finish = "stop"
                    break
                if text:
                    yield TextDelta(text, tuple(unsent))
                    unsent = []
                    if stored_blocks < len(prompt) // self.block_size:
                        stored_blocks += self._store_prompt_blocks(namespace, prompt, past, stored_blocks)
                if len(generated) >= params.max_tokens:
                    finish = "length"
                    break
                if cancel is not None and cancel.is_set():
                    finish = "cancelled"
                    break
                logits = self._forward([token], past, len(prompt) + len(generated) - 1)

            tail = text if stopper.stopped else stopper.push(detok.flush()) + stopper.flush()
            if tail or unsent:
                yield TextDelta(tail, tuple(unsent))
            # Only tokens whose K/V are in `past` (the last sampled token was never fed).
            fed = past.get_seq_length()
            all_ids = prompt + generated
            self._store_new_blocks(namespace, all_ids[:fed], past, first_block=stored_blocks)
            usage = self._usage(prompt, generated, cached, hit, phases, first_token_at)
            if hit is not None:
                hit.release()  # before the last yield: a consumer may stop reading at Finished
            yield Finished(finish, usage)
        finally:
            if hit is not None:
                hit.release()

    def warmup(
        self, prompt_ids: Sequence[int], *, tenant: str = "default", cache_salt: str = ""
    ) -> WarmupResult:
        """Prefill ``prompt_ids`` and store its full blocks (no decoding). With caching off it
        does nothing. Lower tiers are written in the background: drain the store to wait."""
        prompt = [int(t) for t in prompt_ids]
        self._check_prompt(prompt, 0)
        if self._cache is None:
            return WarmupResult(len(prompt), 0, 0, 0, "cache_disabled")
        n_full = len(prompt) // self.block_size
        namespace, hit = self._lookup(prompt, tenant, cache_salt)
        if hit is None:
            raise RuntimeError("lookup returned no hit with caching on")
        try:
            cached = len(hit.blocks) * self.block_size
            if len(hit.blocks) >= n_full:
                return WarmupResult(len(prompt), cached, 0, 0, hit.miss_reason)
            past = self._restore(hit, cached)
            end = n_full * self.block_size
            self._forward(prompt[cached:end], past, cached)
            stored = self._store_new_blocks(namespace, prompt[:end], past, first_block=len(hit.blocks))
            return WarmupResult(len(prompt), cached, end - cached, stored, hit.miss_reason)
        finally:
            hit.release()

    # -- steps ---------------------------------------------------------------------------------

    def _lookup(self, prompt: list[int], tenant: str, cache_salt: str) -> tuple[bytes, PrefixHit | None]:
        if self._cache is None:
            return b"", None
        namespace = namespace_hash(
            model_fingerprint=self.fingerprint,
            block_size=self.block_size,
            tenant=tenant,
            cache_salt=cache_salt,
        )
        hit = self._cache.lookup(namespace, prompt, dtype=self.loaded.dtype, layer_shapes=self._layer_shapes)
        return namespace, hit

    def _cached_tokens(self, hit: PrefixHit | None, prompt_tokens: int) -> int:
        """At least one prompt token is always prefilled: its logits pick the first token."""
        if hit is None:
            return 0
        return min(len(hit.blocks) * self.block_size, prompt_tokens - 1)

    def _restore(self, hit: PrefixHit | None, cached: int) -> DynamicCache:
        if hit is None or cached == 0:
            return DynamicCache(config=self._model.config)
        with torch.inference_mode():
            return kv.build_cache(self._model.config, hit.blocks, cached, self._device)

    @torch.inference_mode()
    def _forward(self, ids: list[int], past: DynamicCache, start: int) -> torch.Tensor:
        """Run ``ids`` (at positions ``start..``) through the model on top of ``past``; logits of
        the last position only. ``input_ids``/``position_ids``: [1, len(ids)]."""
        input_ids = torch.tensor([ids], dtype=torch.long, device=self._device)
        position_ids = torch.arange(start, start + len(ids), device=self._device).unsqueeze(0)
        out = self._model(
            input_ids=input_ids,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kw: past},
        )
        return out.logits[0, -1]  # [vocab]

    def _store_prompt_blocks(
        self, namespace: bytes, prompt: list[int], past: DynamicCache, first: int
    ) -> int:
        """Store the prompt's full blocks from ``first`` on; returns how many blocks that covers
        (stored or already present), so the caller does not try them again."""
        self._store_new_blocks(namespace, prompt, past, first_block=first)
        return len(prompt) // self.block_size - first

    def _store_new_blocks(
        self, namespace: bytes, ids: list[int], past: DynamicCache, first_block: int
    ) -> int:
        """Store full blocks ``first_block..`` of ``ids`` from ``past``; a failure costs only the
        cache entry, never the response."""
        if self._cache is None:
            return 0
        hashes = block_hashes(ids, self.block_size, namespace)
        # Only blocks every layer still holds: a sliding layer keeps its last window - 1 tokens.
        # Within a context the window covers that is everything, but a stale block must never
        # be sliced from the wrong positions should that change.
        oldest, _ = kv.storable_range(past)
        first_block = max(first_block, -(-oldest // self.block_size))
        if len(hashes) <= first_block:
            return 0
        try:
            with torch.inference_mode():
                blocks = kv.slice_blocks(past, first_block, len(hashes) - first_block, self.block_size)
            return self._cache.store_blocks(namespace, ids, hashes, first_block, blocks)
        except Exception:  # the response is still correct without these blocks
            log.exception("storing blocks %d..%d failed", first_block, len(hashes) - 1)
            return 0

    def _usage(
        self,
        prompt: list[int],
        generated: list[int],
        cached: int,
        hit: PrefixHit | None,
        phases: _Phases,
        first_token_at: float | None,
    ) -> UsageReport:
        now = time.perf_counter()
        by_tier: dict[str, int] = {}
        if hit is not None:
            for i, tier in enumerate(hit.tiers):
                tokens = min(self.block_size, cached - i * self.block_size)
                if tokens > 0:
                    by_tier[tier] = by_tier.get(tier, 0) + tokens
        ttft_end = first_token_at if first_token_at is not None else now
        return UsageReport(
            prompt_tokens=len(prompt),
            completion_tokens=len(generated),
            cached_tokens=cached,
            cached_by_tier=by_tier,
            prefilled_tokens=len(prompt) - cached if first_token_at is not None else 0,
            ttft_s=ttft_end - phases.started,
            lookup_s=phases.looked_up - phases.started,
            restore_s=phases.restored - phases.looked_up,
            prefill_s=max(ttft_end - phases.restored, 0.0),
            decode_s=now - ttft_end,
            miss_reason=hit.miss_reason if hit is not None else "cache_disabled",
            miss_block=hit.miss_block if hit is not None else None,
        )

    @torch.inference_mode()
    def _probe_layer_shapes(self) -> list[kv.LayerShape]:
        """Per-layer block K/V shapes, read off a one-token forward (robust to any config naming)."""
        past = DynamicCache(config=self._model.config)
        self._forward([next(iter(self._eos), 0)], past, 0)
        return kv.layer_shapes(past, self.block_size)


class _Phases(NamedTuple):
    """``perf_counter`` marks of a request's way to its first token."""

    started: float
    looked_up: float
    restored: float


def _eos_ids(loaded: LoadedModel) -> frozenset[int]:
    ids: set[int] = set()
    candidates: list[Any] = [
        getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None),
        getattr(loaded.tokenizer, "eos_token_id", None),
    ]
    for value in candidates:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)
