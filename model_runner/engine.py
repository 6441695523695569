"""The engine: the step loop that serves every request of one loaded model.

Request path (DESIGN.md): ``submit`` checks the request and starts its prefix lookup on a lookup
thread (hashing, tier reads and record checks never run on the step loop, so a stalled Redis
delays only that request's admission). The step loop then repeats: schedule (``scheduler``:
decodes, prefill chunks, FIFO admissions within the token, batch and K/V budgets) -> restore the
admitted requests' verified blocks into their own K/V -> one forward over the packed step
(``forward``) -> sample per request and hand out text (``sequence``) -> store the prompt blocks
each finished chunk completed -> finish the requests that are done. A request's matched blocks
stay pinned until it ends, whatever way it ends; a failure in one request fails that request only.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from cache_store.codec import StateSpec
from cache_store.hashing import block_hashes, namespace_hash
from cache_store.prefix_cache import PrefixCache, PrefixHit
from model_runner import recurrent
from model_runner.batch import Run
from model_runner.capability import packed_reason
from model_runner.chat_template import ChatTemplate
from model_runner.engine_config import EngineConfig
from model_runner.engine_stats import EngineStats, StepCounts, StepObservation, StepObserver
from model_runner.forward import PackedForward, SerialForward, StepForward, probe_layer_shapes
from model_runner.kv import CacheKV
from model_runner.loading import LoadedModel
from model_runner.loop_futures import release_result, run_call
from model_runner.model_facts import eos_ids, layer_kinds
from model_runner.prompt_limits import PromptLimits
from model_runner.records import (
    Failed,
    Finished,
    FinishReason,
    GenerationRequest,
    PinRequest,
    TextDelta,
    WarmupResult,
)
from model_runner.recurrent import StateLayout
from model_runner.sampling import SamplingParams
from model_runner.scheduler import Planned, Scheduler, SchedulerConfig
from model_runner.sequence import Event, Sink
from model_runner.sequence import Sequence as Seq
from model_runner.submission import EngineClosed, Handle, QueueFull, drain_events
from model_runner.usage import usage_report, warmup_report

__all__ = [
    "Engine",
    "EngineClosed",
    "EngineStats",
    "Handle",
    "LogitsHook",
    "QueueFull",
    "StepObservation",
    "StepObserver",
]

log = logging.getLogger(__name__)

R = TypeVar("R")

_IDLE_WAIT_S = 0.05
"""How often an idle loop with requests in it looks at their cancel flags."""


LogitsHook = Callable[[GenerationRequest, torch.Tensor], None]
"""Sees every logits row a request samples from (``[vocab]``), before sampling (for tests and
diagnostics; it runs on the step loop and must be quick)."""


class Engine:
    """Serves one loaded model, with prefix caching when ``cache`` is given and the model allows it."""

    def __init__(
        self,
        loaded: LoadedModel,
        cache: PrefixCache | None,
        block_size: int,
        config: EngineConfig | None = None,
        *,
        observer: StepObserver | None = None,
        logits_hook: LogitsHook | None = None,
    ) -> None:
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
        self._eos = eos_ids(loaded)
        self.chat = ChatTemplate(self._tokenizer)
        """The model's chat template (rendering, tools, tool-call syntax)."""
        self._vocab_size = int(self._model.get_input_embeddings().num_embeddings)
        self._observer = observer
        self._logits_hook = logits_hook
        kinds = layer_kinds(self._model.config)
        self.batching_reason = packed_reason(self._model, kinds)
        """Why requests run one at a time (``None``: they are batched)."""
        self._layer_shapes = None
        self._state_specs: tuple[StateSpec, ...] = ()
        self.state_layout: StateLayout | None = None
        """How a model with recurrent layers stores its state (``None``: it has none, or no cache)."""
        if self.batching_reason is None:
            self._layer_shapes, _ = probe_layer_shapes(self._model, block_size, self._device)
            self._forward: StepForward = PackedForward(
                self._model, self._layer_shapes, loaded.dtype, self._device
            )
        else:
            if self._cache is not None:
                self._layer_shapes, self._state_specs = probe_layer_shapes(
                    self._model, block_size, self._device
                )
                self.state_layout = self._plan_states(block_size)
            self._forward = SerialForward(self._model, self._device, self.state_layout, block_size)
        self.config = (config or EngineConfig()).resolve(
            self._device, packed=self._forward.packed, bytes_per_token=self._forward.bytes_per_token
        )
        self._limits = PromptLimits(
            self.max_context, self._vocab_size, self._forward.bytes_per_token, self.config.kv_budget_bytes
        )
        self._scheduler = Scheduler(
            SchedulerConfig(
                max_batch=self.config.max_batch,
                max_batch_tokens=self.config.max_batch_tokens,
                kv_budget_bytes=self.config.kv_budget_bytes,
            ),
            cached=self._memory_holds if self._cache is not None else None,
        )
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._inbox: deque[Seq] = deque()
        self._calls: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._closing = False
        self._grace_s = 0.0
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._lookups = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvproxy-lookup")
        self._counts = StepCounts()
        self._published = self._scheduler.stats()
        """The scheduler's figures as of the loop's last turn (read by other threads)."""

    def _plan_states(self, block_size: int) -> StateLayout | None:
        if not self._state_specs:
            return None
        continuation = self.loaded.state_continuation
        if continuation is None:
            raise ValueError(
                f"{self.loaded.model_id} keeps recurrent state but its continuation was not measured"
            )
        shapes = self._layer_shapes or []
        width = shapes[0][0][0] * shapes[0][0][2] if shapes else None
        reference = recurrent.reference_bytes_per_token(self._model, width, self.loaded.dtype)
        layout = StateLayout(
            self._state_specs, continuation, recurrent.interval(self._state_specs, reference, block_size)
        )
        log.info("recurrent state of %s: %s", self.loaded.model_id, layout.describe(block_size))
        return layout

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

    @property
    def eos_ids(self) -> frozenset[int]:
        return self._eos

    @property
    def vocab_size(self) -> int:
        """Rows of the model's logits (may exceed the tokenizer's vocabulary)."""
        return self._vocab_size

    @property
    def batched(self) -> bool:
        return self.batching_reason is None

    def stats(self) -> EngineStats:
        with self._cond:
            return self._counts.snapshot(self._published, len(self._inbox))

    # -- tokenization --------------------------------------------------------------------------

    def encode_chat(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """Render ``messages`` (no tools) with the chat template plus the assistant turn opener,
        and tokenize (``chat`` renders with tools, for the chat route)."""
        return self.chat.encode(self.chat.normalize_messages(list(messages)))

    def encode_prompt(self, text: str) -> list[int]:
        """Tokenize a plain completion prompt (with the tokenizer's BOS when it adds one)."""
        return self.chat.encode_plain(text)

    # -- submitting (any thread) ---------------------------------------------------------------

    def submit(self, request: GenerationRequest, sink: Sink, cancel: threading.Event | None = None) -> Handle:
        """Queue ``request``; ``sink`` gets its events on the step loop's thread (``TextDelta``s,
        then one ``Finished`` or ``Failed``) and must not block. Raises ``ContextLengthExceeded``
        / ``InvalidTokens`` at once, before any work, and ``QueueFull`` / ``EngineClosed``
        instead of waiting. Setting ``cancel`` (or ``Handle.cancel()``) makes the request leave
        the batch at the next step."""
        self._limits.check_prompt(request.prompt_ids, request.sampling.max_tokens, choices=request.n)
        self._limits.check_logit_bias(request.sampling.logit_bias)
        return self._enqueue(request, sink, prefill_only=False, cancel=cancel)

    def submit_warmup(
        self,
        prompt_ids: Sequence[int],
        sink: Sink,
        *,
        tenant: str = "default",
        cache_salt: str = "",
        pins: tuple[PinRequest, ...] = (),
    ) -> Handle:
        """Queue a warmup: prefill ``prompt_ids``'s full blocks and store them (then make
        ``pins``); ``sink`` gets one ``WarmupResult`` (or ``Failed``)."""
        prompt = [int(t) for t in prompt_ids]
        self._limits.check_prompt(prompt, 0)
        request = GenerationRequest(
            prompt, SamplingParams(max_tokens=1), tenant=tenant, cache_salt=cache_salt, pins=pins
        )
        return self._enqueue(request, sink, prefill_only=True)

    def call(self, work: Callable[[], R]) -> Future[R]:
        """Run ``work`` on the step loop between two steps (e.g. a cache flush)."""
        future: Future[R] = Future()
        with self._cond:
            if self._closing:
                raise EngineClosed("the engine is shutting down")
            self._calls.append((work, future))
            self._cond.notify()
        self._ensure_started()
        return future

    def generate(
        self, request: GenerationRequest, cancel: threading.Event | None = None
    ) -> Iterator[TextDelta | Finished]:
        """Blocking helper over ``submit``: the request's events in order. Raises at once as
        ``submit`` does; a ``Failed`` event is raised as its error."""
        events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        handle = self.submit(request, events.put, cancel)
        return drain_events(handle, events)

    def warmup(
        self,
        prompt_ids: Sequence[int],
        *,
        tenant: str = "default",
        cache_salt: str = "",
        pins: tuple[PinRequest, ...] = (),
    ) -> WarmupResult:
        """Blocking helper over ``submit_warmup``. Lower tiers are written in the background:
        drain the store to wait for them."""
        events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self.submit_warmup(prompt_ids, events.put, tenant=tenant, cache_salt=cache_salt, pins=pins)
        event = events.get()
        if isinstance(event, Failed):
            raise event.error
        if not isinstance(event, WarmupResult):
            raise RuntimeError(f"a warmup ended with {type(event).__name__}")
        return event

    def start(self) -> None:
        self._ensure_started()

    def close(self, grace_s: float = 10.0) -> bool:
        """Stop taking requests, drop the waiting ones (``EngineClosed``), give the running
        ones ``grace_s`` to finish, then cancel them. True when the loop stopped in time."""
        with self._cond:
            self._closing = True
            self._grace_s = max(grace_s, 0.0)
            self._cond.notify()
        thread = self._thread
        if thread is not None:
            thread.join(timeout=grace_s + 2.0)
        self._lookups.shutdown(wait=False, cancel_futures=True)
        return thread is None or not thread.is_alive()

    @property
    def closed(self) -> bool:
        return self._closing

    # -- queueing ------------------------------------------------------------------------------

    def _enqueue(
        self,
        request: GenerationRequest,
        sink: Sink,
        *,
        prefill_only: bool,
        cancel: threading.Event | None = None,
    ) -> Handle:
        seq = Seq(id=next(self._ids), request=request, sink=sink, cancel=cancel or threading.Event())
        if prefill_only:
            seq.prefill_only = True
            seq.warmup_tokens = len(seq.prompt) // self.block_size * self.block_size
        with self._cond:
            if self._closing:
                raise EngineClosed("the server is shutting down")
            if self._published.waiting + len(self._inbox) >= self.config.max_waiting:
                self._counts.rejected += 1
                raise QueueFull(f"the request queue is full ({self.config.max_waiting} waiting)")
            self._start_lookup(seq)
            self._inbox.append(seq)
            self._cond.notify()
        self._ensure_started()
        return Handle(seq, self._wake)

    # -- the lookup (lookup threads) -----------------------------------------------------------

    def _start_lookup(self, seq: Seq) -> None:
        seq.phase = "lookup"
        started = time.perf_counter()

        def lookup() -> PrefixHit | None:
            try:
                return self._lookup(seq)
            finally:
                seq.timeline.lookup_s += time.perf_counter() - started

        future = self._lookups.submit(lookup)
        seq.lookup = future
        future.add_done_callback(lambda _f: self._wake())

    def _lookup(self, seq: Seq) -> PrefixHit | None:
        if self._cache is None:
            return None
        request = seq.request
        seq.namespace = namespace_hash(
            model_fingerprint=self.fingerprint,
            block_size=self.block_size,
            tenant=request.tenant,
            cache_salt=request.cache_salt,
        )
        return self._cache.lookup(
            seq.namespace,
            seq.prompt,
            dtype=self.loaded.dtype,
            layer_shapes=self._layer_shapes,
            state_specs=self._state_specs,
        )

    # -- the step loop -------------------------------------------------------------------------

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _ensure_started(self) -> None:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="kvproxy-engine", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        grace_end: float | None = None
        while True:
            with self._cond:
                self._published = self._scheduler.stats()
                if not (self._inbox or self._calls or self._closing or self._has_work()):
                    # Requests that cannot run yet (budget full, blocks in flight) are looked at
                    # again soon: their cancel flags too.
                    self._cond.wait(_IDLE_WAIT_S if any(self._scheduler.sequences()) else 1.0)
                inbox = list(self._inbox)
                self._inbox.clear()
                calls = list(self._calls)
                self._calls.clear()
                closing = self._closing
            for seq in inbox:
                self._scheduler.add(seq)
            for work, future in calls:
                run_call(work, future)
            if closing:
                if grace_end is None:
                    grace_end = time.monotonic() + self._grace_s
                    for seq in list(self._scheduler.waiting):
                        self._fail(seq, EngineClosed("the server is shutting down"))
                if time.monotonic() >= grace_end:
                    for seq in list(self._scheduler.running):
                        seq.cancel.set()
            self._reap()
            if closing and not any(self._scheduler.sequences()):
                self._stopped.set()
                return
            plan = self._scheduler.schedule()
            for seq in plan.stale:
                self._relookup(seq)
            for seq in plan.admitted:
                self._admit(seq)
            if plan.runs:
                self._step([p for p in plan.runs if p.seq.phase in ("prefill", "decode")])

    def _has_work(self) -> bool:
        sched = self._scheduler
        if any(s.phase in ("prefill", "decode") for s in sched.running):
            return True
        return any(s.cancel.is_set() or (s.lookup is not None and s.lookup.done()) for s in sched.waiting)

    def _reap(self) -> None:
        """Cancelled requests leave; finished lookups make requests ready for admission."""
        for seq in list(self._scheduler.sequences()):
            if seq.cancel.is_set():
                if seq.phase == "lookup" and seq.lookup is not None and not seq.lookup.done():
                    continue  # its pins come with the lookup's result: release them then
                self._finish(seq, "cancelled")
            elif seq.phase == "lookup" and seq.lookup is not None and seq.lookup.done():
                self._lookup_done(seq)

    def _lookup_done(self, seq: Seq) -> None:
        future, seq.lookup = seq.lookup, None
        try:
            hit = future.result() if future is not None else None
        except Exception:  # a store fault is a miss, never an error
            log.exception("prefix lookup failed; computing the prompt instead")
            hit = None
        if seq.hit is not None:
            seq.hit.release()
        seq.hit = hit
        if seq.prefill_only:
            seq.cached = self._restorable(hit, seq.target)
            if seq.cached >= seq.target:
                self._pin(seq)
                self._finish_warmup(seq)
                return
            capacity = seq.target
        else:
            # At least one prompt token is always prefilled: its logits pick the first token.
            seq.cached = self._restorable(hit, len(seq.prompt) - 1)
            capacity = len(seq.prompt) + seq.request.sampling.max_tokens
        # Every choice of an n > 1 request gets its own copy once the prompt is prefilled.
        seq.reserve_bytes = capacity * self._forward.bytes_per_token * seq.slots
        seq.phase = "waiting"

    def _restorable(self, hit: PrefixHit | None, limit: int) -> int:
        """Prompt tokens to restore from ``hit``, at most ``limit``: the matched blocks' tokens, or
        for a model with recurrent layers up to the last matched block that carries its state."""
        if hit is None:
            return 0
        if self.state_layout is None:
            return min(len(hit.blocks) * self.block_size, limit)
        return self.state_layout.restorable([b.has_state for b in hit.blocks], self.block_size, limit)

    def _admit(self, seq: Seq) -> None:
        timeline = seq.timeline
        timeline.admitted = time.perf_counter()
        capacity = seq.target if seq.prefill_only else len(seq.prompt) + seq.request.sampling.max_tokens
        seq.kv = self._forward.new_kv(capacity, seq.target)
        hit = seq.hit
        if hit is not None and seq.cached > 0:
            try:
                self._forward.restore(seq.kv, hit.blocks, seq.cached)
                seq.stored_blocks = len(hit.blocks)
            except Exception:
                log.exception("restoring %d cached tokens failed; computing them instead", seq.cached)
                seq.kv = self._forward.new_kv(capacity, seq.target)
                seq.cached = 0
        elif hit is not None:
            seq.stored_blocks = len(hit.blocks)
        if hit is not None and isinstance(seq.kv, CacheKV):
            seq.kv.branch_tokens = len(hit.blocks) * self.block_size
        timeline.restored = time.perf_counter()
        seq.phase = "prefill"

    def _step(self, planned: list[Planned]) -> None:
        if not planned:
            return
        runs: list[Run] = []
        rows: list[int | None] = []
        kept = 0
        for p in planned:
            seq = p.seq
            tokens = seq.next_input(p.n_tokens)
            samples = seq.phase == "decode" or (not seq.prefill_only and seq.fed + len(tokens) >= seq.target)
            runs.append(Run(seq.kv, tokens, seq.fed, samples))  # type: ignore[arg-type]
            rows.append(kept if samples else None)
            kept += samples
        started = time.perf_counter()
        try:
            logits = self._forward.run(runs)  # [kept, vocab]
        except Exception as exc:
            log.exception("a step of %d requests failed", len(planned))
            for p in planned:
                self._fail(p.seq, exc)
            return
        seconds = time.perf_counter() - started
        n_tokens = sum(len(r.token_ids) for r in runs)
        c = self._counts
        c.steps += 1
        c.batched_steps += len(planned) > 1
        c.max_step_requests = max(c.max_step_requests, len(planned))
        c.prefilled_tokens += sum(
            len(r.token_ids) for p, r in zip(planned, runs, strict=True) if p.seq.phase == "prefill"
        )
        if self._observer is not None:
            try:
                self._observer(StepObservation(n_tokens, len(planned), kept, seconds))
            except Exception:  # figures must never fail a step
                log.exception("the step observer failed")
        for p, row in zip(planned, rows, strict=True):
            p.seq.prefill_steps += p.seq.phase == "prefill"
            try:
                self._advance(p.seq, logits[row] if row is not None else None)
            except Exception as exc:
                log.exception("request %d failed", p.seq.id)
                self._fail(p.seq, exc)

    def _advance(self, seq: Seq, logits: torch.Tensor | None) -> None:
        """After a step: sample, emit, store the blocks a finished chunk completed."""
        prefill_finished = seq.phase == "prefill" and seq.fed >= seq.target
        if prefill_finished and seq.prefill_only:
            self._store_blocks(seq, seq.target)
            self._release_followers(seq)
            self._pin(seq)
            self._finish_warmup(seq)
            return
        if prefill_finished:
            seq.phase = "decode"
            if not seq.forked:
                for child in self._fork(seq):
                    try:
                        self._sample(child, logits)
                    except Exception as exc:
                        log.exception("request %d (choice %d) failed", seq.id, child.choice)
                        self._fail(child, exc)
        done = self._sample(seq, logits) if logits is not None else False
        # Prompt blocks go into the cache as soon as their chunk is done, after the first token
        # went out (the store never delays it).
        self._store_blocks(seq, min(seq.fed, len(seq.prompt)))
        if prefill_finished:
            self._release_followers(seq)
            self._pin(seq)
        if done:
            self._finish(seq, seq.stream(self._tokenizer, self._eos, self._device).finish or "stop")
        elif seq.cancel.is_set():
            self._finish(seq, "cancelled")

    def _sample(self, seq: Seq, logits: torch.Tensor | None) -> bool:
        """Sample ``seq``'s next token; True when it is done. (A forked choice finishes here; the
        sequence that prefilled finishes in ``_advance``, after storing its prompt blocks.)"""
        if logits is None:
            return False
        if self._logits_hook is not None:
            self._logits_hook(seq.request, logits)
        stream = seq.stream(self._tokenizer, self._eos, self._device)
        done = stream.accept(logits)
        self._counts.generated_tokens += 1
        if done and seq.parent is not None:
            self._finish(seq, stream.finish or "stop")
        return done

    def _fork(self, seq: Seq) -> list[Seq]:
        """The prompt of an ``n`` > 1 request is prefilled: copy its K/V for choices 1.. (each
        samples its first token from the same logits row, with its own seed)."""
        seq.forked = True
        n = seq.request.n
        if n == 1 or seq.kv is None:
            return []
        each = seq.reserve_bytes // n
        seq.reserve_bytes = each  # the scheduler reserved n shares; each choice now holds one
        prompt_blocks = min(seq.fed, len(seq.prompt)) // self.block_size
        children = []
        for choice in range(1, n):
            child = Seq(
                id=next(self._ids),
                request=seq.request,
                sink=seq.sink,
                cancel=seq.cancel,
                choice=choice,
                parent=seq,
                forked=True,
            )
            child.namespace = seq.namespace
            child.cached = seq.cached
            child.kv = seq.kv.fork()
            child.reserve_bytes = each
            child.stored_blocks = max(seq.stored_blocks, prompt_blocks)  # the first choice stores them
            child.prefill_steps = seq.prefill_steps
            child.timeline = dataclasses.replace(seq.timeline)
            child.phase = "decode"
            self._scheduler.adopt(child)
            children.append(child)
        return children

    def _store_blocks(self, seq: Seq, upto_tokens: int) -> None:
        """Store full blocks ``seq.stored_blocks ..`` of the first ``upto_tokens`` tokens (their
        K/V must be in ``seq.kv``), with the recurrent state taken after any of them; a failure
        costs only the cache entry, never the response."""
        if self._cache is None or seq.kv is None:
            return
        n_blocks = min(upto_tokens, seq.fed) // self.block_size
        first = seq.stored_blocks
        if self.state_layout is not None and isinstance(seq.kv, CacheKV):
            self._store_states(seq, first)
        if n_blocks <= first:
            return
        ids = (list(seq.prompt) + seq.generated)[: n_blocks * self.block_size]
        seq.stored_blocks = n_blocks
        try:
            hashes = block_hashes(ids, self.block_size, seq.namespace)
            with torch.inference_mode():
                blocks = seq.kv.slice_blocks(first, n_blocks - first, self.block_size)
            states = seq.kv.take_states(first, n_blocks - first) if isinstance(seq.kv, CacheKV) else None
            seq.written_blocks += self._cache.store_blocks(
                seq.namespace, ids, hashes, first, blocks, states=states, dtype=self.loaded.dtype
            )
        except Exception:
            log.exception("storing blocks %d..%d failed", first, n_blocks - 1)

    def _store_states(self, seq: Seq, below: int) -> None:
        """States taken after blocks already in the cache (matched, or stored before their state
        was taken): rewrite those records with it when they carry none (a prompt that ends where
        a longer one only passed through makes that block a restore point)."""
        assert self._cache is not None and isinstance(seq.kv, CacheKV)
        pending = seq.kv.take_states(0, below)
        matched = seq.hit.blocks if seq.hit is not None else []
        for block, states in sorted(pending.items()):
            if block < len(matched) and matched[block].has_state:
                continue
            ids = (list(seq.prompt) + seq.generated)[: (block + 1) * self.block_size]
            try:
                hashes = block_hashes(ids, self.block_size, seq.namespace)
                with torch.inference_mode():
                    parts = seq.kv.slice_blocks(block, 1, self.block_size)
                self._cache.store_blocks(
                    seq.namespace,
                    ids,
                    hashes,
                    block,
                    parts,
                    states={block: states},
                    dtype=self.loaded.dtype,
                    replace_held=True,
                )
            except Exception:
                log.exception("storing the state after block %d failed", block)

    def _pin(self, seq: Seq) -> None:
        """The prompt is stored: make the request's pins (a pin that cannot be made, e.g. over
        its tenant's budget, costs only the pin, never the response)."""
        if self._cache is None or not seq.request.pins or seq.pin_outcomes:
            return
        bs = self.block_size
        try:
            hashes = seq.hit.hashes if seq.hit is not None else block_hashes(seq.prompt, bs, seq.namespace)
            for want in seq.request.pins:
                n_blocks = min(want.tokens, len(seq.prompt)) // bs
                if n_blocks == 0:
                    continue
                outcome = self._cache.pin(
                    seq.request.tenant, hashes[:n_blocks], want.ttl_s, source=want.source
                )
                if outcome is None:
                    return
                seq.pin_outcomes.append(outcome)
                if outcome.pin is None:
                    log.info("a pin of %d blocks was not made: %s", n_blocks, outcome.reason)
        except Exception:
            log.exception("pinning the prefix of request %d failed", seq.id)

    def _memory_holds(self, key: bytes) -> bool:
        assert self._cache is not None
        return self._cache.trie.contains([key])[0]

    def _release_followers(self, seq: Seq) -> None:
        """``seq``'s prompt blocks are stored: the requests waiting for them look up again."""
        for follower in self._scheduler.prefill_done(seq):
            self._relookup(follower)

    def _relookup(self, seq: Seq) -> None:
        """``seq`` waited for blocks a running request computed: look its prefix up again."""
        if seq.cancel.is_set() or seq.phase != "waiting":
            return
        self._start_lookup(seq)

    # -- ending a request ----------------------------------------------------------------------

    def _finish(self, seq: Seq, reason: FinishReason) -> None:
        if seq.phase == "done":
            return
        try:
            if seq._stream is not None and reason != "cancelled":
                seq._stream.close()
            if seq.kv is not None:
                # Only tokens whose K/V are in the buffers (the last sampled token was never fed).
                self._store_blocks(seq, seq.fed)
        finally:
            usage = usage_report(seq, self.block_size, time.perf_counter())
            self._leave(seq)
            if reason == "cancelled":
                self._counts.cancelled_requests += 1
                self._counts.cancelled_tokens += len(seq.generated)
            else:
                self._counts.completed += 1
            if seq.prefill_only:
                self._emit(seq, Failed(EngineClosed("the warmup was cancelled")))
            else:
                stop = seq._stream.stop_sequence if seq._stream is not None and reason == "stop" else None
                self._emit(seq, Finished(reason, usage, index=seq.choice, stop_sequence=stop))

    def _finish_warmup(self, seq: Seq) -> None:
        result = warmup_report(seq)
        self._leave(seq)
        self._counts.completed += 1
        self._emit(seq, result)

    def _fail(self, seq: Seq, exc: Exception) -> None:
        if seq.phase == "done":
            return
        self._leave(seq)
        self._counts.failed += 1
        self._emit(seq, Failed(exc))

    def _leave(self, seq: Seq) -> None:
        seq.phase = "done"
        if seq.hit is not None:
            seq.hit.release()
        if seq.lookup is not None:
            # Still running on a lookup thread: release its pins once it is done.
            seq.lookup.add_done_callback(release_result)
            seq.lookup = None
        for follower in self._scheduler.remove(seq):
            self._relookup(follower)
        seq.kv = None  # the K/V buffers go back to the allocator now

    def _emit(self, seq: Seq, event: Event) -> None:
        try:
            seq.emit(event)
        except Exception:  # a broken sink must not take the loop down
            log.exception("delivering an event of request %d failed", seq.id)
            seq.cancel.set()
