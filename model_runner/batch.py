"""Packing one step: the token ids, positions and per-request metadata of a forward pass.

A step holds, per request, a run of consecutive tokens (one for a decoding request, a chunk for a
prefilling one) at positions ``start .. start + n - 1`` of that request. All runs are packed into
one ``[1, T]`` row: the model's linear layers see T tokens; its attention layers get each run's
slice back from ``SeqSlice.offset`` (see ``attention.packed_attention``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model_runner.kv import RequestKV


@dataclass(frozen=True)
class SeqSlice:
    """One request's part of a step: ``n_tokens`` tokens written into ``kv`` from position
    ``start`` on, found at ``offset .. offset + n_tokens - 1`` of the packed row."""

    kv: RequestKV
    start: int
    n_tokens: int
    offset: int


@dataclass(frozen=True)
class StepBatch:
    """What the attention function needs about a step (travels in the forward's kwargs)."""

    seqs: tuple[SeqSlice, ...]
    device: torch.device


@dataclass(frozen=True)
class PackedInputs:
    """The model inputs of a step. ``input_ids``/``position_ids``: [1, T]; ``logits_index``:
    packed positions whose logits are wanted (the last token of each run that samples)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    logits_index: torch.Tensor
    step: StepBatch


@dataclass(frozen=True)
class Run:
    """One request's tokens in a step, before packing."""

    kv: RequestKV
    token_ids: Sequence[int]
    start: int
    wants_logits: bool


def pack(runs: Sequence[Run], device: torch.device) -> PackedInputs:
    """Pack ``runs`` in order into one row. Raises ``ValueError`` on an empty run."""
    ids: list[int] = []
    positions: list[int] = []
    slices: list[SeqSlice] = []
    keep: list[int] = []
    for run in runs:
        n = len(run.token_ids)
        if n == 0:
            raise ValueError("a run must hold at least one token")
        slices.append(SeqSlice(run.kv, run.start, n, len(ids)))
        ids.extend(run.token_ids)
        positions.extend(range(run.start, run.start + n))
        if run.wants_logits:
            keep.append(len(ids) - 1)
    return PackedInputs(
        input_ids=torch.tensor([ids], dtype=torch.long, device=device),
        position_ids=torch.tensor([positions], dtype=torch.long, device=device),
        logits_index=torch.tensor(keep, dtype=torch.long, device=device),
        step=StepBatch(tuple(slices), device),
    )
