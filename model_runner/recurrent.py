"""Recurrent layer state: what SSM, linear-attention and short-convolution layers keep instead of
(or beside) K/V, and how a prefix is restored from it.

Such a layer folds every token it has read into a fixed-size state (transformers'
``LinearAttentionCacheLayerMixin``: per state index a convolution state and/or a recurrent
state). A state cannot be sliced per token, so it is stored as it stands after a block's last
token, in that block's own record (``cache_store.codec``'s state section), and a prefix is
restored only up to a block that carries one. Which blocks carry one:

- every ``StateLayout.every``-th block, with ``every`` the smallest interval at which the stored
  states take no more bytes than the same blocks' K/V would in a model of the same shape whose
  every layer were full attention (so a hybrid never stores more per cached token than a
  full-attention model of its size, however large its states), and at least
  ``STATE_INTERVAL_MIN_TOKENS`` (each stop makes the prefill a step shorter, and slower);
- the last full block of every prompt (a repeated or extended prompt restores all of it);
- the last block a prompt's lookup matched, when it carries no state yet (where two prompts
  part: the next one that shares that prefix restores all of it);
- during decode, the last block boundary reached (a chat's next turn restores its history).

A prefill stops at each of those boundaries to take the state there (``CacheKV.chunk_limit``).
Whether a model continues a restored state exactly is measured when it loads
(``probe_continuation``): most continue with many tokens at once ("chunk"); the Mamba-1 family
(Mamba, FalconMamba, Jamba) restarts its scan from zero on a multi-token step, so its suffix is
fed one token at a time ("token") and a restore is taken only when that suffix is short.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import LinearAttentionCacheLayerMixin

from cache_store.codec import CONV_STATE, RECURRENT_STATE, StateSpec, StateTensor

Continuation = Literal["chunk", "token"]

TOKEN_SUFFIX_MAX = 512
"""A "token" model restores a prefix only when at most this many tokens follow it: fed one at a
time, a longer suffix costs more than prefilling the whole prompt in one step."""

STATE_INTERVAL_MIN_TOKENS = 512
"""The shortest stretch between periodic states. A prefill stops wherever a state is taken, and
short steps are slow: on 2 CPU cores a 2048-token cold prefill of an LFM2-style hybrid took 2.1x
one unbroken forward with a state every 64 tokens, 1.3x every 256 and 1.2x every 512
(``bench/layer_kinds_bench.py``). Prompt ends, decode ends and the ends of matched prefixes
carry states whatever this is, so what it costs is only the part of a first shared prefix
past its last periodic state, recomputed until a second prompt branches there."""

_PROBE_PREFIX = 8
_PROBE_SUFFIX = 4


class StateLayoutError(ValueError):
    """A state that does not fit the model's layers."""


@dataclass(frozen=True)
class StateLayout:
    """The recurrent state of one model: ``specs`` (every state tensor, model layer order),
    ``continuation`` and ``every`` (blocks between stored states)."""

    specs: tuple[StateSpec, ...]
    continuation: Continuation
    every: int

    @property
    def nbytes(self) -> int:
        """Bytes of one snapshot (every layer's state)."""
        return sum(spec.nbytes for spec in self.specs)

    def restorable(self, has_state: Sequence[bool], block_size: int, limit: int) -> int:
        """Tokens to restore from matched blocks (``has_state[j]``: block j carries a state) when
        at most ``limit`` tokens may be restored: up to the last block with a state."""
        best = 0
        for j, stated in enumerate(has_state):
            end = (j + 1) * block_size
            if end > limit:
                break
            if stated:
                best = end
        if self.continuation == "token" and best and limit - best > TOKEN_SUFFIX_MAX:
            return 0
        return best

    def describe(self, block_size: int) -> str:
        fed = "many tokens per step" if self.continuation == "chunk" else "one token per step after a restore"
        return (
            f"{len({s.layer for s in self.specs})} recurrent layer(s) keep {self.nbytes} state bytes, "
            f"stored after every {self.every * block_size} tokens, each prompt's last block, where a "
            f"prompt leaves a cached prefix and the last decoded block ({fed})"
        )


def state_layers(cache: DynamicCache) -> list[int]:
    """Indices of the cache layers that keep recurrent state."""
    return [i for i, layer in enumerate(cache.layers) if isinstance(layer, LinearAttentionCacheLayerMixin)]


def snapshot(cache: DynamicCache) -> list[StateTensor]:
    """Copies (on the cache's device) of every recurrent state of ``cache``, batch dim dropped."""
    states: list[StateTensor] = []
    for index in state_layers(cache):
        layer = cache.layers[index]
        for slot, table in ((CONV_STATE, layer.conv_states), (RECURRENT_STATE, layer.recurrent_states)):
            for state_index in sorted(table):
                tensor = table[state_index]
                if tensor is None:
                    continue
                if tensor.shape[0] != 1:
                    raise StateLayoutError(f"layer {index} holds a batch of {tensor.shape[0]} states")
                states.append(StateTensor(index, slot, state_index, tensor[0].clone()))
    return sorted(states, key=lambda s: (s.layer, s.slot, s.index))


