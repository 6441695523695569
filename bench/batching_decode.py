"""The in-process sections of the batching bench: decode throughput against its ceiling, where
the step loop's time goes, and the step token budget's trade-off.

- ``run_decode``: B requests (a cached 768-token prefix, restored from the memory tier, plus 32
  unique prompt tokens each) decode together through ``Engine``; against the ceiling, plain
  transformers decoding B rows of the same 800-token context in one ``DynamicCache`` (``[B, 1]``
  ``input_ids`` per step, greedy). Both are the steady rate of full decode steps, every cost
  between two steps included (the engine's sampling, detokenizing and scheduling; the ceiling's
  argmax and ``tolist``). The rows of the ceiling have equal lengths: no padding, its best case.
- ``profile_decode``: one more engine run per B with the packed attention function timed, to
  split a decode step into attention (one SDPA call per request and layer) and the rest.
- ``run_budgets``: K requests decoding while one long uncached prompt arrives, per step token
  budget (``max_batch_tokens``): the decoding streams' inter-token gap before and during that
  prefill, and the long prompt's time to first token.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from bench.batching_workload import StepStamp, gaps_between, percentile, steady_decode
from cache_store.prefix_cache import PrefixCache
from model_runner import attention
from model_runner.engine import Engine, Handle, StepObservation
from model_runner.engine_config import EngineConfig
from model_runner.kv import cache_argument
from model_runner.loading import LoadedModel
from model_runner.records import Failed, Finished, GenerationRequest
from model_runner.sampling import SamplingParams

BLOCK = 64
CACHED = 768
"""Prompt tokens every decode request finds in the memory tier (12 blocks)."""
UNIQUE = 32
"""Prompt tokens of its own on top (prefilled): 800 tokens of context in all."""


@dataclass(frozen=True)
class DecodePlan:
    batches: tuple[int, ...]
    steps: int
    """Full decode steps measured per repetition."""
    reps: int
    budgets: tuple[int, ...]
    budget_streams: int
    """Requests decoding while the long prompt prefills."""
    long_prompt: int
    budget_reps: int


class Recorder:
    """The engine's step observer: a ``StepStamp`` per step (list appends only: cheap)."""

    def __init__(self) -> None:
        self.stamps: list[StepStamp] = []
        self.forward_s: list[float] = []

    def __call__(self, o: StepObservation) -> None:
        self.stamps.append(StepStamp(time.perf_counter(), o.tokens, o.requests, o.sampled))
        self.forward_s.append(o.seconds)

    def clear(self) -> None:
        self.stamps.clear()
        self.forward_s.clear()


class Waiter:
    """Sinks that only note the end of a request (no work on the engine thread)."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.ended: list[tuple[float, Finished | Failed]] = []
        self.done = threading.Event()

    def sink(self, event: object) -> None:
        if isinstance(event, Finished | Failed):
            self.ended.append((time.perf_counter(), event))
            if len(self.ended) >= self.expected:
                self.done.set()

    def wait(self, timeout_s: float = 600.0) -> list[tuple[float, Finished | Failed]]:
        if not self.done.wait(timeout_s):
            raise RuntimeError(
                f"only {len(self.ended)} of {self.expected} requests ended in {timeout_s:.0f}s"
            )
        failed = [e for _, e in self.ended if isinstance(e, Failed)]
        if failed:
            raise RuntimeError(f"{len(failed)} requests failed: {failed[0].error!r}")
        return self.ended


def random_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    """Ordinary (non-special) token ids: the tokenizer's first few hundred are bytes and specials."""
    return [rng.randrange(300, vocab) for _ in range(n)]


def new_engine(
    loaded: LoadedModel,
    cache: PrefixCache,
    recorder: Recorder,
    *,
    max_batch: int,
    max_batch_tokens: int | None,
) -> Engine:
    config = EngineConfig(max_batch=max_batch, max_batch_tokens=max_batch_tokens)
    return Engine(loaded, cache, BLOCK, config, observer=recorder)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- decode throughput ---------------------------------------------------------------------------


