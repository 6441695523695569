"""How one step goes through the model: packed (many requests, one forward) or one request.

``PackedForward`` drives an unmodified HF model through the registered attention function
(``attention.py``): every run of the step is packed into one ``[1, T]`` row with explicit
positions, the linear layers run once over all of it, each request attends over its own
``RequestKV``, and logits are computed only for the positions that sample.

``SerialForward`` is for models that cannot take that path (their layers do not all go through
the attention interface, or hold recurrent state that would read a packed row as one sequence):
one request per step on its own transformers ``DynamicCache``. The scheduler is the same; it
runs such models at batch size 1, each prompt in one step, or, for a model with recurrent
layers, in steps that end where its state is taken (``CacheKV.chunk_limit``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from transformers import DynamicCache, PreTrainedModel

from cache_store.codec import BlockKV, StateSpec
from model_runner import attention, kv, recurrent
from model_runner.batch import Run, pack

PackedKV = kv.RequestKV | kv.CacheKV


class StepForward(Protocol):
    """What the engine needs from a way of running steps."""

    packed: bool
    """Whether many requests share a step (and a prompt may be prefilled in chunks)."""

    def new_kv(self, capacity: int, prompt_tokens: int) -> PackedKV:
        """K/V for a request of ``capacity`` tokens whose prompt (prefill) is ``prompt_tokens``."""
        ...

    def restore(self, state: PackedKV, blocks: Sequence[BlockKV], n_tokens: int) -> None: ...

    def run(self, runs: Sequence[Run]) -> torch.Tensor:
        """Forward the step; logits ``[runs that want logits, vocab]`` in run order."""
        ...


class PackedForward:
    packed = True

    def __init__(
        self,
        model: PreTrainedModel,
        shapes: Sequence[kv.LayerShape],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self._model = model
        self._shapes = list(shapes)
        self._dtype = dtype
        self._device = device
        base = model.config._attn_implementation or "sdpa"
        if not base.startswith(attention.NAME_PREFIX):
            model.set_attn_implementation(attention.implementation_name(base))
        # A 4D mask is handed through untouched, so transformers builds no mask for a packed step.
        self._no_mask = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device)
        self.bytes_per_token = kv.bytes_per_token(self._shapes, dtype)

    def new_kv(self, capacity: int, prompt_tokens: int) -> kv.RequestKV:
        return kv.RequestKV(self._shapes, capacity, self._dtype, self._device)

    def restore(self, state: PackedKV, blocks: Sequence[BlockKV], n_tokens: int) -> None:
        if not isinstance(state, kv.RequestKV):
            raise TypeError("the packed path restores into a RequestKV")
        state.restore(blocks, n_tokens)

    @torch.inference_mode()
    def run(self, runs: Sequence[Run]) -> torch.Tensor:
        inputs = pack(runs, self._device)
        out = self._model(
            input_ids=inputs.input_ids,
            position_ids=inputs.position_ids,
            attention_mask=self._no_mask,
            use_cache=False,
            logits_to_keep=inputs.logits_index,
            **{attention.STEP_KWARG: inputs.step},
        )
        for run in runs:
            run.kv.length = run.start + len(run.token_ids)
        return out.logits[0]  # [kept, vocab]


class SerialForward:
    packed = False

    def __init__(
        self,
        model: PreTrainedModel,
        device: torch.device,
        layout: recurrent.StateLayout | None = None,
        block_size: int = 0,
    ) -> None:
        self._model = model
        self._device = device
        self._cache_kw = kv.cache_argument(model)
        self._layout = layout
        self._block_size = block_size
        self.bytes_per_token = 0

    def new_kv(self, capacity: int, prompt_tokens: int) -> kv.CacheKV:
        return kv.CacheKV(self._model.config, self._layout, self._block_size, prompt_tokens)

    def restore(self, state: PackedKV, blocks: Sequence[BlockKV], n_tokens: int) -> None:
        if not isinstance(state, kv.CacheKV):
            raise TypeError("the one-at-a-time path restores into a CacheKV")
        with torch.inference_mode():
            state.restore(blocks, n_tokens, self._device)

    @torch.inference_mode()
    def run(self, runs: Sequence[Run]) -> torch.Tensor:
        if len(runs) != 1:
            raise ValueError(f"the one-at-a-time path runs one request per step, got {len(runs)}")
        run = runs[0]
        state = run.kv
        if not isinstance(state, kv.CacheKV):
            raise TypeError("the one-at-a-time path runs on a CacheKV")
        ids = torch.tensor([list(run.token_ids)], dtype=torch.long, device=self._device)
        positions = torch.arange(run.start, run.start + ids.shape[1], device=self._device).unsqueeze(0)
        out = self._model(
            input_ids=ids,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kw: state.cache},
        )
        state.length = run.start + ids.shape[1]
        state.after_step()
        return out.logits[0, -1:] if run.wants_logits else out.logits[0, :0]


def probe_layer_shapes(
    model: PreTrainedModel, block_size: int, device: torch.device
) -> tuple[list[kv.LayerShape], tuple[StateSpec, ...]]:
    """Per-K/V-layer block K/V shapes and the recurrent state tensors, read off a short forward
    (robust to any config naming)."""
    past = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(
            input_ids=torch.zeros((1, 8), dtype=torch.long, device=device),
            use_cache=True,
            **{kv.cache_argument(model): past},
        )
    return kv.layer_shapes(past, block_size), tuple(s.spec for s in recurrent.snapshot(past))
