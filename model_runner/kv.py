"""Per-request K/V: stored blocks in, new tokens appended in place, full blocks sliced out.

Shapes: a stored block holds, per layer, K ``[kv_heads, block_size, k_dim]`` and V ``[kv_heads,
block_size, v_dim]`` (no batch dim).

``RequestKV`` is what a request of the packed (batched) path owns: buffers for its whole context
(prompt + max_tokens, reserved at admission), written by the attention function step by step.
The functions on ``DynamicCache`` (a cache layer holds ``[1, kv_heads, seq, dim]``) serve the
one-at-a-time path of models that cannot take the packed one; only models whose layers are all
``DynamicLayer`` (or a ``DynamicSlidingWindowLayer`` that never slides, see ``capability``) are
restored there.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import (
    DummyLayer,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    LinearAttentionAndFullAttentionLayer,
    LinearAttentionLayer,
)

from cache_store.codec import BlockKV, StateTensor
from model_runner import recurrent

LayerShape = tuple[tuple[int, int, int], tuple[int, int, int]]
BlockTensors = tuple[list[torch.Tensor], list[torch.Tensor]]
"""One block: (keys per layer, values per layer), each ``[kv_heads, block_size, dim]`` on CPU."""


def cache_argument(model: torch.nn.Module) -> str:
    """The keyword a model's ``forward`` takes its cache by: ``cache`` in transformers releases
    that renamed it (``past_key_values`` is deprecated there, to be removed in 5.40), else
    ``past_key_values``. Read once per model, not per call."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


class CacheLayoutError(ValueError):
    """Blocks or a cache that do not fit the model's cache layout."""