def engine_decode(
    engine: Engine, recorder: Recorder, prefix: Sequence[int], batch: int, steps: int, rng: random.Random
) -> dict[str, float]:
    """One repetition: ``batch`` requests submitted at once, decoding until each has sampled
    ``steps`` tokens past the ramp (admissions spread over a few steps by the token budget)."""
    vocab = engine.loaded.model.get_input_embeddings().num_embeddings
    budget = engine.config.max_batch_tokens or UNIQUE * batch
    ramp = -(-UNIQUE * batch // budget) + 3
    waiter = Waiter(batch)
    recorder.clear()
    for _ in range(batch):
        ids = list(prefix) + random_ids(rng, UNIQUE, vocab)
        engine.submit(
            GenerationRequest(ids, SamplingParams(max_tokens=steps + ramp, temperature=0.0)), waiter.sink
        )
    ended = waiter.wait()
    cached = [e.usage.cached_tokens for _, e in ended if isinstance(e, Finished)]
    stamps = list(recorder.stamps)
    forward = [
        f
        for s, f in zip(stamps, recorder.forward_s, strict=True)
        if s.requests == batch and s.tokens == batch
    ]
    tok_s, k = steady_decode(stamps, batch)
    if k < 3:
        raise RuntimeError(f"B={batch}: only {k} full decode steps (the ramp took longer than planned)")
    return {
        "tok_s": tok_s,
        "steps": k,
        "cycle_ms": 1e3 * batch / tok_s,
        "forward_ms": 1e3 * statistics.median(forward),
        "cached_min": min(cached),
    }


class Ceiling:
    """Plain transformers: B rows of the same context in one ``DynamicCache``, decoded together."""

    def __init__(self, loaded: LoadedModel, context: Sequence[int]) -> None:
        self._model = loaded.model
        self._device = loaded.device
        self._kw = cache_argument(loaded.model)
        self._context = list(context)
        self._templates: dict[int, tuple[DynamicCache, torch.Tensor]] = {}

    @torch.inference_mode()
    def _template(self, batch: int) -> tuple[DynamicCache, torch.Tensor]:
        if batch not in self._templates:
            cache = DynamicCache(config=self._model.config)
            ids = torch.tensor([self._context], device=self._device)
            out = self._model(ids, use_cache=True, logits_to_keep=1, **{self._kw: cache})
            cache.batch_repeat_interleave(batch)
            first = out.logits[:, -1].argmax(-1).repeat(batch)[:, None]
            self._templates[batch] = (cache, first)
        return self._templates[batch]

    def prepare(self, batches: Sequence[int]) -> None:
        for b in batches:
            self._template(b)

    @torch.inference_mode()
    def decode(self, batch: int, steps: int) -> dict[str, float]:
        cache, tokens = self._template(batch)
        extra = cache.get_seq_length() - len(self._context)
        if extra > 0:  # back to the context: every repetition decodes the same steps
            cache.crop(-extra)
        times: list[float] = []
        for _ in range(steps + 1):
            out = self._model(tokens, use_cache=True, logits_to_keep=1, **{self._kw: cache})
            tokens = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.tolist()  # the host gets the tokens, as a server must (a sync on CUDA)
            times.append(time.perf_counter())
        tok_s = batch * (len(times) - 1) / (times[-1] - times[0])
        return {"tok_s": tok_s, "steps": len(times), "cycle_ms": 1e3 * batch / tok_s}


def run_decode(
    loaded: LoadedModel,
    cache: PrefixCache,
    plan: DecodePlan,
    seed: int = 41,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Engine and ceiling at every B of ``plan.batches``, arms alternating (rotated) per B and
    repetition; the ratio of each repetition is engine / ceiling of that same repetition."""
    rng = random.Random(seed)
    vocab = loaded.model.get_input_embeddings().num_embeddings
    prefix = random_ids(rng, CACHED, vocab)
    recorder = Recorder()
    engine = new_engine(loaded, cache, recorder, max_batch=max(plan.batches), max_batch_tokens=None)
    try:
        engine.warmup(prefix)
        ceiling = Ceiling(loaded, prefix + random_ids(rng, UNIQUE, vocab))
        ceiling.prepare(plan.batches)
        for b in plan.batches[:2]:  # untimed: first calls of every kernel shape
            engine_decode(engine, recorder, prefix, b, 4, rng)
            ceiling.decode(b, 4)
        rows: dict[int, dict[str, list[dict[str, float]]]] = {
            b: {"engine": [], "ceiling": []} for b in plan.batches
        }
        for rep in range(plan.reps):
            for i, b in enumerate(plan.batches):
                arms = ["engine", "ceiling"] if (rep + i) % 2 == 0 else ["ceiling", "engine"]
                for arm in arms:
                    if arm == "engine":
                        rows[b]["engine"].append(engine_decode(engine, recorder, prefix, b, plan.steps, rng))
                    else:
                        rows[b]["ceiling"].append(ceiling.decode(b, plan.steps))
                e, c = rows[b]["engine"][-1], rows[b]["ceiling"][-1]
                log(f"  rep {rep} B={b}: engine {e['tok_s']:.0f} tok/s, ceiling {c['tok_s']:.0f} tok/s")
        profile = profile_decode(engine, recorder, prefix, plan.batches, plan.steps, rng)
        config = {"max_batch": engine.config.max_batch, "max_batch_tokens": engine.config.max_batch_tokens}
    finally:
        engine.close()
    return {
        "config": config,
        "context_tokens": CACHED + UNIQUE,
        "cached_tokens": CACHED,
        "by_batch": {str(b): rows[b] for b in plan.batches},
        "profile": profile,
    }


def profile_decode(
    engine: Engine,
    recorder: Recorder,
    prefix: Sequence[int],
    batches: Sequence[int],
    steps: int,
    rng: random.Random,
) -> dict[str, dict[str, float]]:
    """Per B, one run with ``attention.packed_attention`` timed (the registered function looks it
    up by name at every call): milliseconds per full decode step in attention, in the rest of
    the forward, and between forwards (sampling, detokenizing, scheduling)."""
    original = attention.packed_attention
    spent: list[float] = []

    def timed(*args: Any, **kwargs: Any) -> torch.Tensor:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - start)

    out: dict[str, dict[str, float]] = {}
    attention.packed_attention = timed  # type: ignore[assignment]
    try:
        for b in batches:
            spent.clear()
            run = engine_decode(engine, recorder, prefix, b, steps, rng)
            layers = engine.loaded.model.config.num_hidden_layers
            # Every step makes one call per layer, in step order: keep the full decode steps'.
            per_step = [
                sum(spent[i * layers : (i + 1) * layers])
                for i, st in enumerate(recorder.stamps)
                if st.requests == b and st.tokens == b and len(spent) >= (i + 1) * layers
            ]
            attn_ms = 1e3 * statistics.median(per_step) if per_step else float("nan")
            out[str(b)] = {
                "cycle_ms": run["cycle_ms"],
                "forward_ms": run["forward_ms"],
                "attention_ms": attn_ms,
                "attention_call_us": 1e3 * attn_ms / (layers * b) if per_step else float("nan"),
                "rest_of_forward_ms": run["forward_ms"] - attn_ms,
                "between_steps_ms": run["cycle_ms"] - run["forward_ms"],
            }
    finally:
        attention.packed_attention = original  # type: ignore[assignment]
    return out


# -- the step token budget -----------------------------------------------------------------------


def budget_run(
    engine: Engine,
    recorder: Recorder,
    prefix: Sequence[int],
    streams: int,
    long_prompt: int,
    rng: random.Random,
) -> dict[str, float]:
    """``streams`` requests decode; once they all are, a ``long_prompt``-token uncached prompt
    arrives. Gaps of the decoding streams before (decode only) and during its prefill."""
    vocab = engine.loaded.model.get_input_embeddings().num_embeddings
    recorder.clear()
    waiter = Waiter(streams)
    handles: list[Handle] = []
    for _ in range(streams):
        ids = list(prefix) + random_ids(rng, UNIQUE, vocab)
        handles.append(
            engine.submit(
                GenerationRequest(ids, SamplingParams(max_tokens=2000, temperature=0.0)), waiter.sink
            )
        )
    deadline = time.monotonic() + 300
    try:
        while sum(1 for s in list(recorder.stamps) if s.requests == streams == s.tokens) < 8:
            if time.monotonic() > deadline:
                raise RuntimeError("the decoding streams never ran together")
            time.sleep(0.005)
        long_waiter = Waiter(1)
        submitted = time.perf_counter()
        long_ids = random_ids(rng, long_prompt, vocab)
        engine.submit(
            GenerationRequest(long_ids, SamplingParams(max_tokens=1, temperature=0.0)), long_waiter.sink
        )
        first_token = long_waiter.wait()[0][0]
        time.sleep(0.05)
    finally:
        for h in handles:
            h.cancel()
    waiter.wait()
    stamps = list(recorder.stamps)
    before_steps = [s for s in stamps if s.t <= submitted and s.requests == streams == s.tokens]
    before = gaps_between(before_steps, before_steps[1].t if len(before_steps) > 1 else 0.0, submitted)
    during = gaps_between(stamps, submitted, first_token)
    return {
        "gap_before_ms": 1e3 * statistics.median(before),
        "gap_during_p50_ms": 1e3 * statistics.median(during),
        "gap_during_p95_ms": 1e3 * percentile(during, 95),
        "gap_during_max_ms": 1e3 * max(during),
        "long_ttft_ms": 1e3 * (first_token - submitted),
        "prefill_steps": len(during),
    }


def run_budgets(
    loaded: LoadedModel,
    cache: PrefixCache,
    plan: DecodePlan,
    seed: int = 43,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    rng = random.Random(seed)
    vocab = loaded.model.get_input_embeddings().num_embeddings
    prefix = random_ids(rng, CACHED, vocab)
    recorders = {b: Recorder() for b in plan.budgets}
    engines = {
        b: new_engine(loaded, cache, recorders[b], max_batch=max(plan.budget_streams, 32), max_batch_tokens=b)
        for b in plan.budgets
    }
    rows: dict[int, list[dict[str, float]]] = {b: [] for b in plan.budgets}
    try:
        engines[plan.budgets[0]].warmup(prefix)
        budgets = list(plan.budgets)
        for rep in range(plan.budget_reps):
            order = budgets[rep % len(budgets) :] + budgets[: rep % len(budgets)]
            for b in order:
                row = budget_run(engines[b], recorders[b], prefix, plan.budget_streams, plan.long_prompt, rng)
                rows[b].append(row)
                log(
                    f"  rep {rep} budget {b}: gap {row['gap_before_ms']:.0f} -> "
                    f"{row['gap_during_p50_ms']:.0f} ms "
                    f"(max {row['gap_during_max_ms']:.0f}), long TTFT {row['long_ttft_ms']:.0f} ms"
                )
    finally:
        for engine in engines.values():
            engine.close()
    return {
        "streams": plan.budget_streams,
        "long_prompt": plan.long_prompt,
        "by_budget": {str(b): rows[b] for b in plan.budgets},
    }
