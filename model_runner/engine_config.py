"""The engine's batching options and their per-device defaults.

Defaults come from ``bench/batching_bench.py`` (docs/bench/batching.md): on CPU, decode
throughput grows by 7% from 32 to 48 running requests while every stream slows by a third, so
32; a 512-token step budget roughly halves a long prompt's time to the first token against 128
for a worst inter-token gap of the decoding streams twice as long, and 1024 saves nothing more.
On CUDA a step is cheap until thousands of tokens (not measured here: see bench/gpu.sh).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

CPU_MAX_BATCH = 32
CPU_MAX_BATCH_TOKENS = 512
CUDA_MAX_BATCH = 128
CUDA_MAX_BATCH_TOKENS = 2048
CPU_KV_BUDGET_BYTES = 4 << 30
CUDA_KV_BUDGET_FRACTION = 0.5
"""Of the device memory free once the model is loaded."""


@dataclass(frozen=True)
class EngineConfig:
    """``None`` means the device's default (``resolve``).

    ``max_batch``: requests running together (1: one at a time, bitwise reproducible whatever
    the load); ``max_batch_tokens``: tokens of one forward step (a longer prefill is split);
    ``kv_budget_bytes``: K/V reserved by running requests (admission waits when it is full);
    ``max_waiting``: requests waiting to join (more are refused: ``QueueFull``)."""

    max_batch: int | None = None
    max_batch_tokens: int | None = None
    kv_budget_bytes: int | None = None
    max_waiting: int = 64

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_batch_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.kv_budget_bytes is not None and self.kv_budget_bytes < 1:
            raise ValueError("kv_budget_bytes must be positive")
        if self.max_waiting < 1:
            raise ValueError("max_waiting must be at least 1")

    def resolve(self, device: torch.device, *, packed: bool, bytes_per_token: int) -> EngineConfig:
        """Every option set: the device's defaults for those left ``None``. A model that cannot
        be batched (``packed`` False) runs one request at a time, its whole prompt in one step."""
        cuda = device.type == "cuda"
        max_batch = self.max_batch or (CUDA_MAX_BATCH if cuda else CPU_MAX_BATCH)
        tokens = self.max_batch_tokens or (CUDA_MAX_BATCH_TOKENS if cuda else CPU_MAX_BATCH_TOKENS)
        budget = self.kv_budget_bytes
        if budget is None:
            if cuda:
                free, _ = torch.cuda.mem_get_info(device)
                budget = int(free * CUDA_KV_BUDGET_FRACTION)
            else:
                budget = CPU_KV_BUDGET_BYTES
        if not packed:
            return dataclasses.replace(self, max_batch=1, max_batch_tokens=None, kv_budget_bytes=budget)
        return dataclasses.replace(
            self, max_batch=max_batch, max_batch_tokens=max(tokens, max_batch), kv_budget_bytes=budget
        )