def bytes_per_token(shapes: Sequence[LayerShape], dtype: torch.dtype) -> int:
    """K/V bytes one token takes over every layer."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum((k[0] * k[2] + v[0] * v[2]) * size for k, v in shapes)


class RequestKV:
    """One request's K/V for ``capacity`` tokens, appended to in place (no copy of the context
    per step). ``length``: tokens whose K/V are complete in every layer.

    When every layer has the same K and V shape the buffers are one tensor ``[layers, 2,
    kv_heads, capacity, dim]`` (a restore is one copy per block); otherwise one K and one V
    tensor per layer, ``[kv_heads, capacity, dim]``."""

    def __init__(
        self, shapes: Sequence[LayerShape], capacity: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.length = 0
        self.nbytes = bytes_per_token(shapes, dtype) * capacity
        self._stacked: torch.Tensor | None = None
        uniform = all(k[0] == v[0] == shapes[0][0][0] and k[2] == v[2] == shapes[0][0][2] for k, v in shapes)
        if uniform:
            heads, dim = shapes[0][0][0], shapes[0][0][2]
            self._stacked = torch.empty((len(shapes), 2, heads, capacity, dim), dtype=dtype, device=device)
            self._keys = [self._stacked[i, 0] for i in range(len(shapes))]
            self._values = [self._stacked[i, 1] for i in range(len(shapes))]
        else:
            self._keys = [torch.empty((k[0], capacity, k[2]), dtype=dtype, device=device) for k, _ in shapes]
            self._values = [
                torch.empty((v[0], capacity, v[2]), dtype=dtype, device=device) for _, v in shapes
            ]

    def restore(self, blocks: Sequence[BlockKV], n_tokens: int) -> None:
        """Copy the first ``n_tokens`` tokens of ``blocks`` in (once); ``length`` becomes ``n_tokens``."""
        available = sum(len(b.token_ids) for b in blocks)
        if n_tokens > min(available, self.capacity) or n_tokens < 0:
            raise CacheLayoutError(f"cannot restore {n_tokens} tokens from blocks holding {available}")
        if any(len(b.layer_shapes) != len(self._keys) for b in blocks):
            raise CacheLayoutError(f"blocks do not have the model's {len(self._keys)} layers")
        at = 0
        for block in blocks:
            take = min(len(block.token_ids), n_tokens - at)
            if take <= 0:
                break
            stacked = block.stacked() if self._stacked is not None else None
            if stacked is not None and stacked.shape[2] == self._stacked.shape[2]:  # type: ignore[union-attr]
                # [L, 2, H, T, D] of the record -> the same span of every layer, one copy.
                self._stacked[:, :, :, at : at + take].copy_(stacked[:, :, :, :take])  # type: ignore[index]
            else:
                for layer in range(len(self._keys)):
                    self._keys[layer][:, at : at + take].copy_(block.keys[layer][:, :take])
                    self._values[layer][:, at : at + take].copy_(block.values[layer][:, :take])
            at += take
        self.length = n_tokens

    def fork(self) -> RequestKV:
        """A copy with the same capacity holding this K/V's ``length`` tokens (another choice of
        the same prompt: it grows on its own from here)."""
        twin = RequestKV.__new__(RequestKV)
        twin.capacity, twin.length, twin.nbytes = self.capacity, self.length, self.nbytes
        twin._stacked = None
        if self._stacked is not None:
            twin._stacked = torch.empty_like(self._stacked)
            twin._stacked[:, :, :, : self.length].copy_(self._stacked[:, :, :, : self.length])
            twin._keys = [twin._stacked[i, 0] for i in range(len(self._keys))]
            twin._values = [twin._stacked[i, 1] for i in range(len(self._values))]
        else:
            twin._keys, twin._values = [], []
            for mine, theirs in ((self._keys, twin._keys), (self._values, twin._values)):
                for tensor in mine:
                    copy = torch.empty_like(tensor)
                    copy[:, : self.length].copy_(tensor[:, : self.length])
                    theirs.append(copy)
        return twin

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor, at: int) -> None:
        """Write one layer's K/V (``[kv_heads, n, dim]``) of tokens ``at .. at + n - 1``."""
        end = at + keys.shape[1]
        if end > self.capacity:
            raise CacheLayoutError(f"token {end - 1} is past the reserved {self.capacity} tokens")
        self._keys[layer][:, at:end].copy_(keys)
        self._values[layer][:, at:end].copy_(values)

    def view(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K ``[kv_heads, end, k_dim]`` and V of tokens ``0 .. end - 1`` (views, no copy)."""
        return self._keys[layer][:, :end], self._values[layer][:, :end]

    def slice_blocks(self, first_block: int, n_blocks: int, block_size: int) -> list[BlockTensors]:
        """Per-block K/V (CPU) of blocks ``first_block ..`` for ``encode_block``. Views on CPU:
        tokens already written never change, so they stay valid while the request runs."""
        start, end = first_block * block_size, (first_block + n_blocks) * block_size
        if n_blocks <= 0:
            return []
        if start < 0 or end > self.length:
            raise CacheLayoutError(f"tokens [{start}, {end}) are not all in the K/V [0, {self.length})")
        blocks: list[BlockTensors] = [([], []) for _ in range(n_blocks)]
        for layer in range(len(self._keys)):
            for tensor, slot in ((self._keys[layer], 0), (self._values[layer], 1)):
                span = tensor[:, start:end]
                host = span.to("cpu") if span.device.type != "cpu" else span  # one copy per layer
                for i in range(n_blocks):
                    blocks[i][slot].append(host[:, i * block_size : (i + 1) * block_size])
        return blocks


def _to_device(parts: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Concatenate ``[kv_heads, t_i, dim]`` parts along tokens into ``[1, kv_heads, sum t_i, dim]``
    on ``device``: one host copy (into pinned memory on CUDA, so the upload is asynchronous)."""
    heads, _, dim = parts[0].shape
    total = sum(p.shape[1] for p in parts)
    if device.type == "cuda":
        staging = torch.empty((heads, total, dim), dtype=parts[0].dtype, pin_memory=True)
        torch.cat(list(parts), dim=1, out=staging)
        return staging.unsqueeze(0).to(device, non_blocking=True)
    return torch.cat(list(parts), dim=1).unsqueeze(0)


def _stack_blocks(blocks: Sequence[BlockKV], device: torch.device) -> torch.Tensor | None:
    """Every layer's K and V of ``blocks`` in one copy: ``[n_layers, 2, kv_heads, tokens, dim]``
    on ``device`` (tokens = all of the blocks'), or ``None`` when the blocks' layers do not share
    one K/V shape (then the per-layer path runs). One ``torch.stack`` instead of a slice and a
    concatenation per layer and block: ~16 ops instead of ~16 x blocks at 2048 tokens."""
    views = [b.stacked() for b in blocks]
    first = views[0]
    if first is None or any(v is None or v.shape != first.shape for v in views):
        return None
    n_layers, _, heads, per_block, dim = first.shape
    shape = (n_layers, 2, heads, len(views), per_block, dim)
    if device.type == "cuda":
        staging = torch.empty(shape, dtype=first.dtype, pin_memory=True)
        torch.stack(views, dim=3, out=staging)  # type: ignore[arg-type]
        stacked = staging.to(device, non_blocking=True)
    else:
        stacked = torch.stack(views, dim=3)  # type: ignore[arg-type]
    # [L, 2, H, blocks, T, D] -> [L, 2, H, blocks * T, D]: blocks and T are adjacent, a view.
    return stacked.view(n_layers, 2, heads, len(views) * per_block, dim)


KV_LAYER_TYPES = (DynamicLayer, DynamicSlidingWindowLayer, LinearAttentionAndFullAttentionLayer)
"""Cache layers whose K/V a block stores (a hybrid layer keeps recurrent state beside them)."""
RESTORABLE_TYPES = (*KV_LAYER_TYPES, LinearAttentionLayer, DummyLayer)


def kv_layers(cache: DynamicCache) -> list[int]:
    """Indices of the cache layers that keep K/V (recurrent-only and cacheless layers keep none)."""
    return [i for i, layer in enumerate(cache.layers) if isinstance(layer, DynamicLayer)]


def _block_kv(
    blocks: Sequence[BlockKV], n_tokens: int, n_layers: int, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per K/V layer, ``([1, H, n, Dk]`` keys, values) of the first ``n_tokens`` tokens of ``blocks``
    on ``device``: views of one copy when the blocks' layers share a shape."""
    if n_layers == 0:
        return []
    spans: list[tuple[BlockKV, int]] = []
    remaining = n_tokens
    for block in blocks:
        take = min(len(block.token_ids), remaining)
        spans.append((block, take))
        remaining -= take
        if remaining == 0:
            break
    stacked = _stack_blocks([b for b, _ in spans], device)  # [L, 2, H, tokens, D] or None
    layers: list[tuple[torch.Tensor, torch.Tensor]] = []
    for index in range(n_layers):
        if stacked is not None:
            # Views of the one copy; cropped to n_tokens (a view too).
            keys = stacked[index, 0, :, :n_tokens].unsqueeze(0)  # [1, H, n, Dk]
            values = stacked[index, 1, :, :n_tokens].unsqueeze(0)  # [1, H, n, Dv]
        else:
            keys = _to_device([b.keys[index][:, :take] for b, take in spans], device)  # [1, H, n, Dk]
            values = _to_device([b.values[index][:, :take] for b, take in spans], device)  # [1, H, n, Dv]
        layers.append((keys, values))
    return layers


def build_cache(
    config: PretrainedConfig,
    blocks: Sequence[BlockKV],
    n_tokens: int,
    device: torch.device,
    states: Sequence[StateTensor] = (),
) -> DynamicCache:
    """A ``DynamicCache`` for ``config`` holding the first ``n_tokens`` tokens of ``blocks``.

    ``n_tokens`` may stop inside the last block (the "always prefill one token" crop) when the
    model keeps no recurrent state; ``states`` is the recurrent state after exactly ``n_tokens``
    tokens otherwise. With no blocks (or ``n_tokens == 0``) the cache is empty.
    """
    cache = DynamicCache(config=config)
    if n_tokens <= 0 or not blocks:
        return cache
    available = sum(len(b.token_ids) for b in blocks)
    if n_tokens > available:
        raise CacheLayoutError(f"asked for {n_tokens} tokens from blocks holding {available}")
    indices = kv_layers(cache)
    if any(len(b.layer_shapes) != len(indices) for b in blocks):
        raise CacheLayoutError(f"blocks do not have the model's {len(indices)} K/V layers")
    layer_kv = _block_kv(blocks, n_tokens, len(indices), device)
    return assemble(cache, layer_kv, n_tokens, states, device)


def assemble(
    cache: DynamicCache,
    layer_kv: Sequence[tuple[torch.Tensor, torch.Tensor]],
    n_tokens: int,
    states: Sequence[StateTensor],
    device: torch.device,
) -> DynamicCache:
    """Fill a fresh ``cache``: ``layer_kv[i]`` (``[1, H, n_tokens, D]`` K and V) into its i-th K/V
    layer, ``states`` into its recurrent layers."""
    for index, layer in enumerate(cache.layers):
        if (
            not isinstance(layer, RESTORABLE_TYPES)
            or type(layer).__name__ == "LinearAttentionAndSlidingWindowAttentionLayer"
        ):
            raise CacheLayoutError(f"layer {index} ({type(layer).__name__}) cannot be restored")
    stateful = recurrent.state_layers(cache)
    if stateful and not states:
        raise CacheLayoutError("a model with recurrent layers is restored with their state")
    for index, (keys, values) in zip(kv_layers(cache), layer_kv, strict=True):
        layer = cache.layers[index]
        # Assign instead of layer.update(): update would cat onto an empty tensor, a second full
        # copy of the prefix on the hot path. These are the attributes update() itself sets.
        DynamicLayer.lazy_initialization(layer, keys, values)
        layer.keys, layer.values = keys, values
        if isinstance(layer, DynamicSlidingWindowLayer):
            if n_tokens >= layer.sliding_window:
                raise CacheLayoutError(f"layer {index}: {n_tokens} tokens exceed its sliding window")
            layer.cumulative_length = n_tokens
    if states:
        recurrent.load(cache, states, n_tokens, device)
    if kv_layers(cache) and cache.get_seq_length() != n_tokens:
        raise CacheLayoutError("the installed transformers' DynamicCache did not take the restored K/V")
    return cache


def clone_prefix(
    cache: DynamicCache,
    config: PretrainedConfig,
    states: Sequence[StateTensor],
    n_tokens: int,
    device: torch.device,
) -> DynamicCache:
    """A fresh cache holding what ``cache`` holds after its first ``n_tokens`` tokens, built the
    way a restore builds one (K/V copied, ``states`` loaded): the continuation probe's restore."""
    layer_kv = []
    for index in kv_layers(cache):
        layer = cache.layers[index]
        layer_kv.append((layer.keys[:, :, :n_tokens].clone(), layer.values[:, :, :n_tokens].clone()))
    return assemble(DynamicCache(config=config), layer_kv, n_tokens, states, device)


def storable_range(cache: DynamicCache) -> tuple[int, int]:
    """Token positions ``[start, end)`` whose K/V every K/V layer of ``cache`` still holds."""
    indices = kv_layers(cache)
    end = cache.layers[indices[0]].get_seq_length() if indices else 0
    start = 0
    for index in indices:
        layer = cache.layers[index]
        kept = 0 if layer.keys is None or layer.keys.numel() == 0 else layer.keys.shape[-2]
        seq = layer.get_seq_length()
        if seq != end:
            raise CacheLayoutError("cache layers disagree on the sequence length")
        start = max(start, seq - kept)
    return start, end


def slice_blocks(cache: DynamicCache, first_block: int, n_blocks: int, block_size: int) -> list[BlockTensors]:
    """Per-block K/V of blocks ``first_block .. first_block + n_blocks - 1`` (``[kv_heads,
    block_size, dim]`` per K/V layer, on CPU), ready for ``encode_block``.

    The parts are views of the cache (no copy on CPU): ``encode_block`` copies strided views
    straight into the record, and the caller encodes before the cache changes again (a
    ``DynamicLayer`` update concatenates into a new tensor; it never writes into the old one)."""
    if n_blocks <= 0:
        return []
    start_tok = first_block * block_size
    end_tok = start_tok + n_blocks * block_size
    indices = kv_layers(cache)
    blocks: list[BlockTensors] = [([], []) for _ in range(n_blocks)]
    if not indices:
        return blocks  # a pure state-space model: its blocks carry no K/V
    lo, hi = storable_range(cache)
    if start_tok < lo or end_tok > hi:
        raise CacheLayoutError(f"tokens [{start_tok}, {end_tok}) are not all in the cache [{lo}, {hi})")
    for index in indices:
        layer = cache.layers[index]
        offset = layer.get_seq_length() - layer.keys.shape[-2]
        for tensor, slot in ((layer.keys, 0), (layer.values, 1)):
            # [1, H, seq, D] -> [H, n_blocks * block_size, D]; one device->host copy per layer.
            span = tensor[0, :, start_tok - offset : end_tok - offset, :]
            host = span.to("cpu") if span.device.type != "cpu" else span
            for i in range(n_blocks):
                part = host[:, i * block_size : (i + 1) * block_size, :]
                blocks[i][slot].append(part)
    return blocks


def layer_shapes(cache: DynamicCache, block_size: int) -> list[LayerShape]:
    """The per-K/V-layer ``(K shape, V shape)`` of one block, read off a filled cache."""
    shapes: list[LayerShape] = []
    for index in kv_layers(cache):
        layer = cache.layers[index]
        if layer.keys is None or layer.keys.numel() == 0:
            raise CacheLayoutError("cannot read block shapes from an empty cache layer")
        _, kh, _, kd = layer.keys.shape
        _, vh, _, vd = layer.values.shape
        shapes.append(((kh, block_size, kd), (vh, block_size, vd)))
    return shapes


class CacheKV:
    """One request's transformers ``Cache``, for the one-at-a-time path (models whose layers
    cannot be driven through the packed attention function, e.g. recurrent ones). ``length``
    is counted here: a cache of only recurrent layers has no sequence length to ask.

    With a ``StateLayout`` (a model with recurrent layers) it also plans where the prefill stops
    to take the state (``chunk_limit``), takes it there (``after_step``) and hands the states to
    the blocks that store them (``take_states``)."""

    def __init__(
        self,
        config: PretrainedConfig,
        layout: recurrent.StateLayout | None = None,
        block_size: int = 0,
        prompt_tokens: int = 0,
    ) -> None:
        self.config = config
        self.cache = DynamicCache(config=config)
        self.length = 0
        self.nbytes = 0
        self.layout = layout
        self.block_size = block_size
        self.prompt_tokens = prompt_tokens
        """Where the prompt ends: its last full block always gets a state."""
        self.branch_tokens = 0
        """Where the prompt leaves the blocks its lookup matched (0: none matched). A state is
        taken there too when none is stored: the next prompt that shares that prefix and goes
        another way restores all of it (a shared system prompt is cached whole from its third
        use, whatever the periodic interval)."""
        self._snapshots: dict[int, list[StateTensor]] = {}
        """Block index -> the state after it, until that block is stored."""

    def restore(self, blocks: Sequence[BlockKV], n_tokens: int, device: torch.device) -> None:
        states: Sequence[StateTensor] = ()
        if self.layout is not None:
            bs = self.block_size
            if n_tokens % bs or not blocks[n_tokens // bs - 1].has_state:
                raise CacheLayoutError(f"no recurrent state stored after token {n_tokens}")
            states = blocks[n_tokens // bs - 1].states
        self.cache = build_cache(self.config, blocks, n_tokens, device, states)
        self.length = n_tokens

    def fork(self) -> CacheKV:
        """An independent copy (every layer's tensors, recurrent states included)."""
        twin = CacheKV(self.config, self.layout, self.block_size, self.prompt_tokens)
        twin.cache = copy.deepcopy(self.cache)
        twin.length = self.length
        return twin

    def slice_blocks(self, first_block: int, n_blocks: int, block_size: int) -> list[BlockTensors]:
        # Raises CacheLayoutError for tokens a layer no longer holds (never for a cacheable model).
        if first_block * block_size < 0 or (first_block + n_blocks) * block_size > self.length:
            raise CacheLayoutError(f"blocks {first_block}..{first_block + n_blocks - 1} are not all read")
        return slice_blocks(self.cache, first_block, n_blocks, block_size)

    # -- recurrent state -------------------------------------------------------------------------

    def _stops_at(self, boundary: int) -> bool:
        """Whether the state after ``boundary`` tokens (a block boundary) is kept."""
        assert self.layout is not None
        block = boundary // self.block_size
        last_prompt_block = self.prompt_tokens // self.block_size
        return (
            block % self.layout.every == 0
            or block == last_prompt_block
            or boundary == self.branch_tokens
            or boundary > self.prompt_tokens
        )

    def chunk_limit(self, target: int) -> int:
        """Tokens the next prefill step may take, up to ``target``: it ends where a state is taken
        (a "token" model takes one at a time once it holds a state)."""
        left = target - self.length
        layout = self.layout
        if layout is None or left <= 0:
            return max(left, 0)
        if layout.continuation == "token":
            if self.length > 0:
                return 1
            # From an empty state, one step is exact: go to the prompt's last block boundary.
            stop = self.prompt_tokens // self.block_size * self.block_size
            return stop if stop > 0 and stop < target else left
        bs = self.block_size
        boundary = (self.length // bs + 1) * bs
        while boundary < target and not self._stops_at(boundary):
            boundary += bs
        return min(boundary, target) - self.length

    def after_step(self) -> None:
        """A step ended: take the state if it ended on a block boundary where one is kept (the
        state of a decoded block replaces the last one taken in decode unless it is a periodic
        one: only the newest is needed to extend this conversation)."""
        if self.layout is None or self.length == 0 or self.length % self.block_size:
            return
        if not self._stops_at(self.length):
            return
        block = self.length // self.block_size - 1
        if self.length > self.prompt_tokens:
            for old in [b for b in self._snapshots if (b + 1) * self.block_size > self.prompt_tokens]:
                if (old + 1) % self.layout.every:
                    del self._snapshots[old]
        self._snapshots[block] = recurrent.snapshot(self.cache)

    def take_states(self, first_block: int, n_blocks: int) -> dict[int, list[StateTensor]]:
        """The states taken after blocks ``first_block ..`` (on CPU), handed over once."""
        taken: dict[int, list[StateTensor]] = {}
        for block in [b for b in self._snapshots if first_block <= b < first_block + n_blocks]:
            states = self._snapshots.pop(block)
            taken[block] = [
                StateTensor(
                    s.layer,
                    s.slot,
                    s.index,
                    s.tensor.to("cpu") if s.tensor.device.type != "cpu" else s.tensor,
                )
                for s in states
            ]
        return taken

    def pending_states(self) -> list[int]:
        """Blocks whose state was taken and not yet handed over."""
        return sorted(self._snapshots)
