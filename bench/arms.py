"""The arms every workload runs through, side by side on the same prompts.

- ``baseline``: plain transformers in this process, a full prefill of every prompt;
- ``recipe``: transformers' documented prefix reuse, in this process: the group's exact shared
  prefix prefilled once into a ``DynamicCache`` (on the group's first request, inside its timing),
  then per request ``copy.deepcopy`` of it and a prefill of the rest of the prompt;
- a ``kvproxy serve`` process over HTTP (``ServerArm``), optionally with a fresh ``cache_salt`` per
  request, which makes every request a miss on the very same tokens (the no-hit cost).

In-process arms start from token ids (made by the server's own tokenizer code, so both sides see
the same ids) and stop at the first greedy token, like a server's TTFT; tokenization and HTTP are
the server's overhead row. Arms run in a rotated order per request, so the load spikes of this
shared machine fall on all of them alike.
"""

from __future__ import annotations

import copy
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import DynamicCache

from bench.server_proc import Sample, Server
from model_runner.engine import Engine
from model_runner.kv import cache_argument
from model_runner.loading import LoadedModel


@dataclass(frozen=True)
class Prepared:
    """A request ready for every arm: its text form for servers, its ids for in-process arms."""

    ids: tuple[int, ...]
    group: str
    recipe_prefix: int
    """Tokens of the group's exact shared prefix (what the recipe prefills once)."""
    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None

    def message_dicts(self) -> list[dict[str, str]] | None:
        if self.messages is None:
            return None
        return [{"role": role, "content": content} for role, content in self.messages]


class Arm(Protocol):
    name: str

    def run(self, request: Prepared, max_tokens: int) -> Sample: ...


class Tokens:
    """The server's own tokenization (``Engine.encode_*`` without a cache)."""

    def __init__(self, loaded: LoadedModel, block_size: int) -> None:
        self._engine = Engine(loaded, None, block_size)

    def prompt(self, text: str) -> tuple[int, ...]:
        return tuple(self._engine.encode_prompt(text))

    def chat(self, messages: Sequence[tuple[str, str]]) -> tuple[int, ...]:
        return tuple(self._engine.encode_chat([{"role": r, "content": c} for r, c in messages]))

    def of(self, prompt: str | None, messages: Sequence[tuple[str, str]] | None) -> tuple[int, ...]:
        return self.chat(messages) if messages is not None else self.prompt(prompt or "")


@torch.inference_mode()
def _first_token(
    model: torch.nn.Module, cache_kw: str, ids: Sequence[int], past: DynamicCache | None = None
) -> int:
    """Prefill ``ids`` (on top of ``past``, passed as ``cache_kw``: ``kv.cache_argument``, read
    once per arm, outside the timing) and pick the greedy token: logits of the last position only,
    as a server computes them. ``input_ids``: [1, len(ids)]."""
    out = model(torch.tensor([list(ids)]), use_cache=True, logits_to_keep=1, **{cache_kw: past})
    return int(out.logits[0, -1].argmax().item())


class Baseline:
    name = "baseline"

    def __init__(self, loaded: LoadedModel) -> None:
        self._model = loaded.model
        self._cache_kw = cache_argument(loaded.model)

    def run(self, request: Prepared, max_tokens: int) -> Sample:
        start = time.perf_counter()
        _first_token(self._model, self._cache_kw, request.ids)
        seconds = time.perf_counter() - start
        return Sample(seconds, seconds, seconds, len(request.ids), 0)


class Recipe:
    """A prefilled ``DynamicCache`` per group, deep-copied per request; exact prefix only."""

    name = "recipe"

    def __init__(self, loaded: LoadedModel) -> None:
        self._model = loaded.model
        self._cache_kw = cache_argument(loaded.model)
        self._caches: dict[str, tuple[tuple[int, ...], DynamicCache]] = {}

    @torch.inference_mode()
    def prefill(self, group: str, prefix: Sequence[int]) -> None:
        cache = DynamicCache(config=self._model.config)
        self._model(torch.tensor([list(prefix)]), use_cache=True, logits_to_keep=1, **{self._cache_kw: cache})
        self._caches[group] = (tuple(prefix), cache)

    def forget(self) -> None:
        """What a process restart does to the recipe: every prefilled cache is gone."""
        self._caches.clear()

    def run(self, request: Prepared, max_tokens: int) -> Sample:
        start = time.perf_counter()
        built = request.group not in self._caches and request.recipe_prefix > 0
        if built:
            self.prefill(request.group, request.ids[: request.recipe_prefix])  # first use pays it
        prefix, template = self._caches.get(request.group, ((), None))
        copied = start
        if template is not None and request.ids[: len(prefix)] == prefix and len(prefix) < len(request.ids):
            with torch.inference_mode():
                past = copy.deepcopy(template)
            copied = time.perf_counter()
            _first_token(self._model, self._cache_kw, request.ids[len(prefix) :], past)
            cached = 0 if built else len(prefix)  # prefilled in this very request: not a hit
        else:
            _first_token(self._model, self._cache_kw, request.ids)
            cached = 0
        end = time.perf_counter()
        seconds = end - start
        phases = {"lookup": 0.0, "restore": copied - start, "prefill": end - copied} if not built else {}
        return Sample(seconds, seconds, seconds, len(request.ids), cached, phases_s=phases)


class ServerArm:
    """A running server; with ``salt_each`` every request gets a fresh ``cache_salt`` (a miss)."""

    def __init__(
        self, name: str, server: Server, *, salt: str | None = None, salt_each: bool = False
    ) -> None:
        self.name = name
        self.server = server
        self._salt = salt
        self._salt_each = salt_each

    def run(self, request: Prepared, max_tokens: int) -> Sample:
        salt = f"miss-{uuid.uuid4().hex}" if self._salt_each else self._salt
        return self.server.complete(
            prompt=request.prompt,
            messages=request.message_dicts(),
            max_tokens=max_tokens,
            cache_salt=salt,
        )


def run_rotated(
    arms: Sequence[Arm], request: Prepared, turn: int, max_tokens: int = 1, quiesce: bool = True
) -> dict[str, Sample]:
    """Run ``request`` through every arm, starting at arm ``turn % len(arms)``. With ``quiesce``,
    each server's background writer is drained after its request (outside the timing)."""
    order = [arms[(turn + i) % len(arms)] for i in range(len(arms))]
    out: dict[str, Sample] = {}
    for arm in order:
        out[arm.name] = arm.run(request, max_tokens)
        if quiesce and isinstance(arm, ServerArm):
            arm.server.quiesce()
    return out