def load(cache: DynamicCache, states: Sequence[StateTensor], n_tokens: int, device: torch.device) -> None:
    """Put ``states`` (the state after ``n_tokens`` tokens) into a fresh ``cache``'s recurrent
    layers, as if they had read those tokens."""
    layers = set(state_layers(cache))
    for state in states:
        if state.layer not in layers:
            raise StateLayoutError(f"layer {state.layer} keeps no recurrent state")
        layer = cache.layers[state.layer]
        tensor = state.tensor.unsqueeze(0).to(device)
        if state.slot == CONV_STATE:
            layer.lazy_initialization(
                conv_states=tensor, state_idx=state.index, conv_kernel_size=tensor.shape[-1]
            )
            layer.conv_states[state.index].copy_(tensor)
        else:
            layer.lazy_initialization(recurrent_states=tensor, state_idx=state.index)
            layer.recurrent_states[state.index].copy_(tensor)
        layer.has_previous_state[state.index] = True
    for index in layers:
        layer = cache.layers[index]
        layer.cumulative_length_linear = torch.tensor(n_tokens, dtype=torch.long, device=device)


def interval(specs: Sequence[StateSpec], reference_bytes_per_token: int, block_size: int) -> int:
    """Blocks between stored states: the states of a stretch of blocks take no more bytes than
    ``reference_bytes_per_token`` (K/V per token of the model with every layer full attention),
    and the stretch is at least ``STATE_INTERVAL_MIN_TOKENS`` long."""
    state_bytes = sum(spec.nbytes for spec in specs)
    per_block = max(reference_bytes_per_token * block_size, 1)
    by_bytes = math.ceil(state_bytes / per_block)
    by_compute = math.ceil(STATE_INTERVAL_MIN_TOKENS / block_size)
    return max(1, by_bytes, by_compute)


def reference_bytes_per_token(model: PreTrainedModel, kv_heads_dim: int | None, dtype: torch.dtype) -> int:
    """K/V bytes per token if every layer of ``model`` were full attention: with the model's own
    attention width (``kv_heads * head_dim`` of its K/V layers), or its hidden size when it has
    none (a pure state-space model, as multi-head attention would)."""
    config = model.config
    config = getattr(config, "get_text_config", lambda: config)()
    width = kv_heads_dim or int(getattr(config, "hidden_size", 0) or 0)
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    return 2 * width * layers * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class ContinuationProbe:
    """How a model continued a restored state: ``mode`` ("chunk", "token" or ``None``: neither
    was exact), and the largest logit differences against a full prefill."""

    mode: Continuation | None
    chunk_error: float
    token_error: float
    tolerance: float


def probe_continuation(model: PreTrainedModel, device: torch.device, cache_kw: str) -> ContinuationProbe:
    """Prefill 8 tokens, restore their state into a fresh cache, continue 4 tokens at once and one
    at a time, and compare the logits with one prefill of all 12."""
    config = model.config
    vocab = int(model.get_input_embeddings().num_embeddings)
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(3, max(vocab, 4), (1, _PROBE_PREFIX + _PROBE_SUFFIX), generator=gen).to(device)
    positions = torch.arange(ids.shape[1], device=device).unsqueeze(0)
    with torch.inference_mode():
        full = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0, _PROBE_PREFIX:].float()
        cache = DynamicCache(config=config)
        model(
            input_ids=ids[:, :_PROBE_PREFIX],
            position_ids=positions[:, :_PROBE_PREFIX],
            use_cache=True,
            **{cache_kw: cache},
        )
        states = snapshot(cache)

        def restored() -> DynamicCache:
            from model_runner import kv  # kv imports this module

            return kv.clone_prefix(cache, config, states, _PROBE_PREFIX, device)

        chunk = (
            model(
                input_ids=ids[:, _PROBE_PREFIX:],
                position_ids=positions[:, _PROBE_PREFIX:],
                use_cache=True,
                **{cache_kw: restored()},
            )
            .logits[0]
            .float()
        )
        one_cache = restored()
        rows = []
        for t in range(_PROBE_PREFIX, _PROBE_PREFIX + _PROBE_SUFFIX):
            out = model(
                input_ids=ids[:, t : t + 1],
                position_ids=positions[:, t : t + 1],
                use_cache=True,
                **{cache_kw: one_cache},
            )
            rows.append(out.logits[0, -1].float())
        token = torch.stack(rows)
    scale = max(float(full.abs().max()), 1.0)
    eps = torch.finfo(model.dtype).eps if model.dtype.is_floating_point else 1e-7
    tolerance = max(1e-4, 8 * eps) * scale
    chunk_error = float((chunk - full).abs().max())
    token_error = float((token - full).abs().max())
    mode: Continuation | None = None
    if token_error <= tolerance:
        # A multi-token step is as exact as one token at a time (its own rounding aside).
        mode = "chunk" if chunk_error <= max(10 * token_error, 1e-5 * scale) else "token"
    elif chunk_error <= tolerance:
        mode = "chunk"
    return ContinuationProbe(mode, chunk_error, token_error, tolerance)
