"""The attention function registered with transformers' ``AttentionInterface``.

Unmodified HF model classes run a packed step (``[1, T]`` tokens of many requests) through their
linear layers once; every attention layer then calls ``packed_attention`` with the step's query /
key / value (``[1, heads, T, dim]``, after RoPE). For each request of the step it writes the new
K/V into that request's own buffers (``kv.RequestKV``) and attends over them: causal and
bottom-right aligned for a prefill chunk, honouring the sliding window, soft-capping and
attention sinks the layer declares. The step's metadata (``batch.StepBatch``) arrives through the
forward's keyword arguments, as ``kvproxy_step``.

Without that keyword (e.g. ``model.generate`` on the same model object) the function hands the
call to the implementation the model was loaded with, so the model still behaves exactly as
before.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from model_runner.batch import StepBatch

STEP_KWARG = "kvproxy_step"
NAME_PREFIX = "kvproxy_"
"""Registered as ``kvproxy_<base>`` (e.g. ``kvproxy_sdpa``): ``<base>`` serves calls without a step."""


def implementation_name(base: str) -> str:
    """Register (once) and return the attention implementation that wraps ``base``."""
    name = NAME_PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        AttentionInterface.register(name, _make_attention(base))
        # Calls without a step build the masks ``base`` would get; a packed step passes its own
        # (4D placeholder) mask, which transformers hands through untouched.
        if base in ALL_MASK_ATTENTION_FUNCTIONS.valid_keys():
            ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def _make_attention(base: str) -> Callable[..., tuple[torch.Tensor, None]]:
    def attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Any]:
        step: StepBatch | None = kwargs.pop(STEP_KWARG, None)
        if step is None:
            return _base_function(base, module)(module, query, key, value, attention_mask, **kwargs)
        return packed_attention(module, query, key, value, step, **kwargs), None

    return attention


def _base_function(base: str, module: torch.nn.Module) -> Callable[..., Any]:
    if base != "eager" and base in ALL_ATTENTION_FUNCTIONS.valid_keys():
        return ALL_ATTENTION_FUNCTIONS[base]
    # "eager" lives in each modeling file, not in the registry.
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise RuntimeError(f"{type(module).__name__} has no eager attention to fall back to")
    return eager


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    step: StepBatch,
    *,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **_: Any,
) -> torch.Tensor:
    """``query``: [1, Hq, T, D]; ``key``/``value``: [1, Hkv, T, D] / [1, Hkv, T, Dv] for the
    step's T packed tokens. Returns [1, T, Hq, Dv] (what transformers' attention functions return)."""
    layer = int(module.layer_idx)
    n_heads, total, head_dim = query.shape[1], query.shape[2], query.shape[3]
    if scaling is None:
        scaling = head_dim**-0.5
    out = query.new_empty((1, total, n_heads, value.shape[-1]))
    manual = softcap is not None or s_aux is not None
    for seq in step.seqs:
        a, n = seq.offset, seq.n_tokens
        seq.kv.write(layer, key[0, :, a : a + n], value[0, :, a : a + n], seq.start)
        keys, values = seq.kv.view(layer, seq.start + n)  # [Hkv, L, Dk], [Hkv, L, Dv]
        keys, values, mask = _visible(keys, values, seq.start, n, sliding_window, step.device)
        q = query[:, :, a : a + n]  # [1, Hq, n, D]
        if manual:
            o = _eager(q, keys, values, mask, scaling, softcap, s_aux)
        elif n == 1 and q.device.type == "cpu":
            o = _decode_cpu(q, keys, values, scaling)
        else:
            o = _sdpa(q, keys, values, mask, scaling)
        out[0, a : a + n] = o[0].transpose(0, 1)  # [n, Hq, Dv]
    return out


def _visible(
    keys: torch.Tensor,
    values: torch.Tensor,
    start: int,
    n: int,
    window: int | None,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The K/V span the chunk's queries (positions ``start .. start+n-1``) may see, and a boolean
    mask ``[n, L]`` when the span is not the same for every query (``None`` otherwise).

    Query i (position start+i) sees key j iff ``j <= start + i`` and, with a window,
    ``start + i - j < window`` (transformers' sliding-window rule)."""
    length = start + n
    low = 0
    if window is not None and window > 0:
        low = max(0, start + 1 - window)  # keys no query of the chunk can see
        keys, values = keys[:, low:], values[:, low:]
    if n == 1:
        return keys, values, None
    q_pos = torch.arange(start, length, device=device)[:, None]
    k_pos = torch.arange(low, length, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None and window > 0:
        mask &= (q_pos - k_pos) < window
    return keys, values, mask


def _sdpa(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    n_heads, kv_heads = q.shape[1], keys.shape[0]
    k, v = keys.unsqueeze(0), values.unsqueeze(0)
    if n_heads == kv_heads:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
    if mask is None or q.device.type == "cpu":
        # SDPA broadcasts the KV heads itself: no repeat_kv copy. (On CUDA, GQA with a mask falls
        # back to the math kernel, so there the heads are repeated instead.)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)
    rep = n_heads // kv_heads
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)


def _decode_cpu(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
    """One query token over its request's K/V, as two batched matmuls over the KV heads (the
    query heads of a group side by side, so GQA needs no repeat). On CPU this is about twice
    as fast as SDPA's flash kernel for a single query, whose per-call setup dominates at this
    size; a decode step makes one such call per request and layer. ``q``: [1, Hq, 1, D]."""
    kv_heads, dim = keys.shape[0], q.shape[-1]
    grouped = q.reshape(kv_heads, -1, dim)  # [Hkv, rep, D]
    weights = torch.bmm(grouped, keys.transpose(1, 2)).mul_(scaling)  # [Hkv, rep, L]
    probs = torch.softmax(weights, dim=-1)
    return torch.bmm(probs, values).reshape(1, q.shape[1], 1, values.shape[-1])


def _eager(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    """Attention written out, for soft-capping and sinks (which SDPA cannot express), in the
    order transformers' eager implementations apply them."""
    rep = q.shape[1] // keys.shape[0]
    k = keys.repeat_interleave(rep, dim=0).unsqueeze(0)  # [1, Hq, L, D]
    v = values.repeat_interleave(rep, dim=0).unsqueeze(0)
    weights = torch.matmul(q, k.transpose(2, 3)) * scaling  # [1, Hq, n, L]
    if softcap is not None:
        weights = torch.tanh(weights / softcap) * softcap
    if mask is not None:
        weights = weights.masked_fill(~mask, torch.finfo(weights.dtype).min)
    if sinks is not None:
        column = sinks.reshape(1, -1, 1, 1).expand(1, -1, weights.shape[2], 1).to(weights.dtype)
        combined = torch.cat([weights, column], dim=-1)
        combined = combined - combined.max(dim=-1, keepdim=True).values
        probs = F.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1]
    else:
        probs = F.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs.to(v.dtype), v)
